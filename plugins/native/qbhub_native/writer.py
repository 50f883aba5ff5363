"""Writing blobs: packing sealed blobs into packs and uploading them in the background.

A BlobWriter belongs to one writing operation (a backup session or a prune). It never adds a blob
the archive already holds, keeps the entries of the packs it wrote (the new index object), and
uploads finished packs on a background thread so sealing and uploading overlap.
"""

from __future__ import annotations

import mmap
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from qubes_backup_hub.errors import QbhubError, StoreError
from qubes_backup_hub.store.base import Bytes

from .blob import BlobType
from .index import Index, encode_index
from .pack import (
    DEFAULT_PACK_TARGET,
    FOOTER,
    PackBuilder,
    PackEntry,
    parse_trailer,
    trailer_location,
)
from .repository import Repository

MAX_UPLOADS_IN_FLIGHT = 2


class BlobWriter:
    """Adds blobs to new packs of `repo`'s store."""

    def __init__(
        self,
        repo: Repository,
        pack_target: int = DEFAULT_PACK_TARGET,
        known_index: Index | None = None,
    ) -> None:
        self.repo = repo
        self.known_index = repo.index if known_index is None else known_index
        self.pack_target = pack_target
        self.builder = PackBuilder(repo.sealer, pack_target)
        self.pending: set[bytes] = set()
        self.new_packs: dict[str, list[PackEntry]] = {}
        self.new_index = Index()
        self.uploads: deque[Future[None]] = deque()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qbhub-upload")
        self.bytes_written = 0
        self.packs_reused = 0

    def known(self, blob_id: bytes) -> bool:
        """True if the archive, this writer's packs, or the open pack already hold `blob_id`."""
        return blob_id in self.known_index or blob_id in self.new_index or blob_id in self.pending

    def add_sealed(self, type_code: int, blob_id: bytes, sealed: Bytes, raw_length: int) -> bool:
        """Add an already sealed blob; return False (and store nothing) if it is known."""
        if self.known(blob_id):
            return False
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
        self.new_packs[name] = entries
        self.new_index.add_pack(name, entries)
        self.bytes_written += len(data)
        while len(self.uploads) >= MAX_UPLOADS_IN_FLIGHT:
            self.uploads.popleft().result()
        self.uploads.append(self.pool.submit(self._upload, name, data, buffer))

    def _upload(self, name: str, data: memoryview, buffer: mmap.mmap) -> None:
        try:
            self.repo.store.put(name, data)
        finally:
            data.release()
            self.builder.recycle(buffer)

    def reuse_orphan_packs(self, referenced: set[str]) -> int:
        """Adopt packs a crashed run uploaded but never committed; return how many.

        Each orphan's trailer is authenticated; one that fails is ignored (never trusted, never
        deleted here). Adopted blobs count as known, so the session does not upload them again.
        """
        adopted = 0
        for name, size in list(self.repo.store.list()):
            if not name.startswith("p") or name in referenced or name in self.new_packs:
                continue
            try:
                footer = self.repo.store.get_range(name, size - FOOTER.size, FOOTER.size)
                offset, length = trailer_location(size, footer, name)
                sealed = self.repo.store.get_range(name, offset, length)
                entries = parse_trailer(self.repo.sealer, sealed, name, size)
            except (QbhubError, ValueError):
                continue
            self.new_packs[name] = entries
            self.new_index.add_pack(name, entries)
            adopted += 1
        self.packs_reused = adopted
        return adopted

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

    def write_index(self) -> tuple[str, int] | None:
        """Store this writer's index object; return (name, raw length), or None if empty."""
        written = store_index(self.repo, self.new_packs)
        if written is not None:
            self.bytes_written += written[2]
            return written[0], written[1]
        return None

    def merge_into_repo(self) -> None:
        """After commit: make this writer's blobs part of the repository's index."""
        for name, entries in self.new_packs.items():
            self.repo.index.add_pack(name, entries)


def store_index(repo: Repository, packs: dict[str, list[PackEntry]]) -> tuple[str, int, int] | None:
    """Seal and store an index object for `packs`; return (name, raw length, stored length)."""
    if not packs:
        return None
    plain = encode_index(packs)
    index_id = repo.sealer.blob_id(BlobType.INDEX, plain)
    name = "i" + index_id.hex()
    if name in {n for n, _ in repo.body.indexes}:  # the same index is already committed
        return name, len(plain), 0
    sealed = repo.codec.encode(BlobType.INDEX, index_id, plain)
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
