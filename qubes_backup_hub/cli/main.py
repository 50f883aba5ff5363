"""The `qbhub` entry point: the click group, and the one place errors become exit codes."""

from __future__ import annotations

import os
import sys

import click

from .. import __version__
from ..errors import QbhubError
from ..tuning import tune_allocator
from . import cmd_archive, cmd_demo, cmd_diff, cmd_engines, cmd_hub, cmd_key, cmd_local, cmd_volume
from .context import CliState

EPILOG = """\b
Exit codes: 0 success, 1 other error, 2 usage error, 3 integrity or
authentication failure, 4 archive rollback detected, 5 wrong or missing
passphrase, 6 storage or I/O error, 7 not found, 8 refused by a restore
validator, 130 interrupted.

\b
The passphrase comes from --passphrase-file, else $QBHUB_PASSPHRASE, else a
prompt. Local state (the newest archive generation seen, for rollback
detection) lives in $QBHUB_HOME (default ~/.local/share/qbhub).
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qbhub")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """qbhub, the Qubes Backup Hub: encrypted, authenticated, incremental backups."""
    ctx.ensure_object(CliState)


cli.add_command(cmd_archive.init)
cli.add_command(cmd_archive.list_cmd)
cli.add_command(cmd_archive.verify)
cli.add_command(cmd_archive.prune)
cli.add_command(cmd_volume.volume)
cli.add_command(cmd_key.key)
cli.add_command(cmd_engines.engines)
cli.add_command(cmd_demo.demo)
cli.add_command(cmd_diff.diff)
cli.add_command(cmd_hub.backup)
cli.add_command(cmd_hub.restore)
cli.add_command(cmd_local.local)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; turn every error into one line on stderr and a documented exit code."""
    tune_allocator()
    try:
        cli.main(args=argv, prog_name="qbhub", standalone_mode=False)
    except QbhubError as exc:
        click.echo(f"qbhub: error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("qbhub: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("\nqbhub: interrupted", err=True)
        return 130
    except OSError as exc:
        if os.environ.get("QBHUB_DEBUG"):
            raise
        click.echo(
            f"qbhub: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True
        )
        return 6
    except Exception as exc:
        if os.environ.get("QBHUB_DEBUG"):
            raise
        click.echo(
            f"qbhub: internal error: {type(exc).__name__}: {exc} "
            "(set QBHUB_DEBUG=1 for a traceback, and please report it)",
            err=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
