"""Archive-wide commands: init, list, verify, prune."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import IntegrityError, UsageError
from ..safety.names import check_session_id
from . import format as fmt
from .context import archive_options, cli_state


@click.command()
@archive_options
@click.option(
    "--encryption",
    type=click.Choice(["on", "off"]),
    default="on",
    show_default=True,
    help="Encrypt and authenticate everything (off: checksums only, readable by anyone).",
)
@click.option("--chunk-size", type=int, default=None, help="Chunk size in bytes (default 65536).")
@click.option(
    "--compression-level",
    type=click.IntRange(0, 19),
    default=1,
    show_default=True,
    help="zstd level (1 is fast, 19 is small); 0 stores chunks uncompressed.",
)
@click.option(
    "--append-only",
    is_flag=True,
    help="Make the storage side keep everything it is sent (only prune may delete); for "
    "engines with the append-only capability.",
)
def init(
    dest: str,
    engine: str | None,
    passphrase_file: Path | None,
    json_output: bool,
    encryption: str,
    chunk_size: int | None,
    compression_level: int,
    append_only: bool,
) -> None:
    """Create a new, empty archive at --dest."""
    state = cli_state(json_output)
    options: dict[str, Any] = {"chunk_size": chunk_size, "compression_level": compression_level}
    if append_only:
        if "append-only" not in state.registry.engine(engine or "native").capabilities:
            raise UsageError(f"the {engine or 'native'} engine cannot make append-only archives")
        options["append_only"] = True
    eng = state.engine(engine, passphrase_file, options=options)
    state.emit(eng.init_archive(state.store(dest), encryption=encryption == "on"), fmt.init_text)


@click.command("list")
@archive_options
@click.option("--session", help="Show only this session.")
def list_cmd(
    dest: str, engine: str, passphrase_file: Path | None, json_output: bool, session: str | None
) -> None:
    """Show sessions with their volumes, sizes and the bytes each stored."""
    state = cli_state(json_output)
    if session:
        check_session_id(session)
    eng = state.engine(engine, passphrase_file)
    state.emit(eng.list_sessions(state.store(dest), session=session), fmt.list_text)


@click.command()
@archive_options
@click.option("--quick", is_flag=True, help="Check metadata and pack presence only; read no data.")
def verify(
    dest: str, engine: str, passphrase_file: Path | None, json_output: bool, quick: bool
) -> None:
    """Authenticate the archive: by default every chunk of every session is read and re-hashed.

    Every damaged object is reported with the sessions and volumes it affects; then the command
    exits 3 with a one-line summary on stderr.
    """
    state = cli_state(json_output)
    eng = state.engine(engine, passphrase_file)
    result = eng.verify(state.store(dest), quick=quick)
    damaged = result.get("damaged_count") or len(result.get("damaged") or [])
    state.emit(result, damage_text if damaged else fmt.verify_text)
    if damaged:
        raise IntegrityError(damage_summary(result))


def damage_text(r: dict[str, Any]) -> str:
    """The human listing of a verify that found damage: one object per line, then the rest."""
    lines = [f"Archive DAMAGED ({r['mode']} verify): {r.get('damaged_count', 0)} damaged objects"]
    for d in r.get("damaged") or []:
        where = ", ".join(d["sessions"]) or "no session"
        volumes = f" (volumes {', '.join(d['volumes'])})" if d["volumes"] else ""
        lines.append(f"  {d['object']} {d['problem']}; affects {where}{volumes}")
    more = r.get("damaged_unlisted")
    if more:
        lines.append(
            f"  ... and {more['count']} more, affecting sessions {', '.join(more['sessions'])}"
        )
    return "\n".join(lines)


def damage_summary(r: dict[str, Any]) -> str:
    """One line: how many objects are damaged and which sessions they affect."""
    sessions: list[str] = []
    for d in [*(r.get("damaged") or []), r.get("damaged_unlisted") or {}]:
        sessions += [s for s in d.get("sessions", []) if s not in sessions]
    shown = ", ".join(sessions[:10]) + (f" and {len(sessions) - 10} more" if sessions[10:] else "")
    affected = f"sessions affected: {shown}" if sessions else "no session affected"
    count = r.get("damaged_count") or len(r.get("damaged") or [])
    return f"verify found {count} damaged object(s); {affected}"


@click.command()
@archive_options
@click.option("--session", "sessions", multiple=True, help="Drop this session (repeatable).")
@click.option("--keep-last", type=int, default=None, help="Drop all but the newest N sessions.")
def prune(
    dest: str,
    engine: str,
    passphrase_file: Path | None,
    json_output: bool,
    sessions: tuple[str, ...],
    keep_last: int | None,
) -> None:
    """Drop sessions and reclaim the space only they used (sparse packs are repacked)."""
    state = cli_state(json_output)
    for s in sessions:
        check_session_id(s)
    eng = state.engine(engine, passphrase_file)
    result = eng.prune(state.store(dest), sessions=list(sessions), keep_last=keep_last)
    state.emit(result, fmt.prune_text)
