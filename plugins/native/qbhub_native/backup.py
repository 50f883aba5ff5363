"""Backing up one volume: read changed data windows in parallel, hash, dedup, seal, build the tree.

Worker threads read a window (pread releases the GIL), test each chunk for zeros, hash it with
the keyed BLAKE3, and compress+seal the chunks the archive doesn't hold yet (zstd, AES-GCM and
BLAKE3 all release the GIL). The calling thread consumes results in volume order, hands new blobs
to the BlobWriter and assembles leaf pages; pages above the leaves are built at the end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from qubes_backup_hub.directio import BufferPool
from qubes_backup_hub.engine import VolumeSource
from qubes_backup_hub.errors import QbhubError
from qubes_backup_hub.progress import Progress
from qubes_backup_hub.store.base import Bytes
from qubes_backup_hub.stream.base import VolumeStream

from .blob import BlobType
from .repository import Repository
from .scan import WINDOW_CHUNKS, ChunkRanges, Window, data_chunk_ranges, read_windows, scan_ranges
from .session import VolumeRecord
from .tree import ID_BYTES, ZERO_ID, Geometry, build_upper, encode_page, leaf_ids
from .writer import BlobWriter

PREFETCH_THREADS = 4  # previous leaf pages read ahead at once (random reads of the archive)
PREFETCH_AHEAD = 32  # leaves requested ahead of the one being assembled

# (chunk index, ID, sealed blob or None when already known, raw length)
ChunkResult = tuple[int, bytes, Bytes | None, int]


@dataclass
class WindowResult:
    first_chunk: int
    bytes_read: int  # bytes of the chunks processed (gap chunks read through not counted)
    chunks: list[ChunkResult]


class VolumeBackup:
    """Backs up one volume into an open session (a BlobWriter)."""

    def __init__(
        self,
        repo: Repository,
        writer: BlobWriter,
        pool: ThreadPoolExecutor,
        progress: Progress,
        max_in_flight: int,
    ) -> None:
        self.repo = repo
        self.writer = writer
        self.pool = pool
        self.progress = progress
        self.max_in_flight = max_in_flight
        self.buffers = BufferPool(WINDOW_CHUNKS * repo.body.chunk_size)

    def run(
        self,
        source: VolumeSource,
        stream: VolumeStream,
        previous: VolumeRecord | None,
        previous_session: str | None = None,
    ) -> VolumeRecord:
        """Back up one volume; `previous` is its record in `previous_session`, its newest."""
        body = self.repo.body
        geometry = Geometry(stream.size, body.chunk_size, body.fanout)
        reusable = (
            previous is not None
            and previous.chunk_size == geometry.chunk_size
            and previous.fanout == geometry.fanout
            and previous.size == geometry.size
        )
        changed_mode = (
            reusable
            and source.changed_ranges is not None
            and source.base_session is not None
            and source.base_session == previous_session
        )
        ranges = ChunkRanges(scan_ranges(geometry, source.changed_ranges if changed_mode else None))
        previous_leaves = (
            leaf_ids(previous.tree_id, geometry, self.repo.load_page)
            if changed_mode and previous is not None
            else None
        )
        with ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="qbhub-page") as page_pool:
            pages = LeafPrefetcher(self.repo, page_pool, geometry, ranges, previous_leaves)
            assembler = LeafAssembler(self.writer, geometry, ranges, previous_leaves, pages)
            return self._run(source, stream, geometry, ranges, assembler, changed_mode)

    def _run(
        self,
        source: VolumeSource,
        stream: VolumeStream,
        geometry: Geometry,
        ranges: ChunkRanges,
        assembler: LeafAssembler,
        changed_mode: bool,
    ) -> VolumeRecord:
        stats = VolumeRecord(
            name=source.name,
            size=geometry.size,
            chunk_size=geometry.chunk_size,
            fanout=geometry.fanout,
            tree="",
            provider=source.provider if changed_mode else "full-scan",
        )
        self.progress.start(source.name, sum(b - a for a, b in ranges.ranges) * geometry.chunk_size)
        spans = data_chunk_ranges(stream, geometry, ranges.ranges)
        position = 0  # bytes of `ranges` the bar has passed: read, or skipped as holes
        for result in self._results(stream, geometry, read_windows(spans)):
            stats.bytes_read += result.bytes_read
            for index, blob_id, sealed, raw_length in result.chunks:
                if sealed is not None and self.writer.add_sealed(
                    BlobType.DATA, blob_id, sealed, raw_length
                ):
                    stats.chunks_new += 1
                    stats.bytes_new += len(sealed)
                assembler.put(index, blob_id)
            if result.chunks:  # holes before this window's first chunk: passed, not read
                start = ranges.chunks_before(result.chunks[0][0]) * geometry.chunk_size
                if start > position:
                    self.progress.skip(start - position)
                    position = start
            self.progress.advance(result.bytes_read)
            position += result.bytes_read
        leaf_page_ids = assembler.finish()
        stats.tree = build_upper(leaf_page_ids, geometry, self._save_page).hex()
        self.progress.finish()
        return stats

    def _save_page(self, level: int, entries: bytes) -> bytes:
        return self.writer.add(BlobType.TREE, encode_page(level, entries))

    def _results(
        self, stream: VolumeStream, geometry: Geometry, todo: Iterator[Window]
    ) -> Iterator[WindowResult]:
        """Run windows on the pool, at most `max_in_flight` at once, yielding results in order."""
        in_flight: deque[Future[WindowResult]] = deque()
        try:
            for window in todo:
                in_flight.append(self.pool.submit(self._process, stream, geometry, window))
                if len(in_flight) >= self.max_in_flight:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:
                future.cancel()

    def _process(self, stream: VolumeStream, geometry: Geometry, window: Window) -> WindowResult:
        """Read one window with a single request and process the chunks of its parts."""
        first, count, parts = window
        c = geometry.chunk_size
        offset = first * c
        length = min(count * c, geometry.size - offset)
        buf = self.buffers.take()
        view = memoryview(buf)[:length]
        try:
            if stream.read_into(view, offset) != length:
                raise QbhubError(f"volume shrank while being read (short read at offset {offset})")
            chunks: list[ChunkResult] = []
            scanned = 0
            for part_first, part_count in parts:
                part = view[(part_first - first) * c :]
                chunks += self._chunks(part, part_first, part_count, c)
                scanned += min(part_count * c, len(part))
            return WindowResult(first, scanned, chunks)
        finally:
            view.release()
            self.buffers.give(buf)

    def _chunks(self, view: memoryview, first: int, count: int, c: int) -> list[ChunkResult]:
        """Zero-test, hash and (if new) seal each chunk of one window."""
        sealer, codec, writer = self.repo.sealer, self.repo.codec, self.writer
        zero = bytes(c)
        out: list[ChunkResult] = []
        for k in range(count):
            piece = view[k * c : (k + 1) * c]
            if piece.tobytes() == zero[: len(piece)]:
                out.append((first + k, ZERO_ID, None, len(piece)))
                continue
            blob_id = sealer.blob_id(BlobType.DATA, piece)
            sealed = None if writer.known(blob_id) else codec.encode(BlobType.DATA, blob_id, piece)
            out.append((first + k, blob_id, sealed, len(piece)))
        return out


class LeafPrefetcher:
    """Loads the previous leaf pages that the session will rebuild, a bounded distance ahead.

    An incremental rebuilds every leaf its scanned ranges touch, from the previous session's leaf.
    Those loads are random reads of the archive; issuing them ahead on a few threads overlaps them
    with the data reads instead of paying for each in turn on the consuming thread.
    """

    def __init__(
        self,
        repo: Repository,
        pool: ThreadPoolExecutor,
        geometry: Geometry,
        ranges: ChunkRanges,
        previous_leaves: list[bytes] | None,
        ahead: int = PREFETCH_AHEAD,
    ) -> None:
        self.repo = repo
        self.pool = pool
        self.geometry = geometry
        self.ahead = ahead
        self.todo: deque[tuple[int, bytes]] = deque()
        self.in_flight: deque[tuple[int, Future[bytes]]] = deque()
        if previous_leaves is not None:
            self.todo.extend(
                (leaf, previous_leaves[leaf])
                for leaf in _touched_leaves(ranges, geometry.fanout, len(previous_leaves))
                if previous_leaves[leaf] != ZERO_ID
            )
        self._top_up()

    def load(self, leaf: int, page_id: bytes) -> bytes:
        """Leaf `leaf` of the previous session (ID `page_id`), prefetched if it was foreseen."""
        while self.in_flight and self.in_flight[0][0] < leaf:
            self.in_flight.popleft()[1].cancel()
        while self.todo and self.todo[0][0] < leaf:
            self.todo.popleft()
        if self.in_flight and self.in_flight[0][0] == leaf:
            future = self.in_flight.popleft()[1]
            self._top_up()
            return future.result()
        return self._load(leaf, page_id)

    def _top_up(self) -> None:
        while self.todo and len(self.in_flight) < self.ahead:
            leaf, page_id = self.todo.popleft()
            self.in_flight.append((leaf, self.pool.submit(self._load, leaf, page_id)))

    def _load(self, leaf: int, page_id: bytes) -> bytes:
        return self.repo.load_page(page_id, 0, self.geometry.children(0, leaf))


def _touched_leaves(ranges: ChunkRanges, fanout: int, leaf_count: int) -> Iterator[int]:
    """Leaves holding at least one chunk of `ranges`, ascending, each once."""
    last = -1
    for a, b in ranges.ranges:
        for leaf in range(max(a // fanout, last + 1), min((b - 1) // fanout + 1, leaf_count)):
            yield leaf
            last = leaf


class LeafAssembler:
    """Collects chunk IDs in volume order into leaf pages, reusing unchanged previous leaves."""

    def __init__(
        self,
        writer: BlobWriter,
        geometry: Geometry,
        ranges: ChunkRanges,
        previous_leaves: list[bytes] | None,
        pages: LeafPrefetcher,
    ) -> None:
        self.pages = pages
        self.writer = writer
        self.geometry = geometry
        self.ranges = ranges
        self.previous_leaves = previous_leaves
        self.leaf_count = geometry.pages(0)
        self.page_ids: list[bytes] = []
        self.current = -1
        self.entries: bytearray | None = None

    def put(self, chunk: int, blob_id: bytes) -> None:
        leaf = chunk // self.geometry.fanout
        self._advance_to(leaf)
        assert self.entries is not None
        slot = (chunk % self.geometry.fanout) * ID_BYTES
        self.entries[slot : slot + ID_BYTES] = blob_id

    def finish(self) -> list[bytes]:
        self._advance_to(self.leaf_count)
        return self.page_ids

    def _advance_to(self, leaf: int) -> None:
        """Close the open leaf, settle every leaf before `leaf`, and open `leaf`."""
        while self.current < leaf:
            if self.entries is not None:
                self._close_leaf(bytes(self.entries))
                self.entries = None
            self.current += 1
            if self.current >= self.leaf_count:
                continue
            if self.current == leaf:
                self.entries = self._base()
            elif self._touched():  # scanned, but no data found: rebuild from the base
                self._close_leaf(bytes(self._base()))
            else:
                self.page_ids.append(self._untouched_id())

    def _span(self) -> tuple[int, int]:
        first = self.current * self.geometry.fanout
        return first, first + self.geometry.children(0, self.current)

    def _touched(self) -> bool:
        return self.ranges.touches(*self._span())

    def _untouched_id(self) -> bytes:
        if self.previous_leaves is not None:
            return self.previous_leaves[self.current]
        return ZERO_ID

    def _base(self) -> bytearray:
        """The leaf before this session's chunks land: previous entries, scanned ranges zeroed."""
        count = self.geometry.children(0, self.current)
        previous = self._untouched_id()
        if previous == ZERO_ID:
            return bytearray(count * ID_BYTES)
        entries = bytearray(self.pages.load(self.current, previous))
        first, end = self._span()
        for a, b in self.ranges.clip(first, end):
            entries[(a - first) * ID_BYTES : (b - first) * ID_BYTES] = bytes((b - a) * ID_BYTES)
        return entries

    def _close_leaf(self, entries: bytes) -> None:
        if entries.count(0) == len(entries):
            self.page_ids.append(ZERO_ID)
        else:
            self.page_ids.append(self.writer.add(BlobType.TREE, encode_page(0, entries)))
