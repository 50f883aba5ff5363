"""Human-readable renderings of command results."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any

from ..progress import human_bytes
from ..safety.text import shown

Renderer = Callable[[dict[str, Any]], str]


def engine_text(render: Renderer) -> Renderer:
    """Use the engine's own rendering (`human` in its result) where it gives one."""

    @wraps(render)
    def wrapper(r: dict[str, Any]) -> str:
        human = r.get("human")
        return human if isinstance(human, str) else render(r)

    return wrapper


def archive_line(r: dict[str, Any]) -> str:
    note = " (first use of this archive on this machine)" if r.get("first_contact") else ""
    return f"archive {r['archive_id']}, generation {r['generation']}, updated {r['updated']}{note}"


@engine_text
def init_text(r: dict[str, Any]) -> str:
    lines = [
        f"Created archive at {r['url']}",
        f"  archive ID {r['archive_id']}, encryption {r['encryption']}, "
        f"chunk size {human_bytes(r['chunk_size'])}",
    ]
    if r["encryption"] != "none":
        lines.append(
            "  The archive and its passphrase are all a restore needs: keep the passphrase safe."
        )
    else:
        lines.append("  WARNING: encryption is off; anyone with the archive can read and alter it.")
    return "\n".join(lines)


def volume_line(v: dict[str, Any]) -> str:
    return (
        f"  {v['name']}: {human_bytes(v['size'])}, read {human_bytes(v['bytes_read'])} "
        f"({v['provider']}), {v['chunks_new']} new chunks, stored {human_bytes(v['bytes_stored'])}"
    ) + (f"\n    ({v['snapshot_note']})" if v.get("snapshot_note") else "")


@engine_text
def backup_text(r: dict[str, Any]) -> str:
    lines = [f"Session {r['session']} committed ({archive_line(r)})"]
    lines += [volume_line(v) for v in r["volumes"]]
    reused = (
        f", {r['packs_reused']} packs reused from an interrupted run" if r["packs_reused"] else ""
    )
    lines.append(f"  added {human_bytes(r['bytes_stored'])} to the archive{reused}")
    return "\n".join(lines)


@engine_text
def restore_text(r: dict[str, Any]) -> str:
    return (
        f"Restored {r['volume']} from session {r['session']} to {r['target']}: "
        f"{human_bytes(r['size'])} ({human_bytes(r['bytes_written'])} of data written)"
    )


@engine_text
def session_line(s: dict[str, Any]) -> str:
    """One session: ID, when, where, engine, bytes read and stored, tags (what is known)."""
    parts = [s["session"]]
    if s.get("finished") or s.get("started"):
        parts.append(str(s.get("finished") or s.get("started")))
    if s.get("host"):
        parts.append(f"on {s['host']}")
    if s.get("engine"):
        parts.append(s["engine"])
    if "bytes_read" in s:
        parts.append(f"read {human_bytes(s['bytes_read'])}")
    parts.append(f"stored {human_bytes(s['bytes_stored'])}")
    if s.get("tags"):
        parts.append("[" + ", ".join(s["tags"]) + "]")
    return "  ".join(parts)


def list_text(r: dict[str, Any]) -> str:
    lines = [
        archive_line(r),
        f"{len(r['sessions'])} sessions, archive size {human_bytes(r['archive_bytes'])}",
    ]
    for s in r["sessions"]:
        lines.append(session_line(s))
        if s.get("comment"):
            lines.append(f'    "{s["comment"]}"')
        if s.get("vms"):
            lines.append(f"    VMs: {', '.join(s['vms'])}")
        for v in s["volumes"]:
            lines.append(
                f"    {v['name']:<32} {human_bytes(v['size']):>10}  "
                f"stored {human_bytes(v['bytes_stored'])}"
            )
    return "\n".join(lines)


@engine_text
def verify_text(r: dict[str, Any]) -> str:
    text = (
        f"Archive OK ({r['mode']} verify): {r['sessions']} sessions, {r['tree_pages']} tree pages, "
        f"{r['chunks_referenced']} chunks referenced, {r['packs']} packs"
    )
    if "blobs_verified" in r:
        done = human_bytes(r["bytes_verified"])
        text += f", {r['blobs_verified']} blobs ({done}) authenticated and re-hashed"
    if r["unreferenced_objects"]:
        text += (
            f"\n  {r['unreferenced_objects']} unreferenced objects (left by an interrupted backup; "
            "the next backup reuses them, prune removes them)"
        )
    return text


@engine_text
def prune_text(r: dict[str, Any]) -> str:
    removed = ", ".join(r["sessions_removed"]) or "none"
    return (
        f"Removed sessions: {removed}; {r['sessions_left']} left\n"
        f"  packs deleted {r['packs_deleted']}, repacked {r['packs_repacked']}, "
        f"objects removed {r['objects_deleted']}\n"
        f"  archive size {human_bytes(r['bytes_before'])} -> {human_bytes(r['bytes_after'])}"
    )


def prune_plan_text(r: dict[str, Any]) -> str:
    """A prune's decision, newest first: what stays (and which rules keep it), what goes."""
    drop = r["drop"]
    if r["dry_run"]:
        head = f"Would drop {len(drop)} of {len(drop) + len(r['keep'])} sessions (dry run)"
    else:
        head = f"Nothing to prune: every one of the {len(r['keep'])} sessions is kept"
    lines = [head]
    kept = {k["session"]: ", ".join(k["reasons"]) for k in r["keep"]}
    skewed = set(r.get("out_of_order", []))
    for session in reversed(r.get("order") or [*kept, *drop]):
        verdict, why = ("keep", kept[session]) if session in kept else ("drop", "no rule keeps it")
        note = (
            "  (its time is after a later session's: was the clock ahead?)"
            if session in skewed
            else ""
        )
        lines.append(f"  {session:<20} {verdict}  {why}{note}")
    return "\n".join(lines)


def settings_text(r: dict[str, Any]) -> str:
    """The VM settings a session holds, VM by VM (text from the archive, shown printable)."""
    lines = [f"Session {r['session']}: {len(r['vms'])} VMs"]
    for vm in r["vms"]:
        if not isinstance(vm, dict):
            continue
        lines.append(f"{shown(str(vm.get('name')))} ({shown(str(vm.get('class')))})")
        settings = vm.get("settings")
        settings = settings if isinstance(settings, dict) else {}
        for section, label in (("properties", "property"), ("features", "feature")):
            values = settings.get(section)
            if isinstance(values, dict):
                for key, value in sorted(values.items()):
                    lines.append(f"    {label} {shown(str(key))} = {shown(str(value))}")
        for section in ("tags", "devices", "firewall"):
            values = settings.get(section)
            if isinstance(values, list) and values:
                shown_values = ", ".join(shown(json.dumps(v), 200) for v in values)
                lines.append(f"    {section}: {shown_values}")
        volumes = vm.get("volumes")
        for volume in volumes if isinstance(volumes, list) else []:
            if isinstance(volume, dict) and isinstance(volume.get("size"), int):
                lines.append(
                    f"    volume {shown(str(volume.get('name')))}: {human_bytes(volume['size'])}"
                )
    return "\n".join(lines)


def info_text(r: dict[str, Any]) -> str:
    lines = [
        f"archive {r.get('archive_id', '?')}"
        + (f", generation {r['generation']}" if "generation" in r else ""),
        f"{r['sessions']} sessions ({r['first_session'] or '-'} .. {r['newest_session'] or '-'}), "
        f"{len(r['vms'])} VMs, {r['volumes']} volumes",
        f"  original size (every session)  {human_bytes(r['original_bytes']):>12}",
        f"  newest session                 {human_bytes(r['newest_bytes']):>12}",
        f"  read by backups                {human_bytes(r['read_bytes']):>12}",
        f"  added by backups               {human_bytes(r['added_bytes']):>12}",
        f"  archive on storage             {human_bytes(r['archive_bytes']):>12}"
        f"  ({r['saving'] * 100:.1f}% saved by deduplication and compression)",
    ]
    if r["vms"]:
        lines.append(f"  VMs: {', '.join(r['vms'])}")
    return "\n".join(lines)
