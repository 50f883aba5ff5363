"""Pruning: drop sessions, then reclaim space by deleting dead packs and repacking sparse ones.

Protocol (crash-safe at every step): (1) write repacked packs and consolidated index objects,
(2) write the new root listing the remaining sessions and only those, (3) delete old packs,
old index objects and any other unreferenced object. A crash before (2) leaves the old archive
whole plus unreferenced objects; a crash after (2) leaves only garbage the next prune removes.
After (2) the local index cache is written from the new index objects' entries (as reading them
back would give), so the next command need not read the whole index again.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass

from qubes_backup_hub.errors import NotFoundError, QbhubError, UsageError
from qubes_backup_hub.progress import Progress

from .index import Index, PackTable
from .index_cache import build_cache, cache_path
from .limits import MAX_PACK
from .pack import ENTRY, PackEntry
from .repository import Repository
from .verify import walk_sessions
from .writer import BlobWriter, split_packs, store_index

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
    """Drop the sessions `drop` and reclaim space. The caller holds the store lock."""
    remaining = [ref for ref in repo.body.sessions if ref.session_id not in set(drop)]
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
            data = memoryview(repo.store.get(name, MAX_PACK))
            for e in entries:
                sealed = bytes(data[e.offset : e.offset + e.length])
                repo.codec.decode(e.type_code, e.blob_id, sealed, e.raw_length)  # authenticate
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
        old_indexes = [n for n, _ in repo.body.indexes]
        repo.body.sessions = remaining
        repo.body.indexes = indexes
        repo.commit()
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
