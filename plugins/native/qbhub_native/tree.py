"""Volume manifests as a hash tree of pages, shared between sessions wherever unchanged.

A volume of `size` bytes is cut into n = ceil(size / chunk_size) chunks. Level-0 pages (leaves)
hold the IDs of up to `fanout` consecutive chunks; a level-L page holds the IDs of up to `fanout`
consecutive level-(L-1) pages. The tree has the least height h >= 0 with fanout^(h+1) >= n; its
top page's ID is the volume's tree ID. An all-zero ID stands for an all-zero chunk or an all-zero
subtree, which is never stored. Page plaintext: b"QBTP" || u8 level || u8 0 || u16 LE count ||
count x 32-byte IDs, where count is exactly the number of children the page covers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from qubes_backup_hub.errors import IntegrityError

from .limits import MAX_TREE_HEIGHT

ID_BYTES = 32
ZERO_ID = bytes(ID_BYTES)
PAGE_MAGIC = b"QBTP"
PAGE_HEADER = struct.Struct("<4sBBH")
DEFAULT_FANOUT = 256

# load_page(page_id, level, expected_count) -> the page's entries (count x 32 bytes)
PageLoader = Callable[[bytes, int, int], bytes]
# save_page(level, entries) -> page ID (stores the page unless already stored)
PageSaver = Callable[[int, bytes], bytes]


@dataclass(frozen=True)
class Geometry:
    """The shape of one volume's tree."""

    size: int
    chunk_size: int
    fanout: int = DEFAULT_FANOUT

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk_size)

    def pages(self, level: int) -> int:
        """Number of pages at `level` (at least 1)."""
        return max(1, -(-self.chunks // self.fanout ** (level + 1)))

    @property
    def height(self) -> int:
        h = 0
        while self.fanout ** (h + 1) < self.chunks:
            h += 1
        return h

    def children(self, level: int, index: int) -> int:
        """How many entries page `index` at `level` holds."""
        below = self.chunks if level == 0 else self.pages(level - 1)
        return max(0, min(self.fanout, below - index * self.fanout))

    def chunk_length(self, chunk: int) -> int:
        """Bytes in chunk number `chunk` (the last one may be short)."""
        return min(self.chunk_size, self.size - chunk * self.chunk_size)


def encode_page(level: int, entries: bytes) -> bytes:
    return PAGE_HEADER.pack(PAGE_MAGIC, level, 0, len(entries) // ID_BYTES) + entries


def decode_page(data: bytes, level: int, count: int, what: str) -> bytes:
    """Check a page's header against what its parent implies; return its entries."""
    if len(data) < PAGE_HEADER.size:
        raise IntegrityError(f"{what} is truncated")
    magic, got_level, _, got_count = PAGE_HEADER.unpack_from(data)
    if magic != PAGE_MAGIC or got_level != level or got_count != count:
        raise IntegrityError(f"{what} does not fit its place in the tree")
    entries = data[PAGE_HEADER.size :]
    if len(entries) != count * ID_BYTES:
        raise IntegrityError(f"{what} has the wrong length")
    return entries


def split_ids(entries: bytes) -> list[bytes]:
    return [entries[i : i + ID_BYTES] for i in range(0, len(entries), ID_BYTES)]


def check_height(geometry: Geometry) -> None:
    if geometry.height > MAX_TREE_HEIGHT:
        raise IntegrityError("volume tree is implausibly tall")


def leaf_ids(tree_id: bytes, geometry: Geometry, load: PageLoader) -> list[bytes]:
    """Return the IDs of every leaf page in order, reading only the pages above the leaves."""
    check_height(geometry)
    level_ids = [tree_id]
    for level in range(geometry.height, 0, -1):
        below: list[bytes] = []
        for index, page_id in enumerate(level_ids):
            count = geometry.children(level, index)
            if page_id == ZERO_ID:
                below.extend([ZERO_ID] * count)
            else:
                below.extend(split_ids(load(page_id, level, count)))
        level_ids = below
    return level_ids


def iter_leaves(
    tree_id: bytes, geometry: Geometry, load: PageLoader
) -> Iterator[tuple[int, bytes | None]]:
    """Yield (leaf index, leaf entries or None for an all-zero leaf) in volume order."""
    for index, leaf_id in enumerate(leaf_ids(tree_id, geometry, load)):
        if leaf_id == ZERO_ID:
            yield index, None
        else:
            yield index, load(leaf_id, 0, geometry.children(0, index))


def build_upper(leaf_page_ids: list[bytes], geometry: Geometry, save: PageSaver) -> bytes:
    """Build the pages above the leaves; return the tree ID (ZERO_ID for an all-zero volume)."""
    ids = leaf_page_ids
    for level in range(1, geometry.height + 1):
        parents = []
        for start in range(0, len(ids), geometry.fanout):
            group = b"".join(ids[start : start + geometry.fanout])
            parents.append(ZERO_ID if group.count(0) == len(group) else save(level, group))
        ids = parents
    return ids[0] if ids else ZERO_ID
