"""`qbhub diff`: compare an archived volume with a local file or device, list differing ranges.

This lets a user check an incremental chain for themselves: after a backup, `qbhub diff --dest D
NAME PATH` must report the volume identical to the snapshot it was taken from (or list exactly
the ranges written since). Only the local side is read; from the archive only tree pages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import DifferenceFound, NotFoundError
from ..safety.names import check_session_id, check_volume_name
from .context import archive_options, cli_state
from .format import human_bytes

SHOWN_RANGES = 20


def diff_text(r: dict[str, Any]) -> str:
    """Human text for a comparison result."""
    head = f"{r['volume']} in session {r['session']} vs {r['path']}: "
    if r["identical"]:
        return head + f"identical ({human_bytes(r['size_archived'])})"
    lines = [head + f"{r['differing_count']} differing ranges, {human_bytes(r['differing_bytes'])}"]
    if r["size_archived"] != r["size_local"]:
        lines.append(f"  size: archived {r['size_archived']}, local {r['size_local']}")
    for offset, length in r["differing_ranges"][:SHOWN_RANGES]:
        lines.append(f"  offset {offset:#x}, {length} bytes")
    if r["differing_count"] > SHOWN_RANGES:
        lines.append(f"  ... and {r['differing_count'] - SHOWN_RANGES} more (--json lists them)")
    return "\n".join(lines)


@click.command("diff")
@archive_options
@click.argument("name")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--session", help="Compare with this session (default: the newest holding NAME).")
@click.option(
    "--exit-status", is_flag=True, help="Exit 9 when the volumes differ (0 when identical)."
)
def diff(
    dest: str,
    engine: str,
    passphrase_file: Path | None,
    json_output: bool,
    name: str,
    path: Path,
    session: str | None,
    exit_status: bool,
) -> None:
    """Compare archived volume NAME with the local file or device PATH.

    Lists the byte ranges that differ (64 KiB chunk granularity). Nothing is restored: the
    local data is hashed with the archive's key and compared with the stored chunk IDs.
    """
    state = cli_state(json_output)
    check_volume_name(name)
    if session:
        check_session_id(session)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist")
    eng = state.engine(engine, passphrase_file)
    result = eng.compare_volume(state.store(dest), name, path, session=session)
    state.emit(result, diff_text)
    if exit_status and not result["identical"]:
        raise DifferenceFound(f"{name} differs from {path}")
