"""Pruning: drop sessions, then reclaim space by deleting dead packs and repacking sparse ones.

Protocol (crash-safe at every step): (1) write repacked packs and consolidated index objects,
(2) write the new root listing the remaining sessions and only those, (3) delete old packs,
old index objects and any other unreferenced object. A crash before (2) leaves the old archive
whole plus unreferenced objects; a crash after (2) leaves only garbage the next prune removes.
After (2) the local index cache is written from the new index objects' entries (as reading them
back would give), so the next command need not read the whole index again.

Memory: the live set (every blob the kept sessions reach) and the split of the index's entries
into live and dead are sorted runs in temporary files beside the index cache, merged against the
cache's records, which are sorted by ID (`livesets.py`, `extsort.py`); per pack only a few
counters are held. So prune needs no RAM per blob. Without a local index cache (a state
directory that can't be written) the index is held in memory instead, as it always was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Container, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from qubes_backup_hub.errors import IntegrityError, NotFoundError, QbhubError, UsageError
from qubes_backup_hub.progress import Progress

from .index import Index, PackTable, decode_index, encode_index, pad_index
from .index_cache import TMP_MARK, DiskIndex, build_cache, cache_path, open_exact
from .limits import MAX_PACK
from .livesets import grouped_entries, live_ids, whole_cache
from .livesets import split_packs as split_by_pack
from .pack import ENTRY, PackEntry
from .repository import Repository
from .root import SessionRef
from .verify import walk_sessions
from .writer import MAX_INDEX_ENTRIES, BlobWriter, split_packs, store_index

DEFAULT_REPACK_BELOW = 0.75  # repack a pack when under this fraction of its bytes is still live


def encode_entry(e: PackEntry) -> bytes:
    return ENTRY.pack(e.type_code, e.blob_id, e.offset, e.length, e.raw_length)


@dataclass
class PrunePlan:
    """Which packs to keep, repack and delete, with the live entries of each."""

    keep: dict[str, list[PackEntry]]
    repack: dict[str, list[PackEntry]]
    delete: list[str]


def choose_sessions(repo: Repository, sessions: list[str], keep_last: int | None) -> list[str]:
    """Resolve the user's request into session IDs to drop."""
    all_ids = [ref.session_id for ref in repo.body.sessions]
    if keep_last is not None:
        if sessions:
            raise UsageError("give either --session or --keep-last, not both")
        if keep_last < 0:
            raise UsageError("--keep-last must be 0 or more")
        return all_ids[: max(0, len(all_ids) - keep_last)]
    if not sessions:
        raise UsageError("name the sessions to drop (--session ID) or use --keep-last N")
    missing = [s for s in sessions if s not in all_ids]
    if missing:
        raise NotFoundError(f"no such session(s): {', '.join(missing)}")
    return list(dict.fromkeys(sessions))


def plan(repo: Repository, live: set[bytes], sizes: dict[str, int], threshold: float) -> PrunePlan:
    result = PrunePlan({}, {}, [])
    for name, entries in repo.index.by_pack().items():
        alive = [e for e in entries if e.blob_id in live]
        live_bytes = sum(e.length for e in alive)
        size = sizes.get(name, 0)
        if not alive:
            result.delete.append(name)
        elif size and live_bytes < threshold * size:
            result.repack[name] = alive
        else:
            result.keep[name] = alive
    return result


def prune_archive(
    repo: Repository,
    drop: list[str],
    progress: Progress,
    *,
    threshold: float = DEFAULT_REPACK_BELOW,
) -> dict[str, object]:
    """Drop the sessions `drop` and reclaim space. The caller holds the store lock.

    With the local index cache (the usual case) memory does not grow with the archive
    (`livesets.py`); without one (no writable state directory) the index is held in memory.
    """
    dropped = set(drop)
    remaining = [ref for ref in repo.body.sessions if ref.session_id not in dropped]
    disk = whole_cache(repo)
    if disk is None:
        return _prune_in_memory(repo, drop, remaining, progress, threshold)
    assert repo.cache_dir is not None
    try:
        return _prune_on_disk(repo, disk, drop, remaining, progress, threshold, repo.cache_dir)
    finally:
        disk.close()


class LocalTables:
    """The plaintext of the index objects this prune writes, kept in a local unlinked file, so
    that the index cache is written from them without reading them back from storage."""

    def __init__(self, directory: Path) -> None:
        path = directory / f"{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}-tables"
        self.file = open(path, "w+b")  # noqa: SIM115 - closed by close()
        path.unlink()
        self.where: dict[str, tuple[int, int]] = {}

    def put(self, name: str, plain: bytes) -> None:
        at = self.file.seek(0, os.SEEK_END)
        self.file.write(plain)
        self.where[name] = (at, len(plain))

    def get(self, repo: Repository, name: str, raw_length: int) -> list[PackTable]:
        found = self.where.get(name)
        if found is None:  # written by the repacking writer itself: read it back
            return repo.index_object_tables(name, raw_length)
        self.file.flush()
        data = os.pread(self.file.fileno(), found[1], found[0])
        return decode_index(data)

    def close(self) -> None:
        self.file.close()


def _prune_on_disk(
    repo: Repository,
    disk: DiskIndex,
    drop: list[str],
    remaining: list[SessionRef],
    progress: Progress,
    threshold: float,
    directory: Path,
) -> dict[str, object]:
    """Prune with sorted runs on local disk: RAM does not grow with the archive's blobs."""
    keep_ids = {ref.session_id for ref in remaining}
    with live_ids(repo, directory, keep_ids) as live:
        split = split_by_pack(disk, live.sorted(), directory)
    sizes = dict(repo.store.list())
    bytes_before = sum(sizes.values())
    delete = repack = 0
    verdict = bytearray(len(split.names))  # 0 keep, 1 repack, 2 delete
    for k, name in enumerate(split.names):
        if not split.entries[k]:
            continue  # every blob found first elsewhere: unreferenced, removed below
        size = sizes.get(name, 0)
        if not split.live_entries[k]:
            verdict[k], delete = 2, delete + 1
        elif size and split.live_bytes[k] < threshold * size:
            verdict[k], repack = 1, repack + 1
    writer = BlobWriter(repo, known_index=Index(), spill_dir=directory)
    tables = LocalTables(directory)
    progress.start("repack", sum(sizes.get(n, 0) for k, n in enumerate(split.names)
                                 if verdict[k] == 1))  # fmt: skip
    committed = False
    try:
        indexes: list[tuple[str, int]] = []
        part: dict[str, list[PackEntry]] = {}
        count = 0

        def store_part() -> None:
            written = store_index(repo, part)
            if written is not None:
                indexes.append((written[0], written[1]))
                tables.put(written[0], pad_index(encode_index(part), repo.sealer.overhead))

        with split.live:
            for k, entries in grouped_entries(split):
                name = split.names[k]
                if verdict[k] == 1:
                    for e, sealed in live_blobs(repo, name, entries):
                        writer.add_sealed(e.type_code, e.blob_id, sealed, e.raw_length)
                    progress.advance(sizes.get(name, 0))
                    continue
                if part and count + len(entries) > MAX_INDEX_ENTRIES:
                    store_part()
                    part, count = {}, 0
                part[name] = entries
                count += len(entries)
        if part:
            store_part()
        writer.close()
        indexes.extend(writer.write_index())
        old_indexes = commit_pruned_root(repo, remaining, indexes)
        committed = True
    finally:
        writer.abandon()  # after close(): only releases the runs the writer set aside
        if not committed:
            tables.close()
        progress.finish()
    repo.forget_index()
    new_cache: DiskIndex | None = None
    try:  # the local index cache, for the new index objects
        path = cache_path(directory, repo.header.archive_id)
        build_cache(path, repo.header.archive_id, list(repo.body.indexes),
                    lambda name, raw_length: tables.get(repo, name, raw_length))  # fmt: skip
        # None if another command replaced the file meanwhile: the objects are read again.
        new_cache = open_exact(path, repo.header.archive_id, list(repo.body.indexes))
    except (OSError, QbhubError):
        new_cache = None
    finally:
        tables.close()
    try:
        referenced = _referenced(repo, new_cache)
        deleted = repo.store.remove_partial_uploads()
        for name, _size in list(repo.store.list()):
            if name not in referenced:
                repo.store.delete(name)
                deleted += 1
    finally:
        if new_cache is not None:
            new_cache.close()
    bytes_after = sum(size for _, size in repo.store.list())
    return {
        "sessions_removed": drop,
        "sessions_left": len(remaining),
        "packs_repacked": repack,
        "packs_deleted": delete,
        "objects_deleted": deleted,
        "old_index_objects": len(old_indexes),
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
    }


class Referenced(Container[str]):
    """The objects the new root references: its index objects, and the packs they list
    (from the new cache file when there is one, else from the index objects, by pack name)."""

    def __init__(self, indexes: set[str], cache: DiskIndex | None, packs: set[str]) -> None:
        self.indexes, self.cache, self.packs = indexes, cache, packs

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name in self.indexes or name in self.packs:
            return True
        return self.cache is not None and self.cache.has_pack(name)


def commit_pruned_root(
    repo: Repository, remaining: list[SessionRef], indexes: list[tuple[str, int]]
) -> list[str]:
    """Step (2): the new root lists the sessions kept and only the new index objects; return
    the names of the index objects the old root listed (removed in step 3 if unreferenced)."""
    old_indexes = [n for n, _ in repo.body.indexes]
    repo.body.sessions = remaining
    repo.body.indexes = indexes
    repo.commit()
    return old_indexes


def live_blobs(
    repo: Repository, name: str, entries: list[PackEntry]
) -> Iterator[tuple[PackEntry, bytes]]:
    """The sealed live blobs of pack `name` to copy into new packs, each authenticated first.

    A pack that is missing or damaged stops the prune before the new root is written (nothing
    is lost): the message says so and points at `verify`, which names the sessions affected.
    """
    try:
        data = memoryview(repo.store.get(name, MAX_PACK))
        for e in entries:
            sealed = bytes(data[e.offset : e.offset + e.length])
            repo.codec.decode(e.type_code, e.blob_id, sealed, e.raw_length)  # authenticate
            yield e, sealed
    except QbhubError as exc:
        raise IntegrityError(
            f"pack {name}, which holds data of the sessions kept, cannot be read ({exc}); "
            "no session was removed: run 'qbhub verify' to see which sessions are affected"
        ) from exc


def _referenced(repo: Repository, cache: DiskIndex | None) -> Referenced:
    indexes = {n for n, _ in repo.body.indexes}
    packs: set[str] = set()
    if cache is None:  # read the new index objects once more, keeping only pack names
        for name, raw_length in repo.body.indexes:
            packs.update(t.pack for t in repo.index_object_tables(name, raw_length))
    return Referenced(indexes, cache, packs)


def _prune_in_memory(
    repo: Repository,
    drop: list[str],
    remaining: list[SessionRef],
    progress: Progress,
    threshold: float,
) -> dict[str, object]:
    """Prune with the whole index in memory (no local index cache can be written here)."""
    live = walk_sessions(repo, {ref.session_id for ref in remaining}).all()
    sizes = dict(repo.store.list())
    bytes_before = sum(sizes.values())
    todo = plan(repo, live, sizes, threshold)

    kept = Index()
    for name, entries in todo.keep.items():
        kept.add_pack(name, entries)
    writer = BlobWriter(repo, known_index=kept)
    progress.start("repack", sum(sizes.get(n, 0) for n in todo.repack))
    committed = False
    try:
        for name, entries in todo.repack.items():
            for e, sealed in live_blobs(repo, name, entries):
                writer.add_sealed(e.type_code, e.blob_id, sealed, e.raw_length)
            progress.advance(sizes.get(name, 0))
        writer.close()
        for name, entries in writer.new_packs.items():
            kept.add_pack(name, entries)
        indexes = []
        tables: dict[str, list[PackTable]] = {}  # what each new index object holds
        for part in split_packs(kept.by_pack()):
            written = store_index(repo, part)
            if written is not None:
                indexes.append((written[0], written[1]))
                tables[written[0]] = [
                    PackTable(name, b"".join(encode_entry(e) for e in part[name]))
                    for name in sorted(part)
                ]
        old_indexes = commit_pruned_root(repo, remaining, indexes)
        committed = True
    finally:
        if not committed:
            writer.abandon()
        progress.finish()
    repo.index = kept
    if repo.cache_dir is not None:  # the local index cache, for the new index objects
        with suppress(OSError, QbhubError):
            build_cache(
                cache_path(repo.cache_dir, repo.header.archive_id),
                repo.header.archive_id,
                list(repo.body.indexes),
                lambda name, raw_length: tables[name],
            )
    referenced = set(kept.by_pack()) | {n for n, _ in repo.body.indexes}
    deleted = repo.store.remove_partial_uploads()
    for name, _size in list(repo.store.list()):
        if name not in referenced:
            repo.store.delete(name)
            deleted += 1
    bytes_after = sum(size for _, size in repo.store.list())
    return {
        "sessions_removed": drop,
        "sessions_left": len(remaining),
        "packs_repacked": len(todo.repack),
        "packs_deleted": len(todo.delete),
        "objects_deleted": deleted,
        "old_index_objects": len(old_indexes),
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
    }
