"""VM-level backup: choose VMs, snapshot their persistent volumes, back them up with settings.

Each VM volume is stored in the archive as the engine volume `VMNAME:VOLUME`; the VMs' settings
travel in the session's (encrypted) metadata as {"vms": [{name, class, settings, volumes}]}.
A volume whose snapshot provider could not tell what changed (no kept view yet, a kept view in
doubt, a pool too full to snapshot: the view's note) is scanned whole; the user is told why on
stderr as the snapshot is taken, and the result's volume entry carries it as "snapshot_note".
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pluggy

from ..engine import Engine, VolumeSource, engine_prepared
from ..errors import NotFoundError, UsageError
from ..platform.base import Platform, VMSettings
from ..snapshot import PlainProvider, SnapshotProvider, VolumeRef
from ..store.base import Store

SKIPPED_CLASSES = ("AdminVM", "DispVM")


log = logging.getLogger(__name__)


def choose_vms(
    platform: Platform,
    names: list[str],
    all_vms: bool,
    exclude: list[str],
    serving: str | None = None,
) -> list[str]:
    """The VMs to back up: those named, or with --all every VM but dom0, DispVMs, those whose
    include_in_backups is off (what `qvm-backup` selects by default) and `serving`, the backup
    VM that stores the archive (a backup of it, into itself, while it writes, is no backup)."""
    vms = {vm.name: vm for vm in platform.list_vms()}
    if names and all_vms:
        raise UsageError("name VMs or give --all, not both")
    if names:
        missing = [n for n in names if n not in vms]
        if missing:
            raise NotFoundError(f"no such VM: {', '.join(missing)}")
        if any(vms[n].klass == "AdminVM" for n in names):
            raise UsageError("dom0 is not backed up by qbhub")
        chosen = list(dict.fromkeys(names))
    elif all_vms:
        chosen = sorted(
            n
            for n, vm in vms.items()
            if vm.klass not in SKIPPED_CLASSES
            and n != serving
            and _included_in_backups(platform, n)
        )
    else:
        raise UsageError("name the VMs to back up, or give --all")
    unknown = [n for n in exclude if n not in vms]
    if unknown:
        raise NotFoundError(f"--exclude names no such VM: {', '.join(unknown)}")
    return [n for n in chosen if n not in set(exclude)]


def _included_in_backups(platform: Platform, name: str) -> bool:
    """The VM's include_in_backups (recorded only when not at its default, which is on)."""
    value = platform.vm_settings(name).properties.get("include_in_backups", True)
    return value not in (False, "False")


def settings_document(settings: VMSettings) -> dict[str, Any]:
    """The part of VMSettings that goes into the archive (name and class travel beside it)."""
    doc = asdict(settings)
    del doc["name"], doc["klass"]
    return doc


def backup_vms(
    platform: Platform,
    engine: Engine,
    store: Store,
    hook: pluggy.HookRelay,
    names: list[str],
    *,
    prepare_in_background: bool = False,
    notice: Callable[[str], None] | None = None,
    session_notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Back up the VMs `names` as one session; return the engine's result plus the VM list.
    `session_notes` (session_notes.make_notes: host, comment, tags) go into its metadata.

    With `prepare_in_background` (the passphrase needs no prompt) the engine unlocks the archive
    while the snapshots are taken. `notice` gets one line per volume scanned whole and why
    (default: stderr).
    """
    archive_id = engine.archive_id(store)
    log.info("backing up %d VMs to %s (archive %s): %s", len(names), store.url, archive_id,
             ", ".join(names))  # fmt: skip
    documents: list[dict[str, Any]] = []
    sources: list[VolumeSource] = []
    providers: list[SnapshotProvider] = []
    notes: dict[str, str] = {}
    try:
        with engine_prepared(engine, store, background=prepare_in_background):
            _snapshot_vms(platform, hook, names, archive_id, providers, sources, documents, notes)
            for archive_name, note in notes.items():
                (notice or _stderr)(f"qbhub: {archive_name}: full scan because {note}")
        result = engine.backup(store, sources, metadata={**(session_notes or {}), "vms": documents})
    except BaseException as exc:
        log.warning("backup failed (%s: %s); snapshots dropped", type(exc).__name__, exc)
        for provider in providers:
            provider.abort()
        raise
    log.info("session %s committed: %d volumes, %s bytes stored", result.get("session"),
             len(result.get("volumes", [])), result.get("bytes_stored"))  # fmt: skip
    for provider in providers:
        provider.commit(result["session"])
    for entry in result.get("volumes", []):
        if notes.get(entry.get("name", "")):
            entry["snapshot_note"] = notes[entry["name"]]
    return {**result, "vms": [d["name"] for d in documents]}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _snapshot_vms(
    platform: Platform,
    hook: pluggy.HookRelay,
    names: list[str],
    archive_id: str,
    providers: list[SnapshotProvider],
    sources: list[VolumeSource],
    documents: list[dict[str, Any]],
    notes: dict[str, str],
) -> None:
    """Take a snapshot of every volume of `names`, appending to the three lists (and the notes
    of views without changed ranges to `notes`) as it goes."""
    for name in names:
        settings = platform.vm_settings(name)
        volumes = []
        for volume in platform.vm_volumes(name):
            archive_name = f"{name}:{volume.name}"
            ref = VolumeRef(name=archive_name, path=volume.path, archive_id=archive_id)
            provider = hook.qbhub_snapshot_provider(volume=ref) or PlainProvider(ref)
            providers.append(provider)
            view = provider.take()
            if view.changed_ranges is None and view.note:
                notes[archive_name] = view.note
            sources.append(
                VolumeSource(
                    archive_name,
                    view.path,
                    view.changed_ranges,
                    view.provider,
                    view.base_session,
                )
            )
            volumes.append({"name": volume.name, "archive_name": archive_name, "size": volume.size})
        documents.append(
            {
                "name": name,
                "class": settings.klass,
                "settings": settings_document(settings),
                "volumes": volumes,
            }
        )
