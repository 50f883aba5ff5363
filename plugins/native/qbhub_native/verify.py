"""Verifying an archive: every session record, every tree page, every referenced blob.

Quick: authenticate the root, indexes, session records and all tree pages, and check that every
referenced chunk is indexed and every indexed pack exists with a plausible size. Full: also read
every pack whole, authenticate and decompress every indexed blob, and re-hash it against its ID.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from qubes_backup_hub.errors import IntegrityError
from qubes_backup_hub.progress import Progress

from .blob import BlobType
from .limits import MAX_PACK
from .pack import FOOTER, PackEntry, pack_name, parse_trailer, trailer_location
from .repository import Repository
from .tree import ZERO_ID, Geometry, split_ids


@dataclass
class Reachable:
    """Blob IDs reachable from a set of sessions, by kind."""

    records: set[bytes] = field(default_factory=set)
    pages: set[bytes] = field(default_factory=set)
    chunks: set[bytes] = field(default_factory=set)

    def all(self) -> set[bytes]:
        return self.records | self.pages | self.chunks


def walk_sessions(repo: Repository, session_ids: set[str] | None = None) -> Reachable:
    """Authenticate the records and tree pages of the sessions (all by default); collect IDs.

    Shared subtrees are read once.
    """
    seen = Reachable()
    for ref in repo.body.sessions:
        if session_ids is not None and ref.session_id not in session_ids:
            continue
        seen.records.add(ref.record)
        for volume in repo.session_record(ref).volumes:
            _walk(repo, volume.tree_id, volume.geometry, volume.geometry.height, 0, seen)
    return seen


def _walk(
    repo: Repository, page_id: bytes, geometry: Geometry, level: int, index: int, seen: Reachable
) -> None:
    if page_id == ZERO_ID or page_id in seen.pages:
        return
    seen.pages.add(page_id)
    entries = repo.load_page(page_id, level, geometry.children(level, index))
    children = split_ids(entries)
    if level == 0:
        seen.chunks.update(c for c in children if c != ZERO_ID)
        return
    for k, child in enumerate(children):
        _walk(repo, child, geometry, level - 1, index * geometry.fanout + k, seen)


def verify_archive(repo: Repository, *, quick: bool, progress: Progress) -> dict[str, object]:
    reachable = walk_sessions(repo)
    for chunk in reachable.chunks:
        loc = repo.index.get(chunk)
        if loc is None or loc.type_code != BlobType.DATA:
            raise IntegrityError(f"chunk {chunk.hex()[:16]} is referenced but not in the index")
    sizes = dict(repo.store.list())
    packs = repo.index.by_pack()
    for name, entries in packs.items():
        end = max(e.offset + e.length for e in entries)
        if name not in sizes:
            raise IntegrityError(f"pack {name} is missing from the store")
        if sizes[name] < end:
            raise IntegrityError(f"pack {name} is truncated ({sizes[name]} bytes, needs {end})")
    result: dict[str, object] = {
        "sessions": len(repo.body.sessions),
        "tree_pages": len(reachable.pages),
        "chunks_referenced": len(reachable.chunks),
        "packs": len(packs),
        "unreferenced_objects": sum(
            1 for n in sizes if n not in packs and n not in dict(repo.body.indexes)
        ),
        "mode": "quick" if quick else "full",
    }
    if quick:
        return result
    total = sum(sizes[name] for name in packs)
    progress.start("verify", total)
    blobs = 0
    with ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="qbhub-verify") as pool:
        for checked, size in pool.map(lambda item: _verify_pack(repo, *item), _sized(packs, sizes)):
            blobs += checked
            progress.advance(size)
    progress.finish()
    result["blobs_verified"] = blobs
    result["bytes_verified"] = total
    return result


def _sized(
    packs: dict[str, list[PackEntry]], sizes: dict[str, int]
) -> Iterator[tuple[str, list[PackEntry], int]]:
    for name, entries in packs.items():
        yield name, entries, sizes[name]


def _verify_pack(
    repo: Repository, name: str, entries: list[PackEntry], size: int
) -> tuple[int, int]:
    raw = repo.store.get(name, MAX_PACK)
    if pack_name(raw) != name:
        raise IntegrityError(f"pack {name} does not hash to its name (damaged or truncated)")
    data = memoryview(raw)
    offset, length = trailer_location(len(raw), raw[-FOOTER.size :], name)
    listed = set(parse_trailer(repo.sealer, raw[offset : offset + length], name, len(raw)))
    if not set(entries) <= listed:
        raise IntegrityError(f"pack {name} does not hold what the index says it holds")
    for e in entries:
        raw = repo.codec.decode(
            e.type_code, e.blob_id, data[e.offset : e.offset + e.length], e.raw_length
        )
        repo.codec.check_id(e.type_code, e.blob_id, raw)
    return len(entries), size
