"""A backup session: every volume through VolumeBackup, then session record, index, root.

Crash safety: packs and the index object are written before the root, so a crash leaves the old
root intact and at most unreferenced packs, which the next session adopts (`reuse_orphan_packs`).

Loss: one listing of the store at the start tells which index objects are gone or too large (read,
they fail the backup: see `check_index_objects`) and which indexed packs are gone or resized
(`exclude_lost_packs`). Their blobs are stored again when met; every volume is then scanned whole
(an incremental would reuse tree pages whose chunks may be lost), and the session's index object
goes first in the root, so the new locations win over the lost ones.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pluggy

from qubes_backup_hub.engine import VolumeSource
from qubes_backup_hub.errors import QbhubError, UsageError
from qubes_backup_hub.progress import Progress

from .backup import VolumeBackup
from .blob import BlobType
from .index_cache import CachedIndex
from .repository import Repository
from .root import SessionRef
from .session import SessionRecord, VolumeRecord
from .writer import BlobWriter


def new_session_id(repo: Repository) -> str:
    """UTC time to the second, with a -N suffix if that ID is taken."""
    base = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    taken = {ref.session_id for ref in repo.body.sessions}
    candidate, n = base, 1
    while candidate in taken:
        candidate, n = f"{base}-{n}", n + 1
    return candidate


def previous_volumes(repo: Repository, names: set[str]) -> dict[str, tuple[str, VolumeRecord]]:
    """For each name, (session ID, record) in the newest session holding it.

    Sessions whose record can't be read are skipped: a volume without a base is scanned whole.
    """
    found: dict[str, tuple[str, VolumeRecord]] = {}
    for ref in reversed(repo.body.sessions):
        if len(found) == len(names):
            break
        try:
            volumes = repo.session_record(ref).volumes
        except QbhubError:
            continue
        for volume in volumes:
            if volume.name in names and volume.name not in found:
                found[volume.name] = (ref.session_id, volume)
    return found


def check_index_objects(repo: Repository, listing: dict[str, int]) -> None:
    """Read each index object the root lists that `listing` shows missing or too large.

    Lookups may come from the local index cache, which still knows what a lost index object
    held; a backup must not commit on top of an index storage lost, so such an object is read,
    and the read fails as it would without the cache (not found, or refused by its size).
    """
    for name, raw_length in repo.body.indexes:
        size = listing.get(name)
        if size is None or size > repo.index_object_bounds(raw_length)[1]:
            repo.index_object_tables(name, raw_length)


def run_session(
    repo: Repository,
    sources: list[VolumeSource],
    hook: pluggy.HookRelay,
    progress: Progress,
    *,
    workers: int | None = None,
    metadata: dict[str, object] | None = None,
) -> tuple[SessionRecord, BlobWriter]:
    """Back up `sources` as one session and commit it. The caller holds the store lock."""
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UsageError("the same volume name is given twice")
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    session_id = new_session_id(repo)
    repo.store.remove_partial_uploads()  # we hold the lock: no other writer is mid-upload
    listing = dict(repo.store.list())
    check_index_objects(repo, listing)
    # A backup sets its own entries aside beside the index cache, if that could be made.
    spill_dir = repo.cache_dir if isinstance(repo.locator, CachedIndex) else None
    writer = BlobWriter(repo, spill_dir=spill_dir)
    lost = writer.exclude_lost_packs(listing)
    previous = {} if lost else previous_volumes(repo, set(names))
    writer.reuse_orphan_packs(repo.locator.packs(), listing)
    # Reads release the GIL, and a full scan is bound by the disk: enough threads to keep several
    # direct reads in flight (measured: 8 threads read 2 GiB 25-30% faster than 4 on 2 cores).
    workers = workers or 2 * (os.cpu_count() or 2) + 4
    records: list[VolumeRecord] = []
    committed = False
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="qbhub-chunk") as pool:
            volume_backup = VolumeBackup(
                repo, writer, pool, progress, max_in_flight=2 * workers + 2
            )
            for source in sources:
                stream = hook.qbhub_open_stream(path=source.path)
                if stream is None:
                    raise UsageError(f"no installed stream plugin can read {source.path}")
                with stream:
                    base_session, base = previous.get(source.name, (None, None))
                    records.append(volume_backup.run(source, stream, base, base_session))
        record = SessionRecord(
            session_id=session_id,
            started=started,
            finished=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            volumes=records,
            metadata=dict(metadata or {}),
        )
        raw = record.encode()
        record_id = writer.add(BlobType.SESSION, raw)
        writer.close()
        indexes = writer.write_index()
        repo.body.sessions.append(SessionRef(session_id, record_id, len(raw), record.finished))
        if writer.blobs_restored:
            repo.body.indexes[:0] = indexes  # their locations replace lost ones
        else:
            repo.body.indexes.extend(indexes)
        repo.commit()
        committed = True
        writer.merge_into_repo()
        return record, writer
    finally:
        if not committed:
            writer.abandon()
