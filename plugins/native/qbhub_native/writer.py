"""Writing blobs: packing sealed blobs into packs and uploading them in the background.

A BlobWriter belongs to one writing operation (a backup session or a prune). It never adds a blob
the archive already holds, keeps the entries of the packs it wrote (the new index objects), and
uploads finished packs on a background thread so sealing and uploading overlap.

Memory: a writer given a `spill_dir` (a backup) keeps at most MAX_INDEX_ENTRIES of its own entries
in memory. When that many are reached, it stores their index object right away and sets them
aside as a sorted run in a local file (unlinked, see `index_cache.spill_run`) that still answers
its dedup checks; so a first full backup of millions of chunks needs no RAM per chunk. Index
objects stored before the root are, if the session fails, unreferenced objects like its packs.

Storage may lose what it holds. `exclude_lost_packs` compares the index with one listing of the
store: a blob whose pack is gone or has an impossible size no longer counts as held, so it is
stored again (and counted in `blobs_restored`). `reuse_orphan_packs` adopts packs an interrupted
run left behind only blob by blob, each one authenticated as a read would.
"""

from __future__ import annotations

import mmap
from collections import deque
from collections.abc import Container
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from qubes_backup_hub.errors import QbhubError, StoreError
from qubes_backup_hub.store.base import Bytes

from .blob import BlobType
from .index import Index, encode_index, pad_index
from .index_cache import DiskIndex, spill_run
from .limits import MAX_PACK
from .pack import (
    DEFAULT_PACK_TARGET,
    ENTRY,
    PackBuilder,
    PackEntry,
    pack_name,
    plausible_size,
    read_trailer,
)
from .repository import Locator, Repository

MAX_UPLOADS_IN_FLIGHT = 2
# Entries per index object: 45 bytes each, so about 6 MiB, far under MAX_INDEX_OBJECT even with a
# pack of the largest possible entry count (a 64 MiB pack of 4 KiB blobs holds 16,384). Also the
# most of its own entries a backup keeps in memory (about 50 MB with their objects).
MAX_INDEX_ENTRIES = 1 << 17
SET_ASIDE_FILTER_BITS = 1 << 27  # 16 MiB: about 5% false candidates with 16M entries set aside


class BlobWriter:
    """Adds blobs to new packs of `repo`'s store."""

    def __init__(
        self,
        repo: Repository,
        pack_target: int = DEFAULT_PACK_TARGET,
        known_index: Locator | None = None,
        spill_dir: Path | None = None,
    ) -> None:
        self.repo = repo
        self.known_index = repo.locator if known_index is None else known_index
        self.pack_target = pack_target
        self.builder = PackBuilder(repo.sealer, pack_target)
        self.pending: set[bytes] = set()
        self.new_packs: dict[str, list[PackEntry]] = {}  # the part not yet set aside
        self.new_index = Index()
        self.new_entries = 0  # entries in new_packs
        self.spill_dir = spill_dir
        self.runs: list[DiskIndex] = []  # parts set aside on disk
        self.set_aside = SetAsideFilter()  # which IDs may be in one of them
        self.indexes: list[tuple[str, int]] = []  # index objects stored for those parts
        self.packs_total = 0
        self.uploads: deque[Future[None]] = deque()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qbhub-upload")
        self.bytes_written = 0
        self.packs_reused = 0  # orphan packs adopted in place
        self.packs_salvaged = 0  # damaged orphan packs whose authentic blobs were copied
        self.orphan_blobs_rejected = 0  # orphan blobs that failed authentication
        self.lost_packs: frozenset[str] = frozenset()
        self.blobs_restored = 0  # blobs stored again because their pack was lost
        self.chunks_restored = 0  # ... of which DATA blobs

    def known(self, blob_id: bytes) -> bool:
        """True if the archive, this writer's packs, or the open pack hold `blob_id`.

        A blob the index places in a lost pack (see `exclude_lost_packs`) is not held.
        """
        if blob_id in self.new_index or blob_id in self.pending:
            return True
        if (
            self.runs
            and blob_id in self.set_aside
            and any(run.record(blob_id) is not None for run in self.runs)
        ):
            return True
        if not self.lost_packs:
            return blob_id in self.known_index
        location = self.known_index.get(blob_id)
        return location is not None and location.pack not in self.lost_packs

    def exclude_lost_packs(self, listing: dict[str, int]) -> frozenset[str]:
        """Stop counting blobs of packs that `listing` (name -> size) lacks or sizes wrongly.

        Returns the lost packs. Blobs in them are stored again when a session meets them, so
        nothing new is built on what storage lost.
        """
        overhead = self.repo.sealer.overhead
        self.lost_packs = frozenset(
            name
            for name, end in self.known_index.blob_ends().items()
            if name not in listing or not plausible_size(listing[name], end, overhead)
        )
        return self.lost_packs

    def add_sealed(self, type_code: int, blob_id: bytes, sealed: Bytes, raw_length: int) -> bool:
        """Add an already sealed blob; return False (and store nothing) if it is known."""
        if self.known(blob_id):
            return False
        if self.lost_packs and blob_id in self.known_index:
            self.blobs_restored += 1
            self.chunks_restored += type_code == BlobType.DATA
        if not self.builder.fits(len(sealed)):
            self.flush()
        self.builder.add(type_code, blob_id, sealed, raw_length)
        self.pending.add(blob_id)
        if len(self.builder) >= self.pack_target:
            self.flush()
        return True

    def add(self, type_code: int, raw: bytes) -> bytes:
        """Seal and add `raw` unless known; return its ID."""
        blob_id = self.repo.sealer.blob_id(type_code, raw)
        if not self.known(blob_id):
            self.add_sealed(
                type_code, blob_id, self.repo.codec.encode(type_code, blob_id, raw), len(raw)
            )
        return blob_id

    def flush(self) -> None:
        """Finish the open pack (if any) and queue its upload."""
        if not self.builder.entries:
            return
        name, data, entries, buffer = self.builder.finish()
        self.pending.clear()
        self._add_new_pack(name, entries)
        self.bytes_written += len(data)
        while len(self.uploads) >= MAX_UPLOADS_IN_FLIGHT:
            self.uploads.popleft().result()
        self.uploads.append(self.pool.submit(self._upload, name, data, buffer))

    def _add_new_pack(self, name: str, entries: list[PackEntry]) -> None:
        self.new_packs[name] = entries
        self.new_index.add_pack(name, entries)
        self.new_entries += len(entries)
        self.packs_total += 1
        if self.spill_dir is not None and self.new_entries >= MAX_INDEX_ENTRIES:
            self._set_aside()

    def _set_aside(self) -> None:
        """Store the index object of the packs so far and keep their entries on disk only."""
        written = store_index(self.repo, self.new_packs)
        assert self.spill_dir is not None and written is not None
        self.bytes_written += written[2]
        self.indexes.append((written[0], written[1]))
        tables = self.new_index.tables()
        self.runs.append(spill_run(self.spill_dir, tables))
        for table in tables:
            self.set_aside.add_records(table.records)
        self.new_packs, self.new_index, self.new_entries = {}, Index(), 0

    def _upload(self, name: str, data: memoryview, buffer: mmap.mmap) -> None:
        try:
            self.repo.store.put(name, data)
        finally:
            data.release()
            self.builder.recycle(buffer)

    def reuse_orphan_packs(
        self, referenced: Container[str], listing: dict[str, int] | None = None
    ) -> int:
        """Adopt packs a crashed run uploaded but never committed; return how many in place.

        `listing` is the store's listing (name -> size), read here if not given. Each orphan is
        read whole; its trailer is authenticated, then every blob it lists is opened (AEAD with
        its type and ID as associated data, as reads do) and only blobs that open are reused.
        A pack whose bytes still hash to its name is adopted in place; one that does not (damaged
        or tampered) is left alone and its authentic blobs are copied into new packs. A pack
        whose trailer fails is ignored (never trusted, never deleted here). Adopted blobs count
        as known, so the session does not upload them again.
        """
        if listing is None:
            listing = dict(self.repo.store.list())
        for name in sorted(listing):
            if name.startswith("p") and name not in referenced and name not in self.new_packs:
                self._reuse_orphan(name)
        return self.packs_reused

    def _reuse_orphan(self, name: str) -> None:
        try:
            data = memoryview(self.repo.store.get(name, MAX_PACK))
            entries = read_trailer(self.repo.sealer, data, name)
        except (QbhubError, ValueError):
            return
        authentic = [e for e in entries if self._authentic(e, data)]
        self.orphan_blobs_rejected += len(entries) - len(authentic)
        if pack_name(data) == name:
            if authentic:
                self._add_new_pack(name, authentic)
                self.packs_reused += 1
            return
        for e in authentic:
            self.add_sealed(e.type_code, e.blob_id, bytes(data[e.offset : e.offset + e.length]),
                            e.raw_length)  # fmt: skip
        self.packs_salvaged += 1

    def _authentic(self, entry: PackEntry, data: memoryview) -> bool:
        """True if the blob `entry` locates in `data` opens under its type and ID."""
        sealed = data[entry.offset : entry.offset + entry.length]
        try:
            self.repo.codec.decode(entry.type_code, entry.blob_id, sealed, entry.raw_length)
        except (QbhubError, ValueError):
            return False
        return True

    def close(self) -> None:
        """Flush and wait for every upload; re-raise the first upload error."""
        self.flush()
        try:
            while self.uploads:
                self.uploads.popleft().result()
        finally:
            self.pool.shutdown(wait=True)

    def abandon(self) -> None:
        """Stop without committing: wait for uploads in flight, ignore their errors."""
        for future in self.uploads:
            future.exception()
        self.pool.shutdown(wait=True)
        self._close_runs()

    def _close_runs(self) -> None:
        for run in self.runs:
            run.close()
        self.runs = []

    def write_index(self) -> list[tuple[str, int]]:
        """Store this writer's index objects; return their (name, raw length), none if empty."""
        out = list(self.indexes)
        for part in split_packs(self.new_packs):
            written = store_index(self.repo, part)
            if written is not None:
                self.bytes_written += written[2]
                out.append((written[0], written[1]))
        return out

    def merge_into_repo(self) -> None:
        """After commit: make this writer's blobs part of the repository's index.

        When blobs were stored again (their pack was lost), this writer's locations come first,
        as its index object comes first in the root: the index is then loaded again when next
        used (the index cache is rebuilt, as its list of index objects no longer matches).
        When entries were set aside (a large session), the index cache file is folded here from
        the old file, the runs and the rest of this writer's entries (`fold_into_cache`), so
        the next command finds it valid instead of reading the session's index objects again.
        """
        if self.blobs_restored:
            self._close_runs()
            self.repo.forget_index()
            return
        if self.runs:
            try:
                self.repo.fold_into_cache(self.runs, self.new_index.tables())
            finally:
                self._close_runs()
            return
        for name, entries in self.new_packs.items():
            self.repo.locator.add_pack(name, entries)
            if self.repo.index_loaded and self.repo.locator is not self.repo.index:
                self.repo.index.add_pack(name, entries)


class SetAsideFilter:
    """A Bloom filter (two probes) of the IDs a backup set aside on disk.

    Saves a lookup in every set-aside run for the new chunks of a session, which are most of
    what it meets; a false candidate only costs those lookups. IDs are keyed hashes (uniform), so
    their bytes serve as the probes.
    """

    def __init__(self, bits: int | None = None) -> None:
        self.bits = bits or SET_ASIDE_FILTER_BITS
        self.table = bytearray()  # allocated at the first set-aside

    def _probes(self, blob_id: bytes) -> tuple[int, int]:
        return (
            int.from_bytes(blob_id[:8], "little") % self.bits,
            int.from_bytes(blob_id[8:16], "little") % self.bits,
        )

    def add_records(self, records: bytes) -> None:
        if not self.table:
            self.table = bytearray(self.bits // 8)
        for record in ENTRY.iter_unpack(records):
            for bit in self._probes(record[1]):
                self.table[bit >> 3] |= 1 << (bit & 7)

    def __contains__(self, blob_id: object) -> bool:
        if not self.table or not isinstance(blob_id, bytes) or len(blob_id) < 16:
            return False
        return all(self.table[bit >> 3] >> (bit & 7) & 1 for bit in self._probes(blob_id))


def split_packs(
    packs: dict[str, list[PackEntry]], max_entries: int | None = None
) -> list[dict[str, list[PackEntry]]]:
    """`packs` in parts of at most `max_entries` entries (a pack is never split), name order.

    One index object per part: readers refuse an object larger than MAX_INDEX_OBJECT, which a
    single object for a large full backup (millions of chunks) would exceed.
    """
    limit = MAX_INDEX_ENTRIES if max_entries is None else max_entries
    parts: list[dict[str, list[PackEntry]]] = []
    part: dict[str, list[PackEntry]] = {}
    count = 0
    for name in sorted(packs):
        entries = packs[name]
        if part and count + len(entries) > limit:
            parts.append(part)
            part, count = {}, 0
        part[name] = entries
        count += len(entries)
    if part:
        parts.append(part)
    return parts


def store_index(repo: Repository, packs: dict[str, list[PackEntry]]) -> tuple[str, int, int] | None:
    """Seal and store an index object for `packs`; return (name, raw length, stored length).

    The object is stored uncompressed with zero padding in its plaintext (`pad_index`), so its
    size is a multiple of PAD_TO like a pack's: it tells storage about as much as pack sizes do.
    """
    if not packs:
        return None
    plain = pad_index(encode_index(packs), repo.sealer.overhead)
    index_id = repo.sealer.blob_id(BlobType.INDEX, plain)
    name = "i" + index_id.hex()
    if name in {n for n, _ in repo.body.indexes}:  # the same index is already committed
        return name, len(plain), 0
    sealed = repo.codec.encode(BlobType.INDEX, index_id, plain, compress=False)
    try:
        repo.store.put(name, sealed)
    except StoreError:
        # Left by an interrupted run? Keep it if it authenticates, else replace it.
        try:
            existing = repo.store.get(name, len(sealed))
            repo.codec.decode(BlobType.INDEX, index_id, existing, len(plain))
        except QbhubError:
            repo.store.delete(name)
            repo.store.put(name, sealed)
    return name, len(plain), len(sealed)
