"""The blob index: which pack, offset and length hold each blob ID.

Encoded index (the plaintext of an INDEX blob): b"QBIX" || u32 pack count || per pack:
(32-byte pack hash, u32 entry count, entries as in the pack trailer). All little-endian.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from qubes_backup_hub.errors import IntegrityError

from .pack import ENTRY, PackEntry

INDEX_MAGIC = b"QBIX"


@dataclass(frozen=True)
class BlobLocation:
    """Where a blob lives: pack name, offset, sealed length, raw length, and its type."""

    pack: str
    offset: int
    length: int
    raw_length: int
    type_code: int


class Index:
    """ID -> BlobLocation for every blob the archive (or a session being written) holds."""

    def __init__(self) -> None:
        self._by_id: dict[bytes, BlobLocation] = {}

    def __contains__(self, blob_id: object) -> bool:
        return blob_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, blob_id: bytes) -> BlobLocation | None:
        return self._by_id.get(blob_id)

    def add_pack(self, pack: str, entries: Iterable[PackEntry]) -> None:
        """Record every entry of `pack`; an ID already known keeps its first location."""
        for e in entries:
            if e.blob_id not in self._by_id:
                self._by_id[e.blob_id] = BlobLocation(
                    pack, e.offset, e.length, e.raw_length, e.type_code
                )

    def items(self) -> Iterator[tuple[bytes, BlobLocation]]:
        return iter(self._by_id.items())

    def by_pack(self) -> dict[str, list[PackEntry]]:
        """Group entries by pack, in offset order: the shape the encoded index uses."""
        packs: dict[str, list[PackEntry]] = {}
        for blob_id, loc in self._by_id.items():
            packs.setdefault(loc.pack, []).append(
                PackEntry(loc.type_code, blob_id, loc.offset, loc.length, loc.raw_length)
            )
        for entries in packs.values():
            entries.sort(key=lambda e: e.offset)
        return packs


def encode_index(packs: dict[str, list[PackEntry]]) -> bytes:
    """Serialise {pack name: entries} as index plaintext."""
    out = bytearray(INDEX_MAGIC + struct.pack("<I", len(packs)))
    for name, entries in sorted(packs.items()):
        out += bytes.fromhex(name[1:])
        out += struct.pack("<I", len(entries))
        for e in entries:
            out += ENTRY.pack(e.type_code, e.blob_id, e.offset, e.length, e.raw_length)
    return bytes(out)


def decode_index(data: bytes) -> dict[str, list[PackEntry]]:
    """Parse index plaintext (already authenticated); IntegrityError on any inconsistency."""
    try:
        if data[:4] != INDEX_MAGIC:
            raise IntegrityError("index object has a bad magic")
        (npacks,) = struct.unpack_from("<I", data, 4)
        pos = 8
        packs: dict[str, list[PackEntry]] = {}
        for _ in range(npacks):
            name = "p" + data[pos : pos + 32].hex()
            (count,) = struct.unpack_from("<I", data, pos + 32)
            pos += 36
            if pos + count * ENTRY.size > len(data):
                raise IntegrityError("index object is truncated")
            entries = []
            for _ in range(count):
                t, blob_id, offset, length, raw_length = ENTRY.unpack_from(data, pos)
                entries.append(PackEntry(t, blob_id, offset, length, raw_length))
                pos += ENTRY.size
            packs[name] = entries
        if pos != len(data):
            raise IntegrityError("index object has trailing bytes")
        return packs
    except struct.error:
        raise IntegrityError("index object is truncated") from None
