"""The live set of an archive, with memory that does not grow with it: which blobs some sessions
reach, as a sorted stream of IDs, and the index's records split into live and dead by pack.

Walking: sessions are walked in root order. A volume whose name and geometry match the one
walked last under that name is walked against it: a subtree whose page ID is the same at the
same place was reached (and emitted) already, so only the paths to what changed are read. A
nightly session of a large, slowly changing VM set thus costs the pages it changed, not the
whole tree. Every reached ID (session records, tree pages, chunks) goes to a `RunSorter`: the
result is the sorted, de-duplicated live set, on local disk.

Splitting: the index cache holds the archive's index sorted by ID, each ID once (its first
occurrence in root order, the archive's rule). Merging the live IDs against its records, in one
pass of each, tells every record live or dead; per pack only counters are kept (arrays indexed
by the cache's pack numbers), and the live records go to a second sorter keyed by pack and
offset, which gives them back grouped by pack in offset order: the shape index objects take.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qubes_backup_hub.errors import IntegrityError

from .extsort import RunSorter
from .index_cache import (
    RAW_BITS,
    RAW_MAX,
    RECORD,
    CachedIndex,
    DiskIndex,
    build_cache,
    cache_path,
    covers_digest,
)
from .pack import ENTRY, PackEntry
from .repository import Repository
from .tree import ZERO_ID, Geometry, split_ids

SLICE_RECORDS = 1 << 14  # cache records read at a time
MEMO_PAGES = 1 << 16  # recently reached pages remembered (clones share subtrees)
KEYED = struct.Struct(">II")  # (pack number, offset): the grouping key of a live record


def whole_cache(repo: Repository) -> DiskIndex | None:
    """The index cache file covering every index object the root lists, or None if there can't
    be one here. Index objects the file does not cover yet are folded into it first."""
    if repo.cache_dir is None:
        return None
    try:
        locator = repo.locator
        if not isinstance(locator, CachedIndex):
            return None
        path = cache_path(repo.cache_dir, repo.header.archive_id)
        if len(locator.extra) or locator.disk.layout.covered != len(repo.body.indexes):
            build_cache(path, repo.header.archive_id, list(repo.body.indexes),
                        repo.index_object_tables, base=locator.disk)  # fmt: skip
            repo.forget_index()
        disk = DiskIndex(path)
        if disk.layout.digest != covers_digest(repo.header.archive_id, list(repo.body.indexes)):
            disk.close()
            return None
        return disk
    except OSError:
        repo.forget_index()
        return None


class LiveWalker:
    """Emits into `sorter` every blob ID the given sessions reach (each at least once)."""

    def __init__(self, repo: Repository, sorter: RunSorter) -> None:
        self.repo = repo
        self.sorter = sorter
        self.last: dict[str, tuple[Geometry, bytes]] = {}  # volume name -> last tree walked
        self.memo: set[bytes] = set()  # pages reached lately, whose subtrees are emitted
        self.pages = 0

    def walk(self, session_ids: set[str] | None = None) -> None:
        """Walk the sessions the root lists (those in `session_ids`, all by default)."""
        for ref in self.repo.body.sessions:
            if session_ids is not None and ref.session_id not in session_ids:
                continue
            self.sorter.add(ref.record)
            for volume in self.repo.session_record(ref).volumes:
                geometry, tree = volume.geometry, volume.tree_id
                before = self.last.get(volume.name)
                base = before[1] if before is not None and before[0] == geometry else None
                self._page(tree, base, geometry, geometry.height, 0)
                self.last[volume.name] = (geometry, tree)

    def _page(
        self, page: bytes, base: bytes | None, geometry: Geometry, level: int, index: int
    ) -> None:
        if page in (ZERO_ID, base) or page in self.memo:
            return
        count = geometry.children(level, index)
        entries = split_ids(self.repo.load_page(page, level, count))
        self.sorter.add(page)
        self.pages += 1
        olds: list[bytes | None] = [None] * len(entries)
        if base is not None and base != ZERO_ID:
            olds = list(split_ids(self.repo.load_page(base, level, count)))
        if level == 0:
            for chunk, old in zip(entries, olds, strict=True):
                if chunk != ZERO_ID and chunk != old:
                    self.sorter.add(chunk)
        else:
            for k, (child, old) in enumerate(zip(entries, olds, strict=True)):
                self._page(child, old, geometry, level - 1, index * geometry.fanout + k)
        if len(self.memo) >= MEMO_PAGES:
            self.memo.clear()
        self.memo.add(page)


def live_ids(repo: Repository, directory: Path, session_ids: set[str] | None) -> RunSorter:
    """A sorter holding every blob ID the sessions reach; iterate `sorted()` once."""
    sorter = RunSorter(directory, 32)
    try:
        LiveWalker(repo, sorter).walk(session_ids)
    except BaseException:
        sorter.close()
        raise
    return sorter


def cache_records(disk: DiskIndex) -> Iterator[tuple[bytes, int, int, int, int]]:
    """Every record of an index cache file, in ID order: (ID, pack number, offset, length,
    type << 28 | raw length), read in slices."""
    layout = disk.layout
    for start in range(0, layout.records, SLICE_RECORDS):
        n = min(SLICE_RECORDS, layout.records - start)
        raw = os.pread(disk.fd, n * RECORD.size, layout.records_at + start * RECORD.size)
        if len(raw) != n * RECORD.size:
            raise IntegrityError("the index cache is truncated")
        yield from RECORD.iter_unpack(raw)


@dataclass
class PackSplit:
    """Per pack of the cache (by its number): entries, live entries, live sealed bytes; and the
    live entries themselves in a sorter keyed by (pack number, offset)."""

    names: list[str]
    ends: array[int]
    entries: array[int]
    live_entries: array[int]
    live_bytes: array[int]
    live: RunSorter
    dead_entries: int = 0
    missing: list[bytes] = field(default_factory=list)  # live IDs the index lacks (a few shown)


def split_packs(disk: DiskIndex, live: Iterator[bytes], directory: Path) -> PackSplit:
    """Merge the sorted live IDs against the cache's records (both sorted by ID)."""
    names: list[str] = []
    ends = array("Q")
    for name, end in disk.iter_packs():
        names.append(name)
        ends.append(end)
    packs = len(names)
    split = PackSplit(
        names,
        ends,
        array("Q", bytes(8 * packs)),
        array("Q", bytes(8 * packs)),
        array("Q", bytes(8 * packs)),
        RunSorter(directory, KEYED.size + ENTRY.size),
    )
    want = next(live, None)
    for blob_id, pack, offset, length, packed in cache_records(disk):
        if pack >= packs:
            raise IntegrityError("the index cache names a pack it does not hold")
        split.entries[pack] += 1
        while want is not None and want < blob_id:
            if len(split.missing) < 8:
                split.missing.append(want)
            want = next(live, None)
        if want != blob_id:
            split.dead_entries += 1
            continue
        want = next(live, None)
        split.live_entries[pack] += 1
        split.live_bytes[pack] += length
        type_code, raw_length = packed >> RAW_BITS, packed & RAW_MAX
        split.live.add(
            KEYED.pack(pack, offset) + ENTRY.pack(type_code, blob_id, offset, length, raw_length)
        )
    return split


def grouped_entries(split: PackSplit) -> Iterator[tuple[int, list[PackEntry]]]:
    """The live entries by pack number (ascending, i.e. by pack name), each in offset order."""
    current = -1
    entries: list[PackEntry] = []
    for record in split.live.sorted():
        pack, _ = KEYED.unpack_from(record)
        if pack != current and entries:
            yield current, entries
            entries = []
        current = pack
        entries.append(PackEntry(*ENTRY.unpack_from(record, KEYED.size)))
    if entries:
        yield current, entries
