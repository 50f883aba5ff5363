"""`qbhub key ...`: managing the archive key's passphrase."""

from __future__ import annotations

from pathlib import Path

import click

from ..passphrase import PassphraseSource
from . import format as fmt
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
