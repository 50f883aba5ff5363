"""`qbhub key ...`: the archive key's passphrase, and a copy of the key kept apart."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..errors import NotFoundError, UsageError
from ..passphrase import PassphraseSource
from . import format as fmt
from . import keyfile
from .context import archive_options, cli_state


@click.group()
def key() -> None:
    """Manage the archive key."""


@key.command("change-passphrase")
@archive_options
@click.option(
    "--new-passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the new passphrase from this file (else $QBHUB_NEW_PASSPHRASE, else a prompt).",
)
def change_passphrase(
    dest: str,
    engine: str,
    passphrase_file: Path | None,
    json_output: bool,
    new_passphrase_file: Path | None,
) -> None:
    """Rewrap the archive key under a new passphrase; no data is re-encrypted."""
    state = cli_state(json_output)
    new = PassphraseSource(
        file=new_passphrase_file,
        env_var="QBHUB_NEW_PASSPHRASE",
        prompt="New passphrase: ",
        what="new passphrase",
        file_option="--new-passphrase-file",
    )
    eng = state.engine(engine, passphrase_file, new_passphrase=new)
    result = eng.change_passphrase(state.store(dest))
    state.emit(result, lambda r: f"Passphrase changed ({fmt.archive_line(r)})")


@key.command("export")
@archive_options
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
def export_key(
    dest: str, engine: str, passphrase_file: Path | None, json_output: bool, output: Path
) -> None:
    """Write a copy of the archive's key to OUTPUT (- for standard output), to keep apart.

    The export is the archive key wrapped under the passphrase, in a printable form (numbered
    lines with a check each, to type back from paper). It is useless without the passphrase.
    With it and the passphrase, `qbhub key import` repairs an archive whose root storage damaged
    in its key part, which no passphrase could open otherwise. Export again after a passphrase
    change (the export holds the key as the passphrase wrapped it then).
    """
    state = cli_state(json_output)
    eng = state.engine(engine, passphrase_file)
    result = eng.export_key(state.store(dest))
    text = keyfile.encode(result["archive_id"], result.pop("header"))
    if str(output) == "-":
        click.echo(text, nl=False)
        return
    if output.exists():
        raise UsageError(f"{output} exists: choose a new file")
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    state.emit({**result, "output": str(output)},
               lambda r: f"Key of archive {r['archive_id']} exported to {r['output']}")  # fmt: skip


@key.command("import")
@archive_options
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
def import_key(
    dest: str, engine: str, passphrase_file: Path | None, json_output: bool, source: Path
) -> None:
    """Repair the archive's key from an export made by `qbhub key export` (SOURCE, - for
    standard input). Nothing is written unless the repaired root opens with the passphrase."""
    state = cli_state(json_output)
    try:
        text = sys.stdin.read() if str(source) == "-" else source.read_text(errors="replace")
    except OSError as exc:
        raise NotFoundError(f"cannot read {source}: {exc.strerror}") from None
    _archive_id, header = keyfile.decode(text)
    eng = state.engine(engine, passphrase_file)
    result = eng.import_key(state.store(dest), header)
    state.emit(result, lambda r: f"Key imported: {fmt.archive_line(r)}")
