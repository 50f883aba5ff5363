"""The repository: opening an archive, reading authenticated blobs, and committing a new root.

Opening reads the root (size-capped), refuses an unencrypted one unless the user allowed it,
recalls this machine's memory of the archive ID, unwraps the key, authenticates the body, then
checks the root against that memory (rollback, substitution). The index is loaded only when a
command first needs it: `locator` (lookups: reads, dedup) comes from the local index cache
(`index_cache.py`) when the repository has a cache directory, so its memory does not grow with
the archive; `index` (the whole index in memory: verify, prune) is loaded from the index objects.
Writing goes through `writer.BlobWriter`; `commit()` writes the new root last.

Guarantees: a Repository exists only for a root authenticated under the user's passphrase (or,
with `allow_unencrypted`, the explicit opt-in, an unencrypted one; or under the keys of a read
grant dom0 made, which never writes). Rollback memory changes only after this process
authenticated or wrote a root. A reader racing a writer never reports a rollback: the root that
is compared with the memory was read after the memory was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from qubes_backup_hub.errors import (
    IntegrityError,
    NotFoundError,
    StoreError,
    UnencryptedArchiveError,
    UsageError,
)
from qubes_backup_hub.safety.rollback import (
    ArchiveFacts,
    ArchiveMemory,
    LocalState,
    check_rollback,
)
from qubes_backup_hub.store.base import Store

from . import FORMAT_VERSION
from .blob import BlobCodec, BlobType
from .crypto import (
    MASTER_KEY_BYTES,
    SUITE_AES,
    SUITE_NONE,
    Keys,
    Sealer,
    key_fingerprint,
    unwrap_key,
    wrap_key,
)
from .index import Index, PackTable, decode_index
from .index_cache import CachedIndex, DiskIndex, cache_path, open_cached, write_cache
from .limits import MAX_CHUNK_SIZE, MAX_INDEX_OBJECT, MAX_ROOT, MAX_SESSION_RECORD, MIN_CHUNK_SIZE
from .root import (
    MAX_GENERATION,
    RootBody,
    RootHeader,
    SessionRef,
    encode_root,
    open_body,
    split_root,
)
from .session import SessionRecord, decode_session
from .tree import DEFAULT_FANOUT, decode_page

DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_COMPRESSION_LEVEL = 1
GRANT_FORMAT = "qbhub-native-read-grant-1"
Announce = Callable[[ArchiveFacts], None]
Locator = Index | CachedIndex  # what lookups by ID need: get, in, add_pack, blob_ends, packs


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class OpenInfo:
    """What opening the archive learned, for the user: first contact, generation."""

    first_contact: bool
    generation: int
    updated: str


@dataclass(frozen=True)
class AuthenticatedRoot:
    """One root as read from the store, with its body authenticated under `keys`."""

    data: bytes
    header: RootHeader
    body: RootBody
    keys: Keys
    master: bytes | None  # None when opened with a read grant's keys
    fingerprint: str  # "" when opened with a read grant's keys
    root_keys: Keys | None = None  # what seals the body, when not `keys` (format 2)

    def facts(self) -> ArchiveFacts:
        """The facts a user (and the rollback memory) gets about this root."""
        sessions = self.body.sessions
        return ArchiveFacts(
            archive_id=self.header.archive_id,
            fingerprint=self.fingerprint,
            generation=self.body.generation,
            newest_session_time=sessions[-1].time if sessions else "",
            encrypted=self.header.suite != SUITE_NONE,
            sessions=tuple(s.session_id for s in sessions),
        )


def read_root(store: Store) -> bytes:
    """The stored root, size-capped; NotFoundError if the store holds no archive."""
    data = store.get_root(MAX_ROOT)
    if data is None:
        raise NotFoundError(f"no qbhub archive at {store.url} (run `qbhub init` first)")
    return data


def refuse_unencrypted(header: RootHeader, allowed: bool) -> None:
    """UnencryptedArchiveError for a suite-`none` root unless the user opted in."""
    if header.suite == SUITE_NONE and not allowed:
        raise UnencryptedArchiveError(
            f"archive {header.archive_id} is unencrypted (made with --encryption off): nothing "
            "authenticates it, so storage could have substituted it; refusing it "
            "(--allow-unencrypted is the explicit opt-in)"
        )


def unlock_master(header: RootHeader, passphrase: Callable[[], bytes]) -> bytes:
    """The master key: unwrapped under the passphrase (KDF bounds checked), or the clear one."""
    if header.suite == SUITE_AES:
        if not header.wrapped_key or not header.kdf or header.clear_key is not None:
            raise IntegrityError("the archive root lacks its wrapped key")
        return unwrap_key(
            bytes.fromhex(header.wrapped_key),
            passphrase(),
            header.kdf,
            bytes.fromhex(header.archive_id),
            header.format,
        )
    if header.suite == SUITE_NONE:
        if not header.clear_key or header.wrapped_key is not None:
            raise IntegrityError("the unencrypted archive root lacks its key")
        master = bytes.fromhex(header.clear_key)
        if len(master) != MASTER_KEY_BYTES:
            raise IntegrityError("the archive key has the wrong length")
        return master
    raise IntegrityError(f"unknown encryption suite {header.suite!r}")


def authenticate(
    data: bytes,
    passphrase: Callable[[], bytes],
    *,
    allow_unencrypted: bool,
    known_key: tuple[RootHeader, bytes] | None = None,
) -> AuthenticatedRoot:
    """Parse `data` and authenticate its body under the passphrase.

    `known_key` (a header and the master key it unwrapped to) skips the KDF when this header wraps
    the key identically (same ID, suite, KDF, salt and wrapped bytes give the same key).
    """
    raw_header, header, sealed = split_root(data)
    refuse_unencrypted(header, allow_unencrypted)
    if known_key is not None and known_key[0] == header:
        master = known_key[1]
    else:
        master = unlock_master(header, passphrase)
    keys = Keys.from_master(header.suite, master)
    root_keys = Keys.for_root(header.suite, master, header.format)
    body = open_body(raw_header, sealed, Sealer(root_keys))
    check_geometry(body)
    fingerprint = key_fingerprint(master)
    return AuthenticatedRoot(data, header, body, keys, master, fingerprint, root_keys)


def check_geometry(body: RootBody) -> None:
    if not (MIN_CHUNK_SIZE <= body.chunk_size <= MAX_CHUNK_SIZE and 2 <= body.fanout <= 65535):
        raise IntegrityError("the archive root holds impossible chunk or fan-out sizes")


def check_same_key(known: dict[str, ArchiveMemory], facts: ArchiveFacts) -> None:
    """Refuse a root whose key differs from every key this machine knows for its archive ID.

    The master key of an archive never changes and `init` always picks a new ID, so the same ID
    under another key is an archive made by someone else and given a known ID.
    """
    if known and facts.fingerprint not in known:
        raise IntegrityError(
            f"archive {facts.archive_id} is known here with another key (fingerprint "
            f"{', '.join(sorted(known))}, now {facts.fingerprint}): a substituted archive? "
            "refusing it"
        )


def parse_grant(grant: dict[str, str]) -> tuple[str, str, bytes, bytes | None]:
    """(archive ID, suite, encryption key, pinned root's key or None) from a read grant's
    secret; IntegrityError if odd."""
    try:
        if grant.get("format") != GRANT_FORMAT:
            raise ValueError("unknown grant format")
        key = bytes.fromhex(grant["encryption_key"])
        pinned = grant.get("pinned_key")
        pinned_key = bytes.fromhex(pinned) if pinned is not None else None
        archive_id, suite = str(grant["archive_id"]), str(grant["suite"])
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"the read grant is malformed ({exc})") from None
    return archive_id, suite, key, pinned_key


class Repository:
    """An opened archive."""

    def __init__(
        self,
        store: Store,
        root: AuthenticatedRoot,
        state: LocalState | None,
        first_contact: bool = False,
        cache_dir: Path | None = None,
        cache_seed: Path | None = None,
    ) -> None:
        self.store = store
        self._master = root.master
        self.header = root.header
        self.body = root.body
        self.sealer = Sealer(root.keys)
        self.root_sealer = Sealer(root.root_keys) if root.root_keys is not None else self.sealer
        self.codec = BlobCodec(self.sealer, root.body.compression_level)
        self.state = state  # None: opened with a read grant, never remembers, never writes
        self.fingerprint = root.fingerprint
        self.cache_dir = cache_dir  # the local index cache's directory; None: index in memory
        self.cache_seed = cache_seed  # another's cache file, read-only (a restore worker's)
        self._index: Index | None = None
        self._locator: Locator | None = None
        self.info = OpenInfo(first_contact, root.body.generation, root.body.updated)
        self.root_bytes = root.data  # the stored root this object reflects (open and commit)

    @property
    def index(self) -> Index:
        """The whole index in memory, loaded from the index objects on first use."""
        if self._index is None:
            self._index = Index()
            try:
                self._load_indexes()
            except BaseException:
                self._index = None
                raise
        return self._index

    @index.setter
    def index(self, index: Index) -> None:
        self._index = index
        self._locator = None

    @property
    def locator(self) -> Locator:
        """Lookups by blob ID: the local index cache if there is a cache directory and the whole
        index is not already in memory, else the in-memory index (also when the cache can't be
        written: a full disk or a read-only state directory costs memory, not the command)."""
        if self._locator is None:
            if self.cache_dir is None or self._index is not None:
                self._locator = self.index
            else:
                try:
                    self._locator = open_cached(
                        self.cache_dir, self.header.archive_id, list(self.body.indexes),
                        self.index_object_tables, seed=self.cache_seed,
                    )  # fmt: skip
                except OSError:  # no room or no right to write the cache: work in memory
                    self._locator = self.index
        return self._locator

    @property
    def index_loaded(self) -> bool:
        """True once the whole index is in memory."""
        return self._index is not None

    def forget_index(self) -> None:
        """Drop what was loaded of the index (after a root change it no longer describes)."""
        if isinstance(self._locator, CachedIndex):
            self._locator.close()
        self._index = None
        self._locator = None

    def fold_into_cache(self, runs: list[DiskIndex], tables: list[PackTable]) -> bool:
        """After a commit that appended a session's index objects: write the index cache file
        covering the root's whole list now, from the cache file in use, the index objects read
        since it was built, and the session's own entries (`runs` set aside on disk, then
        `tables`, in the order of its objects in the root). Nothing is read from the archive.

        Returns False (leaving the next command to bring the cache up to date) when lookups
        don't come from a cache, or the file can't be written. The caller guarantees that the
        session's objects were appended at the end of the root's list (no lost packs).
        """
        locator = self._locator
        archive_id = self.header.archive_id
        try:
            if not isinstance(locator, CachedIndex) or self.cache_dir is None:
                return False
            write_cache(
                cache_path(self.cache_dir, archive_id),
                archive_id,
                list(self.body.indexes),
                [locator.disk, locator.extra.tables(), *runs, tables],
            )
        except (OSError, IntegrityError):
            return False
        finally:
            self.forget_index()
        return True

    @property
    def read_only(self) -> bool:
        """True when opened with a read grant: no master key, no ID key, no commits."""
        return self._master is None

    @property
    def facts(self) -> ArchiveFacts:
        """The facts of the root this object reflects."""
        return AuthenticatedRoot(
            self.root_bytes,
            self.header,
            self.body,
            self.sealer.keys,
            self._master,
            self.fingerprint,
        ).facts()

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
        root_format: int = FORMAT_VERSION,
    ) -> Repository:
        """Create a new archive (encrypted iff `passphrase` is given) and write its first root.

        `root_format` other than the current one is for tests of older archives only."""
        if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and chunk_size % 4096 == 0):
            raise StoreError(
                f"chunk size must be a multiple of 4096 in [4 KiB, 4 MiB]: {chunk_size}"
            )
        archive_id = secrets.token_hex(16)
        master = os.urandom(MASTER_KEY_BYTES)
        if passphrase is not None:
            kdf, wrapped = wrap_key(master, passphrase, bytes.fromhex(archive_id), root_format)
            header = RootHeader(
                archive_id, SUITE_AES, kdf, wrapped_key=wrapped.hex(), format=root_format
            )
        else:
            header = RootHeader(
                archive_id, SUITE_NONE, None, clear_key=master.hex(), format=root_format
            )
        body = RootBody(0, utc_now(), chunk_size, DEFAULT_FANOUT, compression_level)
        keys = Keys.from_master(header.suite, master)
        root_keys = Keys.for_root(header.suite, master, root_format)
        fingerprint = key_fingerprint(master)
        root = AuthenticatedRoot(b"", header, body, keys, master, fingerprint, root_keys)
        repo = cls(store, root, state)
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
        allow_unencrypted: bool = False,
        announce: Announce | None = None,
        cache_dir: Path | None = None,
    ) -> Repository:
        """Open and authenticate the archive; raise on rollback, bad passphrase or damage.

        Order: read the root (to learn the archive ID), recall this machine's memory of that ID,
        authenticate the root; if it is older than the memory, read the root once more (a
        writer may have committed between our read and our recall) and judge that one, which
        was read after the memory. First contact with (ID, key) is announced; the generation is
        remembered. `reuse`, an earlier opening of the same store, saves the KDF when the header
        wraps the key identically, and the index when the root is byte-identical. The index is
        loaded when first used (`locator`, `index`), from the cache in `cache_dir` if given.
        """
        data = read_root(store)
        header = split_root(data)[1]
        refuse_unencrypted(header, allow_unencrypted)
        archive_id = header.archive_id
        known_all = state.recall_all(archive_id)
        known_key = (reuse.header, reuse._master) if reuse and reuse._master else None

        def auth(raw: bytes) -> AuthenticatedRoot:
            return authenticate(
                raw, passphrase, allow_unencrypted=allow_unencrypted, known_key=known_key
            )

        root = auth(data)
        known = known_all.get(root.fingerprint)
        if known is not None and root.body.generation < known.generation:
            again = read_root(store)
            if again != data:
                root = auth(again)
                if root.header.archive_id != archive_id:
                    raise IntegrityError("the archive changed its ID while being opened")
                known = known_all.get(root.fingerprint)
        facts = root.facts()
        check_same_key(known_all, facts)
        if known is None and announce is not None:
            announce(facts)
        check_rollback(known, facts)
        repo = cls(store, root, state, first_contact=known is None, cache_dir=cache_dir)
        if reuse is not None and reuse.root_bytes == root.data:
            repo._index, repo._locator = reuse._index, reuse._locator
        state.remember(archive_id, facts.fingerprint, facts.generation)
        return repo

    @classmethod
    def open_granted(
        cls,
        store: Store,
        grant: dict[str, str],
        *,
        cache_dir: Path | None = None,
        cache_seed: Path | None = None,
    ) -> Repository:
        """Open the archive with a read grant's keys (in a restore worker): no KDF, no passphrase,
        no rollback memory, no writes. IntegrityError unless the root authenticates under them.

        `cache_dir` (the worker's own scratch directory) holds an index cache it builds itself;
        `cache_seed`, dom0's cache file handed over read-only, is used instead when it is valid
        for this root (see `index_cache.open_cached`)."""
        archive_id, suite, key, pinned_key = parse_grant(grant)
        data = read_root(store)
        raw_header, header, sealed = split_root(data)
        if header.archive_id != archive_id or header.suite != suite:
            raise IntegrityError(
                f"the read grant is for archive {archive_id}, not for archive {header.archive_id}"
            )
        keys = Keys.for_reading(suite, key)
        root_keys = Keys.for_reading(suite, pinned_key) if pinned_key is not None else keys
        body = open_body(raw_header, sealed, Sealer(root_keys))
        check_geometry(body)
        root = AuthenticatedRoot(data, header, body, keys, None, "", root_keys)
        return cls(store, root, None, cache_dir=cache_dir, cache_seed=cache_seed)

    def read_grant(self) -> tuple[dict[str, str], bytes]:
        """What a restore worker needs to read this archive: (secret, the root to pin).

        The secret holds the archive ID, the suite and the sealing key (opens blobs and pack
        trailers). Not the passphrase, not the master key or its wrapping, not the ID key, and
        from format 2 not the root key: the worker gets this root sealed again under a key made
        for this grant alone (`pinned_key`), which dom0 never accepts a root under, so nothing
        the worker could leak lets storage forge a root.
        """
        if self.read_only:
            raise UsageError("a read grant can't be passed on")
        secret = {
            "format": GRANT_FORMAT,
            "archive_id": self.header.archive_id,
            "suite": self.header.suite,
            "encryption_key": self.sealer.keys.encryption_key.hex(),
        }
        if self.header.format < 2:  # the worker opens the root with the blob key, as stored
            return secret, self.root_bytes
        pinned_key = os.urandom(32)
        secret["pinned_key"] = pinned_key.hex()
        sealer = Sealer(Keys.for_reading(self.header.suite, pinned_key))
        return secret, encode_root(self.header, self.body, sealer)

    def _load_indexes(self) -> None:
        for name, raw_length in self.body.indexes:
            self.index_object_entries(name, raw_length, into=self.index)

    def index_object_entries(self, name: str, raw_length: int, into: Index) -> None:
        """Read, authenticate and decode index object `name` into `into`."""
        for table in self.index_object_tables(name, raw_length):
            into.add_table(table)

    def index_object_bounds(self, raw_length: int) -> tuple[int, int]:
        """The smallest and largest stored size of an index object of `raw_length` listed
        raw bytes: a sealed empty blob, and the raw form + framing byte + sealing overhead
        (index objects are stored uncompressed; older ones may be compressed, so smaller)."""
        framing = 1 + self.sealer.overhead
        return framing, raw_length + framing

    def index_object_tables(self, name: str, raw_length: int) -> list[PackTable]:
        """Read, authenticate and decode index object `name` into its pack tables."""
        if not name.startswith("i") or len(name) != 65 or raw_length > MAX_INDEX_OBJECT:
            raise IntegrityError(f"the root lists a malformed index object {name!r}")
        index_id = bytes.fromhex(name[1:])
        # A sealed index is never longer than its raw form + flag byte + sealing overhead.
        sealed = self.store.get(name, self.index_object_bounds(raw_length)[1])
        plain = self.codec.decode(BlobType.INDEX, index_id, sealed, raw_length)
        return decode_index(plain)

    # -- reading ----------------------------------------------------------------------------

    def read_blob(self, blob_id: bytes, type_code: int, max_length: int) -> bytes:
        """Fetch, authenticate and decompress one blob of the expected type."""
        loc = self.locator.get(blob_id)
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
        if self.read_only or self.state is None:
            raise UsageError("this archive was opened with a read grant: it can only be read")
        if self.body.generation >= MAX_GENERATION:  # checked before anything is written
            raise IntegrityError(
                f"the archive root claims generation {self.body.generation}, the most there can "
                "be: refusing to write after it (a root forged with a leaked key?)"
            )
        self.body.generation += 1
        self.body.updated = utc_now()
        root = encode_root(self.header, self.body, self.root_sealer)
        self.store.put_root(root)
        self.root_bytes = root
        self.state.remember(self.header.archive_id, self.fingerprint, self.body.generation)
        self.info.generation = self.body.generation

    def rewrap(self, new_passphrase: bytes) -> None:
        """Wrap the same master key under `new_passphrase` (encrypted archives only)."""
        if self.header.suite != SUITE_AES or self.header.wrapped_key is None or not self.header.kdf:
            raise StoreError("this archive is not encrypted: it has no passphrase to change")
        if self._master is None:
            raise UsageError("this archive was opened with a read grant: it can only be read")
        archive_id = bytes.fromhex(self.header.archive_id)
        kdf, wrapped = wrap_key(self._master, new_passphrase, archive_id, FORMAT_VERSION)
        self.header.kdf = kdf
        self.header.wrapped_key = wrapped.hex()
        self.header.format = FORMAT_VERSION  # an older archive takes the current format here
        self.root_sealer = Sealer(Keys.for_root(self.header.suite, self._master, FORMAT_VERSION))
        self.commit()
