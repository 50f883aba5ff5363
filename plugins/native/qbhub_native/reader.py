"""Random access to one archived volume: the chunk under an offset, fetched and authenticated
only when read, with small caches of leaf pages and chunks (for `qbhub mount`).

Opening reads only the tree pages above the leaves (32 bytes per 256 chunks); a read then loads
the leaf page it falls in and the chunks it covers. Nothing unauthenticated is returned: every
page and chunk goes through Repository.read_blob (type, ID and length checked).
"""

from __future__ import annotations

from collections import OrderedDict

from qubes_backup_hub.errors import IntegrityError

from .blob import BlobType
from .repository import Repository
from .session import VolumeRecord
from .tree import ID_BYTES, ZERO_ID, leaf_ids

LEAF_CACHE = 64  # leaf pages kept (each names 256 chunks)
CHUNK_CACHE = 32  # chunks kept (2 MiB at 64 KiB): a reader re-reading a block hits the cache


class NativeVolumeReader:
    """Engine.open_volume's reader for the native engine."""

    def __init__(self, repo: Repository, session: str, volume: VolumeRecord) -> None:
        self.repo, self.session, self.volume = repo, session, volume
        self.geometry = volume.geometry
        self.size = volume.size
        self.leaves = leaf_ids(volume.tree_id, self.geometry, repo.load_page)
        self._leaf_cache: OrderedDict[int, bytes] = OrderedDict()
        self._chunk_cache: OrderedDict[int, bytes] = OrderedDict()
        self.chunks_fetched = 0
        self.bytes_fetched = 0

    def read(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + max(length, 0))
        out = bytearray()
        chunk_size = self.geometry.chunk_size
        while 0 <= offset < end:
            chunk, within = divmod(offset, chunk_size)
            data = self._chunk(chunk)
            piece = data[within : within + end - offset]
            out += piece
            offset += len(piece)
        return bytes(out)

    def _chunk(self, chunk: int) -> bytes:
        cached = self._chunk_cache.get(chunk)
        if cached is not None:
            self._chunk_cache.move_to_end(chunk)
            return cached
        length = self.geometry.chunk_length(chunk)
        leaf, k = divmod(chunk, self.geometry.fanout)
        entries = self._leaf(leaf)
        blob_id = entries[k * ID_BYTES : (k + 1) * ID_BYTES] if entries else ZERO_ID
        if blob_id == ZERO_ID:
            data = bytes(length)
        else:
            data = self.repo.read_blob(blob_id, BlobType.DATA, length)
            if len(data) != length:
                raise IntegrityError(
                    f"chunk {chunk} of volume {self.volume.name} has the wrong length"
                )
            self.chunks_fetched += 1
            self.bytes_fetched += length
        self._chunk_cache[chunk] = data
        if len(self._chunk_cache) > CHUNK_CACHE:
            self._chunk_cache.popitem(last=False)
        return data

    def _leaf(self, leaf: int) -> bytes:
        cached = self._leaf_cache.get(leaf)
        if cached is not None:
            self._leaf_cache.move_to_end(leaf)
            return cached
        page_id = self.leaves[leaf]
        entries = (
            b""
            if page_id == ZERO_ID
            else self.repo.load_page(page_id, 0, self.geometry.children(0, leaf))
        )
        self._leaf_cache[leaf] = entries
        if len(self._leaf_cache) > LEAF_CACHE:
            self._leaf_cache.popitem(last=False)
        return entries
