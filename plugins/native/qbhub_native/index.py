"""The blob index: which pack, offset and length hold each blob ID.

Encoded index (the plaintext of an INDEX blob): b"QBIX" || u32 pack count || per pack:
(32-byte pack hash, u32 entry count, entries as in the pack trailer) || zero padding. All
little-endian. The padding (zero bytes after the last pack, possibly none) lets the writer round
the stored object to a multiple of PAD_TO bytes, as packs are, so an index object's size does not
give away how many chunks a session changed. The counts fix where the packs end, so the padding
is unambiguous; a decoder requires it to be all zeros. Indexes written before padding have none.

In memory the index keeps each pack's entry records as the bytes they were decoded from and maps
an ID to the record's position; a location is unpacked only when it is asked for. Loading an
archive therefore costs one dict insertion per blob and no per-entry objects.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from qubes_backup_hub.errors import IntegrityError

from .pack import ENTRY, PAD_TO, PackEntry

INDEX_MAGIC = b"QBIX"
_ID_START, _ID_END = 1, 33  # the blob ID's bytes inside an ENTRY record
_POSITION_BITS = 32


@dataclass(frozen=True)
class BlobLocation:
    """Where a blob lives: pack name, offset, sealed length, raw length, and its type."""

    pack: str
    offset: int
    length: int
    raw_length: int
    type_code: int


@dataclass(frozen=True)
class PackTable:
    """One pack's entries as they are encoded: `records` is a run of ENTRY records."""

    pack: str
    records: bytes


class Index:
    """ID -> BlobLocation for every blob the archive (or a session being written) holds."""

    def __init__(self) -> None:
        self._tables: list[PackTable] = []
        self._by_id: dict[bytes, int] = {}  # ID -> table number << 32 | record position

    def __contains__(self, blob_id: object) -> bool:
        return blob_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, blob_id: bytes) -> BlobLocation | None:
        code = self._by_id.get(blob_id)
        if code is None:
            return None
        table = self._tables[code >> _POSITION_BITS]
        type_code, _, offset, length, raw_length = ENTRY.unpack_from(
            table.records, code & ((1 << _POSITION_BITS) - 1)
        )
        return BlobLocation(table.pack, offset, length, raw_length, type_code)

    def add_pack(self, pack: str, entries: Iterable[PackEntry]) -> None:
        """Record every entry of `pack`; an ID already known keeps its first location."""
        records = b"".join(
            ENTRY.pack(e.type_code, e.blob_id, e.offset, e.length, e.raw_length) for e in entries
        )
        self.add_table(PackTable(pack, records))

    def add_table(self, table: PackTable) -> None:
        """Record a pack's encoded entries; an ID already known keeps its first location."""
        if len(table.records) % ENTRY.size or len(table.records) >> _POSITION_BITS:
            raise IntegrityError(f"the index entries of pack {table.pack} have a bad length")
        base = len(self._tables) << _POSITION_BITS
        self._tables.append(table)
        records, known = table.records, self._by_id
        for pos in range(0, len(records), ENTRY.size):
            known.setdefault(records[pos + _ID_START : pos + _ID_END], base | pos)

    def tables(self) -> list[PackTable]:
        """The pack tables in the order they were added (first ones win for repeated IDs)."""
        return list(self._tables)

    def blob_ends(self) -> dict[str, int]:
        """For every pack, where its last indexed blob ends (entries are stored by offset)."""
        ends: dict[str, int] = {}
        for table in self._tables:
            if table.records:
                last = len(table.records) - ENTRY.size
                _, _, offset, length, _ = ENTRY.unpack_from(table.records, last)
                ends[table.pack] = max(ends.get(table.pack, 0), offset + length)
        return ends

    def packs(self) -> set[str]:
        """Every pack the index lists (also packs whose blobs are all found elsewhere first)."""
        return {t.pack for t in self._tables}

    def by_pack(self) -> dict[str, list[PackEntry]]:
        """Group entries by pack, in offset order: the shape the encoded index uses.

        An ID listed in several packs appears only under the location the index uses for it.
        """
        packs: dict[str, list[PackEntry]] = {}
        for number, table in enumerate(self._tables):
            base = number << _POSITION_BITS
            for pos in range(0, len(table.records), ENTRY.size):
                type_code, blob_id, offset, length, raw_length = ENTRY.unpack_from(
                    table.records, pos
                )
                if self._by_id[blob_id] == base | pos:
                    packs.setdefault(table.pack, []).append(
                        PackEntry(type_code, blob_id, offset, length, raw_length)
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


def pad_index(plain: bytes, overhead: int) -> bytes:
    """Append zero padding so the sealed, uncompressed INDEX blob is a multiple of PAD_TO.

    The sealed blob is 1 framing byte + the plaintext + `overhead` (the sealer's) bytes long.
    """
    return plain + bytes(-(len(plain) + 1 + overhead) % PAD_TO)


def decode_index(data: bytes) -> list[PackTable]:
    """Split index plaintext (already authenticated) into per-pack tables, in file order.

    IntegrityError on any inconsistency: bad magic, a count that runs past the end, non-zero
    bytes after the last pack (zero bytes there are padding, see `pad_index`).
    """
    try:
        if data[:4] != INDEX_MAGIC:
            raise IntegrityError("index object has a bad magic")
        (npacks,) = struct.unpack_from("<I", data, 4)
        pos = 8
        tables: list[PackTable] = []
        for _ in range(npacks):
            if pos + 36 > len(data):
                raise IntegrityError("index object is truncated")
            name = "p" + data[pos : pos + 32].hex()
            (count,) = struct.unpack_from("<I", data, pos + 32)
            pos += 36
            end = pos + count * ENTRY.size
            if end > len(data):
                raise IntegrityError("index object is truncated")
            tables.append(PackTable(name, data[pos:end]))
            pos = end
        if data[pos:].count(0) != len(data) - pos:
            raise IntegrityError("index object has trailing bytes that are not padding")
        return tables
    except struct.error:
        raise IntegrityError("index object is truncated") from None
