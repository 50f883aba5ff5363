"""What every command shares: the registry, options common to commands, and output."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from ..engine import Engine, EngineContext
from ..passphrase import PassphraseSource
from ..progress import Progress
from ..registry import Registry, load_registry
from ..safety.rollback import ArchiveFacts, default_home
from ..store.base import Store
from .profiles import Profile, load_profile

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_LOCK_WAIT = 60.0  # seconds a command waits for another one's archive lock
ROOT_PEEK = 16 << 20  # the largest root read to find the archive's engine


@dataclass
class CliState:
    """Lazily built objects shared by the commands of one invocation."""

    json_output: bool = False
    allow_unencrypted: bool = False
    lock_wait: float = DEFAULT_LOCK_WAIT
    dest: str | None = None
    passphrase_command: str | None = None
    profile: Profile | None = None
    _registry: Registry | None = field(default=None, repr=False)

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = load_registry()
        return self._registry

    def engine(
        self,
        name: str | None,
        passphrase_file: Path | None,
        *,
        new_passphrase: PassphraseSource | None = None,
        options: dict[str, Any] | None = None,
    ) -> Engine:
        context = EngineContext(
            hook=self.registry.pm.hook,
            passphrase=self.passphrase_source(passphrase_file),
            state_dir=default_home(),
            progress=Progress(enabled=None if not self.json_output else False),
            new_passphrase=new_passphrase,
            options=options or {},
            allow_unencrypted=self.allow_unencrypted,
            announce=announce_first_contact,
        )
        return self.registry.engine(name or self.archive_engine()).create(context)

    def archive_engine(self) -> str:
        """The engine of the archive at --dest (the one that claims its root), else native."""
        if self.dest is None:
            return "native"
        store = self.store(self.dest)
        try:
            return self.registry.engine_for_root(store.get_root(ROOT_PEEK))
        finally:
            store.close()

    def passphrase_source(self, passphrase_file: Path | None) -> PassphraseSource:
        """--passphrase-file, else --passphrase-command, else $QBHUB_PASSPHRASE, else a prompt."""
        return PassphraseSource(file=passphrase_file, command=self.passphrase_command)

    def passphrase_prompts(self, passphrase_file: Path | None) -> bool:
        """True if the engine would have to ask for the passphrase on the terminal."""
        return self.passphrase_source(passphrase_file).will_prompt()

    def store(self, url: str) -> Store:
        store = self.registry.open_store(url)
        store.lock_wait = self.lock_wait
        store.on_lock_wait = lambda text: click.echo(f"qbhub: {text}", err=True)
        return store

    def emit(self, result: dict[str, Any], human: Callable[[dict[str, Any]], str]) -> None:
        """Print `result` as JSON (with --json) or as the human text `human` makes of it."""
        if self.json_output:
            # One write: json.dump writes each token apart (277,000 writes, seconds, for a
            # listing of 1,000 sessions).
            sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
        else:
            click.echo(human(result))


def announce_first_contact(facts: ArchiveFacts) -> None:
    """Print the one line that lets a user tell this archive (and which copy of it) apart."""
    click.echo(f"qbhub: first contact with {facts.line()}", err=True)


def _set_state(attribute: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value is not None:
            setattr(ctx.ensure_object(CliState), attribute, value)
        return value

    return callback


def _take_dest(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--dest into the state; say so when $QBHUB_DEST overrides the profile's dest."""
    state = ctx.ensure_object(CliState)
    profile = state.profile
    source = ctx.get_parameter_source(param.name or "dest")
    if (
        profile is not None
        and profile.get("dest")
        and value != profile.get("dest")
        and source == click.core.ParameterSource.ENVIRONMENT
    ):
        click.echo(
            f"qbhub: using QBHUB_DEST={value}, not profile {profile.name}'s dest "
            f"{profile.get('dest')}",
            err=True,
        )
    state.dest = value
    return value


def top_command(ctx: click.Context) -> str:
    """The name of the command under `qbhub` that `ctx` runs in (`volume` for `volume backup`)."""
    while ctx.parent is not None and ctx.parent.parent is not None:
        ctx = ctx.parent
    return ctx.info_name or ""


def _apply_profile(ctx: click.Context, _param: click.Parameter, name: str | None) -> None:
    """--profile NAME: the profile's keys become this command's defaults (flags and their
    environment variables still win). Eager: it runs before every other option is read."""
    if not name:
        return
    profile = load_profile(name)
    ctx.ensure_object(CliState).profile = profile
    params = {p.name for p in ctx.command.params if p.name}
    ctx.default_map = {**(ctx.default_map or {}), **profile.defaults_for(top_command(ctx), params)}


def profile_option(func: F) -> F:
    """--profile NAME (or $QBHUB_PROFILE): take defaults from a profile of the config file."""
    return click.option(
        "--profile",
        metavar="NAME",
        envvar="QBHUB_PROFILE",
        is_eager=True,
        expose_value=False,
        callback=_apply_profile,
        help="Take option defaults from profile NAME of ~/.config/qbhub/config.toml "
        "($QBHUB_CONFIG); options given here win.",
    )(func)


def archive_options(func: F) -> F:
    """--dest, --engine, --passphrase-file/-command, --json, --allow-unencrypted, --lock-wait and
    --profile, shared by every archive command. Each has an environment variable
    (QBHUB_DEST, ...): the command line wins, then the environment, then the profile."""
    func = click.option(
        "--lock-wait",
        type=click.FloatRange(0, 86400),
        default=None,
        envvar="QBHUB_LOCK_WAIT",
        expose_value=False,
        callback=_set_state("lock_wait"),
        metavar="SECONDS",
        help=f"Wait this long for another qbhub command's lock (default {DEFAULT_LOCK_WAIT:g}).",
    )(func)
    func = click.option(
        "--allow-unencrypted",
        is_flag=True,
        default=None,
        expose_value=False,
        callback=_set_state("allow_unencrypted"),
        help="Accept an archive that is not encrypted and authenticated under a passphrase. "
        "Without it such an archive is refused: storage could have swapped it in.",
    )(func)
    func = click.option("--json", "json_output", is_flag=True, help="Print machine-readable JSON.")(
        func
    )
    func = click.option(
        "--passphrase-command",
        metavar="CMD",
        envvar="QBHUB_PASSPHRASE_COMMAND",
        expose_value=False,
        callback=_set_state("passphrase_command"),
        help="Run CMD (no shell; split like a shell would) and use the first line it prints as "
        "the passphrase, as BORG_PASSCOMMAND does (e.g. `pass show qbhub`).",
    )(func)
    func = click.option(
        "--passphrase-file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="QBHUB_PASSPHRASE_FILE",
        help="Read the passphrase from this file (else --passphrase-command, else "
        "$QBHUB_PASSPHRASE, else a prompt).",
    )(func)
    func = click.option(
        "--engine",
        default=None,
        envvar="QBHUB_ENGINE",
        help="Backup engine (see `qbhub engines`); only `init` needs it (default native): "
        "later commands use the engine that wrote the archive.",
    )(func)
    func = click.option(
        "--dest",
        required=True,
        metavar="URL",
        envvar="QBHUB_DEST",
        callback=_take_dest,
        help="The archive: a directory path (or file://PATH), or qubes://BACKUPVM/NAME.",
    )(func)
    return profile_option(func)


def cli_state(json_output: bool) -> CliState:
    """The CliState of this invocation, with --json applied."""
    state = click.get_current_context().ensure_object(CliState)
    state.json_output = state.json_output or json_output
    return state
