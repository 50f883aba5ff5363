"""The repository: opening an archive, reading authenticated blobs, and committing a new root.

Opening reads the root (size-capped), unwraps the key, authenticates the body, refuses a root
older than the newest this machine saw (rollback), and loads every index object the root lists.
Writing goes through `writer.BlobWriter`; `commit()` writes the new root last.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import blake3

from qubes_backup_hub.errors import IntegrityError, NotFoundError, RollbackError, StoreError
from qubes_backup_hub.safety.rollback import LocalState
from qubes_backup_hub.store.base import Store

from .blob import BlobCodec, BlobType
from .crypto import MASTER_KEY_BYTES, SUITE_AES, SUITE_NONE, Keys, Sealer, unwrap_key, wrap_key
from .index import Index, decode_index
from .limits import MAX_CHUNK_SIZE, MAX_INDEX_OBJECT, MAX_ROOT, MAX_SESSION_RECORD, MIN_CHUNK_SIZE
from .root import RootBody, RootHeader, SessionRef, encode_root, open_body, split_root
from .session import SessionRecord, decode_session
from .tree import DEFAULT_FANOUT, decode_page

DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_COMPRESSION_LEVEL = 1
CONTEXT_FINGERPRINT = "qbhub 2026-11 v1 archive fingerprint"


def archive_identity(suite: str, master: bytes) -> str:
    """A one-way fingerprint of the suite and master key, remembered locally per archive ID.

    It survives passphrase changes (the master key stays) and exposes nothing about the key.
    """
    return (
        suite + ":" + blake3.blake3(master, derive_key_context=CONTEXT_FINGERPRINT).hexdigest()[:32]
    )


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class OpenInfo:
    """What opening the archive learned, for the user: first contact, generation."""

    first_contact: bool
    generation: int
    updated: str


class Repository:
    """An opened archive."""

    def __init__(
        self,
        store: Store,
        header: RootHeader,
        body: RootBody,
        master: bytes,
        state: LocalState,
        first_contact: bool = False,
    ) -> None:
        self.store = store
        self._master = master
        sealer = Sealer(Keys.from_master(header.suite, master))
        self.header = header
        self.body = body
        self.sealer = sealer
        self.codec = BlobCodec(sealer, body.compression_level)
        self.state = state
        self.index = Index()
        self.info = OpenInfo(first_contact, body.generation, body.updated)
        self.root_bytes = b""  # the stored root this object reflects (set by open and commit)

    # -- creating and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        store: Store,
        *,
        passphrase: bytes | None,
        state: LocalState,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    ) -> Repository:
        """Create a new archive (encrypted iff `passphrase` is given) and write its first root."""
        if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and chunk_size % 4096 == 0):
            raise StoreError(
                f"chunk size must be a multiple of 4096 in [4 KiB, 4 MiB]: {chunk_size}"
            )
        archive_id = secrets.token_hex(16)
        master = os.urandom(MASTER_KEY_BYTES)
        if passphrase is not None:
            kdf, wrapped = wrap_key(master, passphrase, bytes.fromhex(archive_id))
            header = RootHeader(archive_id, SUITE_AES, kdf, wrapped_key=wrapped.hex())
        else:
            header = RootHeader(archive_id, SUITE_NONE, None, clear_key=master.hex())
        body = RootBody(0, utc_now(), chunk_size, DEFAULT_FANOUT, compression_level)
        repo = cls(store, header, body, master, state)
        store.create()
        repo.commit()
        return repo

    @classmethod
    def open(
        cls,
        store: Store,
        passphrase: Callable[[], bytes],
        state: LocalState,
        *,
        reuse: Repository | None = None,
    ) -> Repository:
        """Open and authenticate the archive; raise on rollback, bad passphrase or damage.

        `reuse`, an earlier opening of the same store, saves work that still fits the root read
        now: its master key when the header wraps it identically (same wrapped bytes and KDF, so
        unwrapping would give the same key), and its index when the whole root is byte-identical.
        Every check below still runs on the root read now.
        """
        data = store.get_root(MAX_ROOT)
        if data is None:
            raise NotFoundError(f"no qbhub archive at {store.url} (run `qbhub init` first)")
        raw_header, header, sealed = split_root(data)
        archive_id = bytes.fromhex(header.archive_id)
        if reuse is not None and reuse.header == header:
            master = reuse.master_key
        elif header.suite == SUITE_AES:
            if not header.wrapped_key or not header.kdf:
                raise IntegrityError("the archive root lacks its wrapped key")
            master = unwrap_key(
                bytes.fromhex(header.wrapped_key), passphrase(), header.kdf, archive_id
            )
        elif header.suite == SUITE_NONE:
            if not header.clear_key:
                raise IntegrityError("the unencrypted archive root lacks its key")
            master = bytes.fromhex(header.clear_key)
            if len(master) != MASTER_KEY_BYTES:
                raise IntegrityError("the archive key has the wrong length")
        else:
            raise IntegrityError(f"unknown encryption suite {header.suite!r}")
        body = open_body(raw_header, sealed, Sealer(Keys.from_master(header.suite, master)))
        if not (MIN_CHUNK_SIZE <= body.chunk_size <= MAX_CHUNK_SIZE and 2 <= body.fanout <= 65535):
            raise IntegrityError("the archive root holds impossible chunk or fan-out sizes")
        identity = archive_identity(header.suite, master)
        known = state.recall(header.archive_id)
        if known is not None and known.identity and known.identity != identity:
            raise IntegrityError(
                f"archive {header.archive_id} is not the one this machine knows by that ID: its "
                "key or encryption changed (a substituted archive?); refusing it"
            )
        if known is not None and body.generation < known.generation:
            seen = datetime.fromtimestamp(known.seen_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
            raise RollbackError(
                f"archive rollback detected: the root is generation {body.generation}, "
                f"but generation {known.generation} was seen here on {seen}"
            )
        repo = cls(store, header, body, master, state, first_contact=known is None)
        repo.root_bytes = data
        if reuse is not None and reuse.root_bytes == data:
            repo.index = reuse.index
        else:
            repo._load_indexes()
        state.remember(header.archive_id, body.generation, identity)
        return repo

    def _load_indexes(self) -> None:
        for name, raw_length in self.body.indexes:
            self.index_object_entries(name, raw_length, into=self.index)

    def index_object_entries(self, name: str, raw_length: int, into: Index) -> None:
        """Read, authenticate and decode index object `name` into `into`."""
        if not name.startswith("i") or len(name) != 65 or raw_length > MAX_INDEX_OBJECT:
            raise IntegrityError(f"the root lists a malformed index object {name!r}")
        index_id = bytes.fromhex(name[1:])
        # A sealed index is never longer than its raw form + flag byte + sealing overhead.
        sealed = self.store.get(name, raw_length + 1 + self.sealer.overhead)
        plain = self.codec.decode(BlobType.INDEX, index_id, sealed, raw_length)
        for table in decode_index(plain):
            into.add_table(table)

    # -- reading ----------------------------------------------------------------------------

    def read_blob(self, blob_id: bytes, type_code: int, max_length: int) -> bytes:
        """Fetch, authenticate and decompress one blob of the expected type."""
        loc = self.index.get(blob_id)
        if loc is None:
            raise IntegrityError(
                f"{BlobType(type_code).name.lower()} blob {blob_id.hex()[:16]} is missing "
                "from the archive index"
            )
        if loc.type_code != type_code or loc.raw_length > max_length:
            raise IntegrityError(f"blob {blob_id.hex()[:16]} has the wrong type or size")
        sealed = self.store.get_range(loc.pack, loc.offset, loc.length)
        return self.codec.decode(type_code, blob_id, sealed, loc.raw_length)

    def load_page(self, page_id: bytes, level: int, count: int) -> bytes:
        """Read one tree page and check it fits where the parent put it."""
        data = self.read_blob(page_id, BlobType.TREE, 8 + count * 32)
        return decode_page(data, level, count, f"tree page {page_id.hex()[:16]}")

    def session_record(self, ref: SessionRef) -> SessionRecord:
        data = self.read_blob(ref.record, BlobType.SESSION, MAX_SESSION_RECORD)
        record = decode_session(data)
        if record.session_id != ref.session_id:
            raise IntegrityError(
                f"session record {ref.record.hex()[:16]} belongs to {record.session_id}, "
                f"not {ref.session_id}"
            )
        return record

    def find_session(self, session_id: str) -> SessionRef:
        for ref in self.body.sessions:
            if ref.session_id == session_id:
                return ref
        raise NotFoundError(f"no session {session_id} in the archive")

    # -- committing -------------------------------------------------------------------------

    def commit(self) -> None:
        """Write the root with the next generation; the only mutation of the archive."""
        self.body.generation += 1
        self.body.updated = utc_now()
        root = encode_root(self.header, self.body, self.sealer)
        self.store.put_root(root)
        self.root_bytes = root
        self.state.remember(
            self.header.archive_id,
            self.body.generation,
            archive_identity(self.header.suite, self._master),
        )
        self.info.generation = self.body.generation

    @property
    def master_key(self) -> bytes:
        return self._master

    def rewrap(self, new_passphrase: bytes) -> None:
        """Wrap the same master key under `new_passphrase` (encrypted archives only)."""
        if self.header.suite != SUITE_AES or self.header.wrapped_key is None or not self.header.kdf:
            raise StoreError("this archive is not encrypted: it has no passphrase to change")
        kdf, wrapped = wrap_key(self._master, new_passphrase, bytes.fromhex(self.header.archive_id))
        self.header.kdf = kdf
        self.header.wrapped_key = wrapped.hex()
        self.commit()
