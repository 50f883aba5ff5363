"""Pack files: many sealed blobs in one store object, with a sealed trailer that lists them.

Layout: blob_0 || blob_1 || ... || padding || sealed trailer || u32 LE trailer length
|| b"QBPACK01".
Trailer plaintext: b"QBPT" || u32 count || count x (u8 type, 32-byte ID, u32 offset, u32 length,
u32 raw length), all little-endian, sealed with associated data b"qbhub-pack-trailer-v1". The
padding (random bytes) rounds the pack to a multiple of PAD_TO so object sizes reveal less.
A pack's name is "p" + hex(BLAKE3(pack bytes)).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import blake3

from qubes_backup_hub.directio import BufferPool, aligned_buffer
from qubes_backup_hub.errors import IntegrityError
from qubes_backup_hub.store.base import Bytes

from .crypto import Sealer
from .limits import MAX_CHUNK_SIZE, MAX_PACK, MAX_TRAILER

PACK_MAGIC = b"QBPACK01"
TRAILER_MAGIC = b"QBPT"
TRAILER_AAD = b"qbhub-pack-trailer-v1"
ENTRY = struct.Struct("<B32sIII")
FOOTER = struct.Struct("<I8s")
PAD_TO = 4096
DEFAULT_PACK_TARGET = 4 * 1024 * 1024
MAX_PACK_ENTRIES = 8192
# Room past the target: one more chunk-sized blob, the trailer, padding and footer.
TRAILER_ROOM = MAX_CHUNK_SIZE + 64 + MAX_PACK_ENTRIES * ENTRY.size + 2 * PAD_TO


@dataclass(frozen=True)
class PackEntry:
    """Where one blob sits inside a pack."""

    type_code: int
    blob_id: bytes
    offset: int
    length: int
    raw_length: int


def pack_name(data: bytes | memoryview) -> str:
    """The store name of a pack: "p" and the hex BLAKE3 of its bytes."""
    return "p" + blake3.blake3(data).hexdigest()


class PackBuilder:
    """Accumulates sealed blobs in a page-aligned buffer; `finish()` completes the pack.

    The finished pack is handed over as a view of that buffer (no copy), ready for an O_DIRECT
    write. Callers check `fits()` before `add()` and finish the pack when it says no.
    """

    def __init__(self, sealer: Sealer, target: int = DEFAULT_PACK_TARGET) -> None:
        self.sealer = sealer
        self.target = target
        self.entries: list[PackEntry] = []
        self.size = 0
        self.buffers = BufferPool(target + TRAILER_ROOM)
        self.buffer = self.buffers.take()

    def __len__(self) -> int:
        return self.size

    def fits(self, length: int) -> bool:
        """True if a blob of `length` bytes fits, leaving room for the trailer."""
        return (
            self.size + length + TRAILER_ROOM <= len(self.buffer)
            and len(self.entries) < MAX_PACK_ENTRIES
        )

    def add(self, type_code: int, blob_id: bytes, sealed: Bytes, raw_length: int) -> PackEntry:
        if not self.fits(len(sealed)):
            if self.entries:
                raise ValueError("pack is full: finish it first")
            self.buffer = aligned_buffer(len(sealed) + TRAILER_ROOM)  # one oversized blob
        entry = PackEntry(type_code, blob_id, self.size, len(sealed), raw_length)
        self.buffer[self.size : self.size + len(sealed)] = sealed
        self.size += len(sealed)
        self.entries.append(entry)
        return entry

    def finish(self) -> tuple[str, memoryview, list[PackEntry], mmap.mmap]:
        """Seal the trailer; return (name, pack bytes, entries, buffer to `recycle` after use)."""
        body = bytearray(TRAILER_MAGIC + struct.pack("<I", len(self.entries)))
        for e in self.entries:
            body += ENTRY.pack(e.type_code, e.blob_id, e.offset, e.length, e.raw_length)
        trailer = self.sealer.seal(TRAILER_AAD, bytes(body))
        footer = FOOTER.pack(len(trailer), PACK_MAGIC)
        pos = self.size
        padding = -(pos + len(trailer) + len(footer)) % PAD_TO
        for part in (os.urandom(padding), trailer, footer):
            self.buffer[pos : pos + len(part)] = part
            pos += len(part)
        buffer = self.buffer
        data = memoryview(buffer)[:pos]
        entries = self.entries
        self.buffer = self.buffers.take()
        self.entries = []
        self.size = 0
        return pack_name(data), data, entries, buffer

    def recycle(self, buffer: mmap.mmap) -> None:
        """Give back a finished pack's buffer once nothing reads it any more."""
        if len(buffer) == self.buffers.size:
            self.buffers.give(buffer)


def trailer_location(pack_size: int, footer: bytes, name: str) -> tuple[int, int]:
    """From a pack's size and its last FOOTER.size bytes, return its trailer's (offset, length)."""
    if len(footer) != FOOTER.size:
        raise IntegrityError(f"pack {name} is too short")
    length, magic = FOOTER.unpack(footer)
    if magic != PACK_MAGIC:
        raise IntegrityError(f"pack {name} has no pack footer")
    if length > MAX_TRAILER or length + FOOTER.size > pack_size:
        raise IntegrityError(f"pack {name} declares an impossible trailer length {length}")
    return pack_size - FOOTER.size - length, length


def read_trailer(sealer: Sealer, data: bytes | memoryview, name: str) -> list[PackEntry]:
    """Locate, authenticate and decode the trailer of a whole pack held in memory."""
    offset, length = trailer_location(len(data), bytes(data[-FOOTER.size :]), name)
    return parse_trailer(sealer, bytes(data[offset : offset + length]), name, len(data))


def plausible_size(size: int, blobs_end: int, overhead: int) -> bool:
    """True if a stored pack of `size` bytes can hold blobs up to `blobs_end`, as written.

    Every pack the writer makes is padded to a multiple of PAD_TO, holds at least an empty
    sealed trailer and the footer after its blobs, and stays within MAX_PACK: a size that breaks
    any of these means the pack was truncated, extended or replaced.
    """
    least = blobs_end + overhead + len(TRAILER_MAGIC) + 4 + FOOTER.size
    return least <= size <= MAX_PACK and size % PAD_TO == 0


def parse_trailer(sealer: Sealer, sealed: bytes, name: str, pack_size: int) -> list[PackEntry]:
    """Authenticate and decode a pack trailer; every entry must lie inside the pack's blob area."""
    body = sealer.open(TRAILER_AAD, sealed, f"trailer of pack {name}")
    if body[:4] != TRAILER_MAGIC or len(body) < 8:
        raise IntegrityError(f"trailer of pack {name} is malformed")
    (count,) = struct.unpack_from("<I", body, 4)
    if len(body) != 8 + count * ENTRY.size:
        raise IntegrityError(f"trailer of pack {name} has the wrong length for {count} entries")
    limit = min(pack_size, MAX_PACK) - len(sealed) - FOOTER.size
    entries = []
    for i in range(count):
        type_code, blob_id, offset, length, raw_length = ENTRY.unpack_from(body, 8 + i * ENTRY.size)
        if offset + length > limit or raw_length > MAX_CHUNK_SIZE * 16:
            raise IntegrityError(f"trailer of pack {name} points outside the pack")
        entries.append(PackEntry(type_code, blob_id, offset, length, raw_length))
    return entries
