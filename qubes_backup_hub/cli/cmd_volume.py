"""`qbhub volume ...`: back up and restore plain files and block devices."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import click

from ..engine import VolumeSource, engine_prepared
from ..errors import NotFoundError, QbhubError, StoreError, UsageError
from ..progress import human_bytes
from ..safety.names import check_session_id, check_volume_name
from ..session_notes import make_notes
from ..snapshot import PlainProvider, SnapshotProvider, VolumeRef
from . import format as fmt
from .context import archive_options, cli_state


@click.group()
def volume() -> None:
    """Back up and restore volumes: image files and block devices."""


def parse_volume_arg(arg: str) -> tuple[str, str]:
    """PATH[=NAME] -> (path, name); the default name is the file name, made valid."""
    path, sep, name = arg.rpartition("=")
    if not sep:
        path = arg
        name = re.sub(r"[^A-Za-z0-9._:+-]", "_", Path(arg).name) or "volume"
        if not name[0].isalnum():
            name = "v" + name
    return path, check_volume_name(name[:128])


@volume.command("backup")
@archive_options
@click.option(
    "--no-snapshot",
    is_flag=True,
    help="Read each volume in place and scan it whole (no snapshot provider, no kept view).",
)
@click.option("--comment", metavar="TEXT", help="A note kept with the session (qbhub list).")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="Tag the session (repeatable).")
@click.argument("volumes", nargs=-1, required=True, metavar="PATH[=NAME]...")
def backup(
    dest: str,
    engine: str,
    passphrase_file: Path | None,
    json_output: bool,
    no_snapshot: bool,
    comment: str | None,
    tags: tuple[str, ...],
    volumes: tuple[str, ...],
) -> None:
    """Back up one or more volumes as one session.

    Each PATH is an image file or block device; NAME (default: the file name) is how the
    archive knows it. Only chunks that changed since the volume's previous session are stored.
    A file on btrfs or xfs is snapshotted by reflink (its view kept in a hidden .qbhub-views
    directory beside it) and only the ranges changed since its previous backup are read.
    """
    state = cli_state(json_output)
    session_notes = make_notes(comment, list(tags))
    hook = state.registry.pm.hook
    eng = state.engine(engine, passphrase_file)
    store = state.store(dest)
    archive_id = eng.archive_id(store)
    providers: list[SnapshotProvider] = []
    sources: list[VolumeSource] = []
    notes: dict[str, str] = {}
    try:
        background = not state.passphrase_prompts(passphrase_file)
        with engine_prepared(eng, store, background=background):
            for arg in volumes:
                path, name = parse_volume_arg(arg)
                ref = VolumeRef(name=name, path=path, archive_id=archive_id)
                provider = None if no_snapshot else hook.qbhub_snapshot_provider(volume=ref)
                provider = provider or PlainProvider(ref)
                providers.append(provider)
                view = provider.take()
                notes[name] = view.note
                sources.append(
                    VolumeSource(
                        name, view.path, view.changed_ranges, view.provider, view.base_session
                    )
                )
        result = eng.backup(store, sources, metadata=session_notes)
    except BaseException:
        for provider in providers:
            provider.abort()
        raise
    for provider in providers:
        provider.commit(result["session"])
    for entry in result.get("volumes", []):
        if notes.get(entry.get("name", "")):
            entry["snapshot_note"] = notes[entry["name"]]
    state.emit(result, fmt.backup_text)


@volume.command("restore")
@archive_options
@click.argument("name")
@click.option(
    "--to",
    "target",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to write the volume: a new file, a block device, or - for standard output "
    "(streamed as it authenticates: check the exit status; see below).",
)
@click.option("--session", help="Restore from this session (default: the newest holding NAME).")
@click.option("--overwrite", is_flag=True, help="Replace an existing regular file at --to.")
def restore(
    dest: str,
    engine: str,
    passphrase_file: Path | None,
    json_output: bool,
    name: str,
    target: Path,
    session: str | None,
    overwrite: bool,
) -> None:
    """Restore volume NAME to --to (a sparse file, written only if every chunk authenticates).

    With `--to -` the volume goes to standard output, in order, holes as zeros, each part as it
    authenticates: a later part that fails stops the stream and qbhub exits non-zero, so a
    pipeline must check qbhub's exit status before it trusts what it received.
    """
    state = cli_state(json_output)
    check_volume_name(name)
    if session:
        check_session_id(session)
    if str(target) == "-":
        if json_output:
            raise UsageError("--json and --to - both want standard output: choose one")
        if overwrite:
            raise UsageError("--overwrite means nothing with --to -")
        eng = state.engine(engine, passphrase_file)
        out = sys.stdout.buffer
        sent = 0

        def write(block: bytes) -> None:
            nonlocal sent
            out.write(block)
            sent += len(block)

        try:
            # (no --session: the engine streams the newest session holding NAME)
            size = eng.stream_volume(state.store(dest), session or "", name, write)
            out.flush()
        except OSError as exc:
            # Nothing more can reach standard output (not even Python's flush at exit).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            why = "its reader stopped" if isinstance(exc, BrokenPipeError) else exc.strerror
            raise QbhubError(
                f"standard output took {human_bytes(sent)} of {name}, then failed ({why})"
            ) from None
        click.echo(f"Streamed {name} ({human_bytes(size)}) to standard output", err=True)
        return
    if not target.parent.is_dir():
        raise NotFoundError(f"cannot restore to {target}: directory {target.parent} does not exist")
    eng = state.engine(engine, passphrase_file)
    try:
        result = eng.restore_volume(
            state.store(dest), name, target, session=session, overwrite=overwrite
        )
    except OSError as exc:
        # The engine wrote to a temporary file beside the target (and removed it): the error
        # names the user's target, not that file.
        raise StoreError(f"cannot write {target}: {exc.strerror or exc}") from None
    state.emit(result, fmt.restore_text)
