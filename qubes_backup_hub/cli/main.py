"""The `qbhub` entry point: the click group, and the one place errors become exit codes."""

from __future__ import annotations

import importlib
import json
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import click

from .. import __version__
from ..errors import QbhubError
from ..tuning import tune_allocator
from .context import CliState
from .logsetup import configure as configure_logging

EPILOG = """\b
Exit codes: 0 success, 1 other error, 2 usage error, 3 integrity or
authentication failure, 4 archive rollback detected, 5 wrong or missing
passphrase, 6 storage or I/O error, 7 not found, 8 refused by a restore
validator, 9 diff --exit-status found a difference, 130 interrupted. With
--json an error is also printed on stdout as {"error": ..., "code": N}.

\b
The passphrase comes from --passphrase-file, else --passphrase-command, else
$QBHUB_PASSPHRASE, else a prompt. --profile NAME takes option defaults from
~/.config/qbhub/config.toml ($QBHUB_CONFIG); given options win. Local state
(the newest archive generation seen, for rollback detection) lives in
$QBHUB_HOME (default ~/.local/share/qbhub).
"""


log = logging.getLogger(__name__)

# Command name -> "module:attribute" in this package; imported only when the command runs (or
# when --help lists them), so a backup does not pay for the demo's or the restore's imports.
COMMANDS = {
    "init": "cmd_archive:init",
    "list": "cmd_archive:list_cmd",
    "info": "cmd_archive:info",
    "verify": "cmd_archive:verify",
    "prune": "cmd_archive:prune",
    "volume": "cmd_volume:volume",
    "key": "cmd_key:key",
    "engines": "cmd_engines:engines",
    "demo": "cmd_demo:demo",
    "diff": "cmd_diff:diff",
    "backup": "cmd_hub:backup",
    "restore": "cmd_hub:restore",
    "local": "cmd_local:local",
    "schedule": "cmd_schedule:schedule",
    "mount": "cmd_mount:mount",
}


class LazyGroup(click.Group):
    """A click group whose subcommands (COMMANDS) are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        module = importlib.import_module(f".{module_name}", __package__)
        command = getattr(module, attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(
    cls=LazyGroup,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="qbhub")
@click.option("-v", "--verbose", count=True, help="Say more on stderr (-vv: debugging detail).")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="QBHUB_LOG_FILE",
    help="Append a detailed log (times, steps, errors) to this file, for support.",
)
@click.pass_context
def cli(ctx: click.Context, verbose: int, log_file: Path | None) -> None:
    """qbhub, the Qubes Backup Hub: encrypted, authenticated, incremental backups."""
    ctx.ensure_object(CliState)
    configure_logging(verbose, log_file)
    log.info("qbhub %s (pid %d): %s", __version__, os.getpid(), shlex.join(sys.argv[1:]))


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so every cleanup (a restore's partial
    file, a lock) runs; not an Exception, so no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # Further TERM/HUP would interrupt the cleanup this one starts: ignore them from now on.
    for sig in TERMINATING_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


@contextmanager
def signals_unwind() -> Iterator[None]:
    """While the CLI runs, SIGTERM and SIGHUP raise Terminated in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in TERMINATING_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; turn every error into one line on stderr and a documented exit code (and,
    with --json, into {"error": ..., "code": N} on stdout).

    SIGTERM and SIGHUP unwind the command (its cleanup runs) and exit 128 + the signal number.
    """
    tune_allocator()
    args = list(sys.argv[1:] if argv is None else argv)
    json_errors = "--json" in args[: args.index("--")] if "--" in args else "--json" in args
    message, code = run_cli(args)
    if message is not None:
        log.error("%s (exit %d)", message.strip(), code)
    else:
        log.info("exit %d", code)
    if message is not None:
        click.echo(message, err=True)
        if json_errors:
            text = message.removeprefix("qbhub: error: ").removeprefix("qbhub: ")
            click.echo(json.dumps({"error": text, "code": code}))
    return code


def run_cli(args: list[str]) -> tuple[str | None, int]:
    """Run the command line; return the error line to show (None: nothing) and the exit code."""
    try:
        with signals_unwind():
            cli.main(args=args, prog_name="qbhub", standalone_mode=False)
    except Terminated as exc:
        return f"qbhub: terminated by {exc}", 128 + exc.signum
    except QbhubError as exc:
        return f"qbhub: error: {exc}", exc.exit_code
    except click.exceptions.Abort:
        return "qbhub: interrupted", 130
    except click.ClickException as exc:
        exc.show()
        return None, 2
    except click.exceptions.Exit as exc:
        return None, exc.exit_code
    except KeyboardInterrupt:
        return "\nqbhub: interrupted", 130
    except OSError as exc:
        if os.environ.get("QBHUB_DEBUG"):
            raise
        return f"qbhub: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), 6
    except Exception as exc:
        if os.environ.get("QBHUB_DEBUG"):
            raise
        return (
            f"qbhub: internal error: {type(exc).__name__}: {exc} "
            "(set QBHUB_DEBUG=1 for a traceback, and please report it)",
            1,
        )
    return None, 0


if __name__ == "__main__":
    sys.exit(main())
