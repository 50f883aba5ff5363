"""Comparing an archived volume with a local file or device, chunk by chunk, without fetching data.

Chunk IDs are keyed hashes of chunk contents, so the local side is read, zero-tested and hashed
with the archive's key, and compared with the IDs in the volume's tree: nothing but tree pages is
read from the store. Local holes are skipped without reading (they hash as all-zero chunks). The
result lists the differing byte ranges, so a user can check an incremental chain for themselves.
"""

from __future__ import annotations

from qubes_backup_hub.errors import UsageError
from qubes_backup_hub.progress import Progress
from qubes_backup_hub.snapshots.ranges import RangeList
from qubes_backup_hub.stream.base import VolumeStream

from .blob import BlobType
from .repository import Repository
from .scan import WINDOW_CHUNKS, data_chunk_ranges, windows
from .session import VolumeRecord
from .tree import ID_BYTES, ZERO_ID, Geometry, iter_leaves

MAX_LISTED_RANGES = 10_000


class ArchivedIds:
    """The chunk IDs of a volume record, one leaf page per entry (all-zero leaves as None)."""

    def __init__(self, repo: Repository, volume: VolumeRecord) -> None:
        self.fanout = volume.fanout
        self.leaves = [e for _, e in iter_leaves(volume.tree_id, volume.geometry, repo.load_page)]

    def get(self, chunk: int) -> bytes:
        entries = self.leaves[chunk // self.fanout]
        if entries is None:
            return ZERO_ID
        k = chunk % self.fanout
        return entries[k * ID_BYTES : (k + 1) * ID_BYTES]

    def nonzero_in(self, first: int, end: int) -> list[int]:
        """Chunks in [first, end) whose archived ID is not the all-zero one."""
        out: list[int] = []
        chunk = first
        while chunk < end:
            leaf_end = min(end, (chunk // self.fanout + 1) * self.fanout)
            if self.leaves[chunk // self.fanout] is not None:
                out.extend(c for c in range(chunk, leaf_end) if self.get(c) != ZERO_ID)
            chunk = leaf_end
        return out


def compare_volume(
    repo: Repository, volume: VolumeRecord, stream: VolumeStream, progress: Progress
) -> dict[str, object]:
    """Compare `volume` with `stream`; return differing ranges (bytes) and counts."""
    if stream.size > 1 << 50:
        raise UsageError("the local volume is implausibly large")
    size = min(volume.size, stream.size)
    geometry = Geometry(volume.size, volume.chunk_size, volume.fanout)
    c = geometry.chunk_size
    common = Geometry(size, c, volume.fanout).chunks
    archived = ArchivedIds(repo, volume)
    differ = RangeList()
    buf = bytearray(WINDOW_CHUNKS * c)
    zero = bytes(c)
    pos = 0  # chunks below pos are done
    read = 0
    progress.start(volume.name, size)
    for first, count in windows(data_chunk_ranges(stream, Geometry(size, c, volume.fanout),
                                                  [(0, common)])):  # fmt: skip
        for chunk in archived.nonzero_in(pos, first):
            differ.add(chunk * c, geometry.chunk_length(chunk))
        length = min(count * c, size - first * c)
        view = memoryview(buf)[:length]
        if stream.read_into(view, first * c) != length:
            raise UsageError(f"the local volume shrank while being compared (at {first * c})")
        read += length
        for k in range(count):
            piece = view[k * c : (k + 1) * c]
            local = (
                ZERO_ID
                if piece == zero[: len(piece)]
                else repo.sealer.blob_id(BlobType.DATA, piece)
            )
            if local != archived.get(first + k) or len(piece) != geometry.chunk_length(first + k):
                differ.add((first + k) * c, len(piece))
        view.release()
        pos = first + count
        progress.advance(length)
    for chunk in archived.nonzero_in(pos, common):
        differ.add(chunk * c, geometry.chunk_length(chunk))
    if volume.size != stream.size:
        differ.add(size, max(volume.size, stream.size) - size)
    progress.finish()
    ranges = differ.ranges
    return {
        "volume": volume.name,
        "size_archived": volume.size,
        "size_local": stream.size,
        "identical": not ranges,
        "differing_bytes": sum(n for _, n in ranges),
        "differing_count": len(ranges),
        "differing_ranges": [[o, n] for o, n in ranges[:MAX_LISTED_RANGES]],
        "bytes_read": read,
    }
