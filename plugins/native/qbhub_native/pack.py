"""Pack files: many sealed blobs in one store object, with a sealed trailer that lists them.

Layout: blob_0 || blob_1 || ... || padding || sealed trailer || u32 LE trailer length
|| b"QBPACK01".
Trailer plaintext: b"QBPT" || u32 count || count x (u8 type, 32-byte ID, u32 offset, u32 length,
u32 raw length), all little-endian, sealed with associated data b"qbhub-pack-trailer-v1". The
padding (random bytes) rounds the pack to a multiple of PAD_TO so object sizes reveal less.
A pack's name is "p" + hex(BLAKE3(pack bytes)).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import blake3

from qubes_backup_hub.errors import IntegrityError

from .crypto import Sealer
from .limits import MAX_CHUNK_SIZE, MAX_PACK, MAX_TRAILER

PACK_MAGIC = b"QBPACK01"
TRAILER_MAGIC = b"QBPT"
TRAILER_AAD = b"qbhub-pack-trailer-v1"
ENTRY = struct.Struct("<B32sIII")
FOOTER = struct.Struct("<I8s")
PAD_TO = 4096
DEFAULT_PACK_TARGET = 4 * 1024 * 1024


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
    """Accumulates sealed blobs; `finish()` returns (name, bytes, entries) of a complete pack."""

    def __init__(self, sealer: Sealer) -> None:
        self.sealer = sealer
        self.buffer = bytearray()
        self.entries: list[PackEntry] = []

    def __len__(self) -> int:
        return len(self.buffer)

    def add(self, type_code: int, blob_id: bytes, sealed: bytes, raw_length: int) -> PackEntry:
        entry = PackEntry(type_code, blob_id, len(self.buffer), len(sealed), raw_length)
        self.buffer += sealed
        self.entries.append(entry)
        return entry

    def finish(self) -> tuple[str, bytes, list[PackEntry]]:
        body = bytearray(TRAILER_MAGIC + struct.pack("<I", len(self.entries)))
        for e in self.entries:
            body += ENTRY.pack(e.type_code, e.blob_id, e.offset, e.length, e.raw_length)
        trailer = self.sealer.seal(TRAILER_AAD, bytes(body))
        unpadded = len(self.buffer) + len(trailer) + FOOTER.size
        self.buffer += os.urandom(-unpadded % PAD_TO)
        self.buffer += trailer
        self.buffer += FOOTER.pack(len(trailer), PACK_MAGIC)
        data = bytes(self.buffer)
        entries = self.entries
        self.buffer = bytearray()
        self.entries = []
        return pack_name(data), data, entries


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
