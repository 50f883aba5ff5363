"""Archive-wide commands: init, list, verify, prune."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import IntegrityError, NotFoundError, UsageError
from ..retention import Decision, decide, make_rules
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
@click.option(
    "--settings", is_flag=True, help="Show the VM settings the session (default: newest) holds."
)
def list_cmd(
    dest: str,
    engine: str,
    passphrase_file: Path | None,
    json_output: bool,
    session: str | None,
    settings: bool,
) -> None:
    """Show sessions: when, where and by which engine, comment and tags, VMs, volumes with their
    sizes, and the bytes each read and stored."""
    state = cli_state(json_output)
    if session:
        check_session_id(session)
    eng = state.engine(engine, passphrase_file)
    if settings:
        state.emit(eng.session_settings(state.store(dest), session), fmt.settings_text)
        return
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


KEEP_EVERY_SESSION = 1 << 40
RETENTION_HELP = """Drop sessions and reclaim the space only they used (sparse packs are repacked).

\b
Name sessions with --session, or give retention rules; a session is kept if
any rule keeps it, and dropped otherwise:
  --keep-last N       the N newest sessions
  --keep-within SPAN  every session made within SPAN before the newest one
                      (h hours, d days, w weeks, m months of 31 days, y years
                      of 365 days: 2d, 12h, 6m)
  --keep-hourly N, --keep-daily N, --keep-weekly N, --keep-monthly N,
  --keep-yearly N     the newest session of each of the N most recent hours,
                      days, ISO weeks (Monday first), months or years that
                      have a session, in local time ($TZ)

Each rule counts its periods on its own: a session kept by --keep-daily still
counts as its week's for --keep-weekly. Newer means committed later (the
archive's order), whatever time a session's ID shows. --dry-run shows what would be dropped
and why each other session stays. A prune that would drop every session is
refused unless --delete-all says that is meant.
"""


@click.command(help=RETENTION_HELP)
@archive_options
@click.option("--session", "sessions", multiple=True, help="Drop this session (repeatable).")
@click.option("--keep-last", type=int, default=None, metavar="N", help="Keep the N newest.")
@click.option("--keep-within", default=None, metavar="SPAN", help="Keep those within SPAN.")
@click.option("--keep-hourly", type=int, default=None, metavar="N", help="Keep N hourly.")
@click.option("--keep-daily", type=int, default=None, metavar="N", help="Keep N daily.")
@click.option("--keep-weekly", type=int, default=None, metavar="N", help="Keep N weekly.")
@click.option("--keep-monthly", type=int, default=None, metavar="N", help="Keep N monthly.")
@click.option("--keep-yearly", type=int, default=None, metavar="N", help="Keep N yearly.")
@click.option("--dry-run", is_flag=True, help="Show what would be dropped and why; change nothing.")
@click.option("--delete-all", is_flag=True, help="Allow a prune that drops every session.")
def prune(
    dest: str,
    engine: str,
    passphrase_file: Path | None,
    json_output: bool,
    sessions: tuple[str, ...],
    dry_run: bool,
    delete_all: bool,
    **keep: Any,
) -> None:
    state = cli_state(json_output)
    for s in sessions:
        check_session_id(s)
    if sessions:  # sessions named here win over the rules a profile supplies
        ctx = click.get_current_context()
        keep = {
            name: value
            for name, value in keep.items()
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT_MAP
        }
    rules = make_rules(**{name.removeprefix("keep_"): value for name, value in keep.items()})
    if sessions and rules.given():
        raise UsageError("give either --session or retention rules (--keep-*), not both")
    if not sessions and not rules.given():
        raise UsageError("name the sessions to drop (--session ID) or give --keep-* rules")
    eng = state.engine(engine, passphrase_file)
    store = state.store(dest)
    listed = [s["session"] for s in eng.list_sessions(store, session=None)["sessions"]]
    if sessions:
        missing = [s for s in sessions if s not in listed]
        if missing:
            raise NotFoundError(f"no such session(s): {', '.join(missing)}")
        named = set(sessions)
        decision = Decision(
            keep={s: ["not named"] for s in reversed(listed) if s not in named},
            drop=[s for s in listed if s in named],
        )
    else:
        decision = decide(listed, rules)
    if listed and not decision.keep and not delete_all:
        raise UsageError(
            f"this prune would drop every session ({len(listed)}); "
            "add --delete-all if that is what you mean"
        )
    plan = {"dry_run": dry_run, **decision.as_dict(), "order": listed}
    if dry_run:
        state.emit(plan, fmt.prune_plan_text)
        return
    # Nothing to drop still reclaims what interrupted backups left: keep every session, then
    # including any a backup commits meanwhile.
    result = (
        eng.prune(store, sessions=decision.drop, keep_last=None)
        if decision.drop
        else eng.prune(store, sessions=[], keep_last=KEEP_EVERY_SESSION)
    )
    state.emit({**result, **plan}, fmt.prune_text)


def archive_totals(listing: dict[str, Any]) -> dict[str, Any]:
    """What an archive holds in all, from a list_sessions result (any engine): sessions, VMs,
    volumes, the bytes the sessions describe (original), read, added, and the archive's size."""
    sessions = listing["sessions"]
    volumes = {v["name"] for s in sessions for v in s.get("volumes", [])}
    vms = {vm for s in sessions for vm in s.get("vms", [])}
    original = sum(v.get("size", 0) for s in sessions for v in s.get("volumes", []))
    newest = sessions[-1] if sessions else None
    archive = listing.get("archive_bytes", 0)
    return {
        **{k: v for k, v in listing.items() if k not in ("sessions", "human")},
        "sessions": len(sessions),
        "first_session": sessions[0]["session"] if sessions else None,
        "newest_session": newest["session"] if newest else None,
        "vms": sorted(vms),
        "volumes": len(volumes),
        "original_bytes": original,
        "newest_bytes": sum(v.get("size", 0) for v in newest["volumes"]) if newest else 0,
        "read_bytes": sum(s.get("bytes_read", 0) for s in sessions),
        "added_bytes": sum(s.get("bytes_stored", 0) for s in sessions),
        "archive_bytes": archive,
        "saving": round(1 - archive / original, 4) if original else 0.0,
    }


@click.command()
@archive_options
def info(dest: str, engine: str, passphrase_file: Path | None, json_output: bool) -> None:
    """The archive's totals: sessions, VMs, volumes; the bytes all sessions describe (original),
    what the newest one describes, what backups read and added, and what the archive takes on
    storage after deduplication and compression (as Borg's `info` sums them)."""
    state = cli_state(json_output)
    eng = state.engine(engine, passphrase_file)
    state.emit(archive_totals(eng.list_sessions(state.store(dest), session=None)), fmt.info_text)
