"""A local, on-disk copy of the archive's index: sorted fixed-size records, read by `pread`.

Why: the archive's index is the union of every index object the root lists (FORMAT.md section 6);
held in a dict it costs about 300 bytes of RAM per blob, so at 16M chunks (1 TiB) a command
needs GBs. This cache keeps it on local disk instead, so a command's memory does not grow with
the archive: a lookup reads one small bucket of records from the file (the kernel's page cache,
not the process, holds what is hot).

File (`DIR/ARCHIVE_ID.idx`, one per archive; all integers little-endian):

    header   = "QBIXCACHE1\\0\\0" || u32 fanout_bits || u64 record_count || u64 pack_count
               || u64 covered || 32-byte digest of the covered index list (`covers_digest`)
    buckets  = (2^fanout_bits + 1) x u32: bucket b holds records [buckets[b], buckets[b+1])
    packs    = pack_count x (32-byte pack hash || u32 end of its last indexed blob), by hash
    records  = record_count x (32-byte blob ID || u32 pack number || u32 offset || u32 length
               || u32 (type << 28 | raw_length)), sorted by ID, each ID once

A record's bucket is the top `fanout_bits` bits of its ID (IDs are keyed hashes, so uniform);
there are about 16 records per bucket. `covered` is how many of the root's index objects the
file holds, `digest` a BLAKE3 hash of their names and raw lengths in root order. The archive's
own rule, "the first occurrence of an ID in root order wins", is applied when the file is built.

Validity and updates: the file serves a root whose index list starts with exactly the covered
list (same digest). Index objects the root lists after those (the sessions committed since) are
read from the archive into a small in-memory `Index` that is consulted after the file, which is
their precedence in the root too. When they grow large (MAX_EXTRA_OBJECTS, MAX_EXTRA_ENTRIES), a
new file is made from the old file's records and those objects (nothing else is read again).
When the root's list no longer starts with the covered one (a prune replaced the index objects,
or a backup put its own object first because packs were lost), the file is rebuilt from the
archive. A missing, truncated, foreign or
otherwise inconsistent file is rebuilt the same way: the cache is never the only copy of anything.

Trust: the file is built only from index objects that authenticated under the archive key, and
lives in the user's local state directory (mode 0600), which dom0 trusts like its rollback memory.
A damaged record can at worst name a wrong location, and every blob read through it is still
authenticated under its ID: the read fails, nothing wrong is ever returned.

Crash safety: a rebuild writes a temporary file in the same directory, fsyncs it and renames it
over the old one (then fsyncs the directory), so a reader sees the old file or the new one; a
temporary file left by a crash is removed by the next rebuild.
"""

from __future__ import annotations

import os
import secrets
import struct
import sys
from array import array
from bisect import bisect_left
from collections.abc import Callable, Container, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import blake3

from qubes_backup_hub.errors import IntegrityError

from .index import BlobLocation, Index, PackTable
from .pack import ENTRY, PackEntry
from .pids import pid_alive

MAGIC = b"QBIXCACHE1\0\0"
HEADER = struct.Struct("<12sIQQQ32s")
BUCKET = struct.Struct("<I")
PACK = struct.Struct("<32sI")
RECORD = struct.Struct("<32sIIII")
RECORDS_PER_BUCKET = 16
MIN_FANOUT_BITS, MAX_FANOUT_BITS = 8, 28
SPILL_FILES = 256  # a rebuild sorts records in this many parts, by their ID's first byte
RAW_BITS = 28
RAW_MAX = (1 << RAW_BITS) - 1  # larger raw lengths are stored as this: no read accepts it
TYPE_MAX = 15
# Index objects read into memory on top of the file before it is rebuilt instead.
MAX_EXTRA_OBJECTS = 64
MAX_EXTRA_ENTRIES = 1 << 17  # about 15 MB of RAM
MAX_EXTRA_BYTES = MAX_EXTRA_ENTRIES * ENTRY.size
TMP_MARK = ".tmp-index-"  # temporary files: TMP_MARK PID-RANDOM...
REOPEN_TRIES = 3  # writes of the cache file before open_cached gives up on a contended one

IndexList = list[tuple[str, int]]  # the root's index objects: (name, raw length)
TableSource = Callable[[str, int], list[PackTable]]  # read one authenticated index object


def covers_digest(archive_id: str, indexes: IndexList) -> bytes:
    """The digest naming an index list (root order), as the cache header stores it."""
    h = blake3.blake3(b"qbhub index cache v1\0" + archive_id.encode() + b"\0")
    for name, raw_length in indexes:
        h.update(name.encode() + b"\0" + str(raw_length).encode() + b"\0")
    return h.digest()


def fanout_bits(records: int) -> int:
    """Bucket bits for `records` records: about RECORDS_PER_BUCKET per bucket."""
    bits = MIN_FANOUT_BITS
    while bits < MAX_FANOUT_BITS and (records >> bits) > RECORDS_PER_BUCKET:
        bits += 1
    return bits


@dataclass(frozen=True)
class Layout:
    """Where each region of a cache file starts, from its header."""

    bits: int
    records: int
    packs: int
    covered: int
    digest: bytes

    @property
    def buckets_at(self) -> int:
        return HEADER.size

    @property
    def packs_at(self) -> int:
        return self.buckets_at + ((1 << self.bits) + 1) * BUCKET.size

    @property
    def records_at(self) -> int:
        return self.packs_at + self.packs * PACK.size

    @property
    def size(self) -> int:
        return self.records_at + self.records * RECORD.size


class DiskIndex:
    """A read-only view of one cache file: lookups by ID, packs by name."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            self.layout = _read_layout(fd)
            buckets = array("I")
            raw = os.pread(fd, self.layout.packs_at - self.layout.buckets_at, HEADER.size)
            buckets.frombytes(raw)
            if buckets.itemsize != 4 or len(buckets) != (1 << self.layout.bits) + 1:
                raise IntegrityError("the index cache's bucket table is short")
            if buckets[0] != 0 or buckets[-1] != self.layout.records:
                raise IntegrityError("the index cache's bucket table is inconsistent")
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.buckets = buckets
        self.shift = 64 - self.layout.bits

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        with suppress(AttributeError, OSError):
            self.close()

    def __len__(self) -> int:
        return self.layout.records

    def _bucket(self, blob_id: bytes) -> tuple[bytes, int]:
        b = int.from_bytes(blob_id[:8], "big") >> self.shift
        start, end = self.buckets[b], self.buckets[b + 1]
        if end < start or end > self.layout.records:
            raise IntegrityError("the index cache's bucket table is inconsistent")
        data = os.pread(self.fd, (end - start) * RECORD.size,
                        self.layout.records_at + start * RECORD.size)  # fmt: skip
        return data, end - start

    def record(self, blob_id: bytes) -> tuple[int, int, int, int] | None:
        """(pack number, offset, length, type << 28 | raw length) of `blob_id`, or None."""
        if len(blob_id) != 32:
            return None
        data, count = self._bucket(blob_id)
        lo, hi = 0, count
        while lo < hi:  # binary search over the bucket's sorted IDs
            mid = (lo + hi) // 2
            if data[mid * RECORD.size : mid * RECORD.size + 32] < blob_id:
                lo = mid + 1
            else:
                hi = mid
        if lo < count and data[lo * RECORD.size : lo * RECORD.size + 32] == blob_id:
            _, pack, offset, length, packed = RECORD.unpack_from(data, lo * RECORD.size)
            return pack, offset, length, packed
        return None

    def pack(self, number: int) -> tuple[str, int]:
        """(pack name, end of its last indexed blob) of pack `number`."""
        if not 0 <= number < self.layout.packs:
            raise IntegrityError("the index cache names a pack it does not hold")
        raw = os.pread(self.fd, PACK.size, self.layout.packs_at + number * PACK.size)
        digest, end = PACK.unpack(raw)
        return "p" + digest.hex(), end

    def spill_into(self, spills: list[BinaryIO], remap: array[int] | None = None) -> int:
        """Copy every record to the spill file of its ID's first byte; return the count.

        Records are sorted, so each first byte's records are one run: copied in slices. With
        `remap`, each record's pack number k becomes remap[k] (the numbering of the file being
        written); without, numbers are copied as they are.
        """
        step = 1 << 14
        per_byte = 1 << (self.layout.bits - 8)
        for first in range(256):
            start, end = self.buckets[first * per_byte], self.buckets[(first + 1) * per_byte]
            for at in range(start, end, step):
                n = min(step, end - at)
                raw = os.pread(self.fd, n * RECORD.size, self.layout.records_at + at * RECORD.size)
                if len(raw) != n * RECORD.size or raw[:: RECORD.size] != bytes((first,)) * n:
                    raise IntegrityError("the index cache's records are out of order")
                if remap is not None:
                    raw = _renumbered(raw, remap)
                spills[first].write(raw)
        return self.layout.records

    def iter_packs(self) -> Iterator[tuple[str, int]]:
        """Every (pack name, blob end), in name order, read in slices."""
        step = 4096
        for first in range(0, self.layout.packs, step):
            n = min(step, self.layout.packs - first)
            raw = os.pread(self.fd, n * PACK.size, self.layout.packs_at + first * PACK.size)
            for digest, end in PACK.iter_unpack(raw):
                yield "p" + digest.hex(), end

    def has_pack(self, name: str) -> bool:
        """True if `name` is one of the file's packs (binary search by hash)."""
        if not name.startswith("p") or len(name) != 65:
            return False
        try:
            target = bytes.fromhex(name[1:])
        except ValueError:
            return False
        lo, hi = 0, self.layout.packs
        while lo < hi:
            mid = (lo + hi) // 2
            raw = os.pread(self.fd, 32, self.layout.packs_at + mid * PACK.size)
            if raw < target:
                lo = mid + 1
            else:
                hi = mid
        if lo >= self.layout.packs:
            return False
        return os.pread(self.fd, 32, self.layout.packs_at + lo * PACK.size) == target


def _read_layout(fd: int) -> Layout:
    raw = os.pread(fd, HEADER.size, 0)
    if len(raw) != HEADER.size:
        raise IntegrityError("the index cache is truncated")
    magic, bits, records, packs, covered, digest = HEADER.unpack(raw)
    if magic != MAGIC or not MIN_FANOUT_BITS <= bits <= MAX_FANOUT_BITS or records >= 1 << 32:
        raise IntegrityError("the index cache has a bad header")
    layout = Layout(bits, records, packs, covered, digest)
    if os.fstat(fd).st_size != layout.size:
        raise IntegrityError("the index cache has the wrong size")
    return layout


class PackNames(Container[str]):
    """Membership of pack names in a CachedIndex: the file's packs or the in-memory ones."""

    def __init__(self, disk: DiskIndex, extra: Index) -> None:
        self.disk = disk
        self.extra = extra.packs()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.extra or self.disk.has_pack(name))


class CachedIndex:
    """The archive's index as a cache file plus the index objects committed since it was built.

    Offers what backup, restore, list and diff ask of an index: `get`, `in`, `add_pack` (a
    session's own packs after its commit), `blob_ends` and `packs`.
    """

    def __init__(self, disk: DiskIndex, extra: Index) -> None:
        self.disk = disk
        self.extra = extra  # index objects after the covered ones, then this process's commits

    def __contains__(self, blob_id: object) -> bool:
        if not isinstance(blob_id, bytes):
            return False
        return self.disk.record(blob_id) is not None or blob_id in self.extra

    def __len__(self) -> int:
        return len(self.disk) + len(self.extra)  # an upper bound: IDs in both count twice

    def get(self, blob_id: bytes) -> BlobLocation | None:
        found = self.disk.record(blob_id)
        if found is None:
            return self.extra.get(blob_id)
        pack_number, offset, length, packed = found
        pack, _ = self.disk.pack(pack_number)
        return BlobLocation(pack, offset, length, packed & RAW_MAX, packed >> RAW_BITS)

    def add_pack(self, pack: str, entries: Iterable[PackEntry]) -> None:
        self.extra.add_pack(pack, entries)

    def blob_ends(self) -> dict[str, int]:
        """Pack name -> end of its last indexed blob (as `Index.blob_ends`)."""
        ends = dict(self.disk.iter_packs())
        for name, end in self.extra.blob_ends().items():
            ends[name] = max(ends.get(name, 0), end)
        return ends

    def packs(self) -> PackNames:
        return PackNames(self.disk, self.extra)

    def close(self) -> None:
        self.disk.close()


def cache_path(directory: Path, archive_id: str) -> Path:
    """Where the cache file of `archive_id` lives in `directory`."""
    return directory / f"{archive_id}.idx"


def open_cached(
    directory: Path,
    archive_id: str,
    indexes: IndexList,
    read_tables: TableSource,
    seed: Path | None = None,
) -> CachedIndex:
    """The archive's index for a root listing `indexes`, from the cache file in `directory`.

    Uses the file if it covers a prefix of `indexes` and what follows is small (read into
    memory through `read_tables`); otherwise rebuilds the file from every index object first.
    `seed` is another process's cache file for the same archive that this one may read but not
    write (a restore worker is handed dom0's): it is judged exactly like the own file and used
    in its place when it is sound and covers a prefix; whatever must be written (a fold, a
    rebuild) goes to `directory`, never to `seed`.
    """
    path = cache_path(directory, archive_id)
    disk = _open_matching(seed, archive_id, indexes) if seed is not None else None
    if disk is not None and path.exists():  # keep the own file if it covers more
        own = _open_matching(path, archive_id, indexes)
        if own is not None and own.layout.covered > disk.layout.covered:
            disk.close()
            disk = own
        elif own is not None:
            own.close()
    if disk is None:
        disk = _open_matching(path, archive_id, indexes)
    if disk is not None:
        extra = _read_extra(indexes[disk.layout.covered :], read_tables)
        if extra is not None:
            return CachedIndex(disk, extra)
        try:  # fold the file and what follows it into a new file
            build_cache(path, archive_id, indexes, read_tables, base=disk)
        except IntegrityError:  # the old file is damaged after all: from the archive alone
            build_cache(path, archive_id, indexes, read_tables)
        finally:
            disk.close()
    else:
        build_cache(path, archive_id, indexes, read_tables)
    for _ in range(REOPEN_TRIES):
        # Another command may have renamed its own file (for another root) over ours since we
        # wrote it: use the file only if it covers exactly this root's list, else write it again.
        built = open_exact(path, archive_id, indexes)
        if built is not None:
            return CachedIndex(built, Index())
        build_cache(path, archive_id, indexes, read_tables)
    raise IntegrityError(
        "the local index cache keeps being replaced by another qbhub command; try again"
    )


def open_exact(path: Path, archive_id: str, indexes: IndexList) -> DiskIndex | None:
    """The cache file if it is sound and covers exactly `indexes`, else None (a file opened by
    path may have been replaced by another process's since this one wrote it)."""
    disk = _open_matching(path, archive_id, indexes)
    if disk is not None and disk.layout.covered != len(indexes):
        disk.close()
        return None
    return disk


def _read_extra(rest: IndexList, read_tables: TableSource) -> Index | None:
    """The index objects `rest` in memory, or None if they are too many or too large."""
    if len(rest) > MAX_EXTRA_OBJECTS or sum(n for _, n in rest) > 2 * MAX_EXTRA_BYTES:
        return None  # surely too large: known from the root, before reading anything
    extra = Index()
    entries = 0
    for name, raw_length in rest:
        for table in read_tables(name, raw_length):
            extra.add_table(table)
            entries += len(table.records) // ENTRY.size
        if entries > MAX_EXTRA_ENTRIES:
            return None
    return extra


def _open_matching(path: Path, archive_id: str, indexes: IndexList) -> DiskIndex | None:
    """The cache file if it is sound and covers a prefix of `indexes`, else None."""
    try:
        disk = DiskIndex(path)
    except (OSError, IntegrityError):
        return None
    layout = disk.layout
    if layout.covered <= len(indexes) and layout.digest == covers_digest(
        archive_id, indexes[: layout.covered]
    ):
        return disk
    disk.close()
    return None


def build_cache(
    path: Path,
    archive_id: str,
    indexes: IndexList,
    read_tables: TableSource,
    base: DiskIndex | None = None,
) -> None:
    """Write the cache file for `indexes` (atomically), reading each object once.

    With `base`, a sound cache file covering a prefix of `indexes`, its records are taken from
    it and only the index objects after that prefix are read. Memory: the pack names, and one
    of SPILL_FILES parts of the records at a time (records are spread over spill files by the
    first byte of their ID, then each part is sorted alone).
    """
    rest = indexes[base.layout.covered :] if base is not None else indexes
    sources: list[DiskIndex | list[PackTable] | Callable[[], list[PackTable]]] = []
    if base is not None:
        sources.append(base)
    sources.extend(_reader(read_tables, name, raw_length) for name, raw_length in rest)
    write_cache(path, archive_id, indexes, sources)


def _reader(read_tables: TableSource, name: str, raw_length: int) -> Callable[[], list[PackTable]]:
    """A call that reads index object `name` when its turn comes."""
    return lambda: read_tables(name, raw_length)


def write_cache(
    path: Path,
    archive_id: str,
    indexes: IndexList,
    sources: Iterable[DiskIndex | list[PackTable] | Callable[[], list[PackTable]]],
) -> None:
    """Write the cache file covering `indexes` from `sources`, which must hold exactly the
    entries of those index objects, in root order (the first occurrence of an ID wins).

    A source is a cache file or sorted run (`DiskIndex`, its records copied in slices), a list
    of pack tables, or a call returning them. Written atomically: a temporary file in the same
    directory, fsynced, renamed over `path`, then the directory fsynced. Memory: the pack names
    and one of SPILL_FILES parts of the records at a time.
    """
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    spill_paths = [directory / f"{TMP_MARK}{tag}-{k}" for k in range(SPILL_FILES)]
    tmp = directory / f"{TMP_MARK}{tag}"
    spills: list[BinaryIO] = []
    try:
        spills = [open(p, "w+b", buffering=1 << 16) for p in spill_paths]  # noqa: SIM115
        pack_ends, total = _spill(sources, spills)
        names = sorted(pack_ends)
        number = {name: k for k, name in enumerate(names)}
        remap = array("I", [0]) * len(pack_ends)
        for seen, name in enumerate(pack_ends):
            remap[seen] = number[name]
        del number
        with open(tmp, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            _write(out, archive_id, indexes, names, pack_ends, remap, spills, total)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        for f in spills:
            f.close()
        for p in [*spill_paths, tmp]:
            with suppress(OSError):
                p.unlink()


def remove_stale_temporaries(directory: Path) -> None:
    """Remove temporary files of rebuilds (and spilled runs) whose process no longer runs."""
    for stale in directory.glob(f"{TMP_MARK}*"):
        pid = stale.name[len(TMP_MARK) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            with suppress(OSError):
                stale.unlink()


def spill_run(directory: Path, tables: list[PackTable]) -> DiskIndex:
    """`tables` as a sorted run on disk (a backup's own entries, set aside to save memory).

    The file is unlinked as soon as it is open: it lives as long as the returned DiskIndex.
    """
    path = directory / f"{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}-run"
    build_cache(path, "run", [("run", 0)], lambda name, raw_length: tables)
    try:
        return DiskIndex(path)
    finally:
        path.unlink()


def _spill(
    sources: Iterable[DiskIndex | list[PackTable] | Callable[[], list[PackTable]]],
    spills: list[BinaryIO],
) -> tuple[dict[str, int], int]:
    """Pass 1: every entry of every source, in order, to the spill file of its ID's first byte.

    Spilled records carry the pack's number in order of first appearance; returns the packs
    (name -> blob end, in that order) and the number of entries spilled. A first source that
    is a cache file has its packs numbered first, in its own order, so its records are copied
    as they are; a later cache file or run has its pack numbers rewritten.
    """
    pack_ends: dict[str, int] = {}
    seen: dict[str, int] = {}
    total = 0
    for source in sources:
        if isinstance(source, DiskIndex):
            as_is = not seen
            remap = array("I")
            for name, end in source.iter_packs():
                remap.append(seen.setdefault(name, len(seen)))
                pack_ends[name] = max(pack_ends.get(name, 0), end)
            total += source.spill_into(spills, None if as_is else remap)
            continue
        for table in source() if callable(source) else source:
            pack_no = seen.setdefault(table.pack, len(seen))
            records = table.records
            end = pack_ends.get(table.pack, 0)
            pack = RECORD.pack
            for type_code, blob_id, offset, length, raw in ENTRY.iter_unpack(records):
                packed = ((type_code if type_code <= TYPE_MAX else TYPE_MAX) << RAW_BITS) | (
                    raw if raw <= RAW_MAX else RAW_MAX
                )
                spills[blob_id[0]].write(pack(blob_id, pack_no, offset, length, packed))
                if offset + length > end:
                    end = offset + length
            pack_ends[table.pack] = end
            total += len(records) // ENTRY.size
    return pack_ends, total


def _write(
    out: BinaryIO,
    archive_id: str,
    indexes: IndexList,
    names: list[str],
    pack_ends: dict[str, int],
    remap: array[int],
    spills: list[BinaryIO],
    total: int,
) -> None:
    """Pass 2: each spill file sorted (first occurrence of an ID kept), renumbered, written.

    Spill file k holds the IDs whose first byte is k, so it fills buckets k * 2^(bits-8) on;
    their starts are found by bisection in the sorted part, not by a pass over its records.
    """
    bits = fanout_bits(total)
    shift = 64 - bits
    per_part = 1 << (bits - 8)
    buckets = array("I", [0]) * ((1 << bits) + 1)
    digest = covers_digest(archive_id, indexes)
    records_at = HEADER.size + len(buckets) * BUCKET.size + len(names) * PACK.size
    out.seek(records_at)
    written = 0
    for first, spill in enumerate(spills):
        spill.flush()
        spill.seek(0)
        data = spill.read()
        spill.truncate(0)  # the spill files shrink as the file grows: disk peak ~ one copy
        parts = _sorted_first_occurrences(data)
        del data
        if parts:
            out.write(_renumbered(b"".join(parts), remap))
        at = first * per_part
        buckets[at] = written
        lo = 0
        for b in range(at + 1, at + per_part):
            lo = bisect_left(parts, (b << shift).to_bytes(8, "big"), lo)
            buckets[b] = written + lo
        written += len(parts)
    buckets[-1] = written
    out.seek(0)
    out.write(HEADER.pack(MAGIC, bits, written, len(names), len(indexes), digest))
    out.write(buckets.tobytes())
    for name in names:
        out.write(PACK.pack(bytes.fromhex(name[1:]), pack_ends[name]))
    out.seek(0, os.SEEK_END)


def _sorted_first_occurrences(data: bytes) -> list[bytes]:
    """The records of `data` sorted by ID, keeping only the first occurrence of each ID."""
    size = RECORD.size
    parts = [data[k : k + size] for k in range(0, len(data), size)]
    parts.sort()  # by ID (then by the rest: only matters for a repeated ID, handled below)
    ids = [r[:32] for r in parts]
    if len(set(ids)) == len(ids):
        return parts
    parts = [data[k : k + size] for k in range(0, len(data), size)]
    parts.sort(key=lambda r: r[:32])  # stable: the first occurrence stays first
    kept: list[bytes] = []
    for rec in parts:
        if not kept or kept[-1][:32] != rec[:32]:
            kept.append(rec)
    return kept


def _renumbered(records: bytes, remap: array[int]) -> bytes:
    """`records` with each pack number k replaced by remap[k]."""
    values = array("I", records)
    if sys.byteorder != "little":
        values.byteswap()
    words = RECORD.size // 4
    numbers = values[8::words]
    if max(numbers) >= len(remap):
        raise IntegrityError("the index cache names a pack it does not hold")
    values[8::words] = array("I", map(remap.__getitem__, numbers))
    if sys.byteorder != "little":
        values.byteswap()
    return values.tobytes()
