"""NativeEngine: the host's Engine interface implemented over the native archive format."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from qubes_backup_hub.engine import Engine, EngineContext, ReadGrant, VolumeSource
from qubes_backup_hub.errors import IntegrityError, NotFoundError, QbhubError, UsageError
from qubes_backup_hub.safety.restore_header import RestoreHeader, RestoreVolume
from qubes_backup_hub.safety.rollback import LocalState
from qubes_backup_hub.session_notes import summary
from qubes_backup_hub.store.base import Store

from .archiver import run_session
from .compare import compare_volume
from .index_cache import cache_path
from .key_backup import (
    RootOverride,
    check_export,
    exported_header,
    first_that_opens,
    read_stored_root,
    repair_candidates,
)
from .limits import MAX_ROOT
from .prune import choose_sessions, prune_archive
from .reader import NativeVolumeReader
from .repository import DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_LEVEL, Repository
from .restore import VolumeRestore
from .root import split_root
from .session import SessionRecord, VolumeRecord
from .verify import verify_archive

INDEX_CACHE_DIR = "index-cache"  # in the local state directory: see index_cache.py
# Engine option set in a restore worker: a read-only directory holding dom0's index cache files.
INDEX_CACHE_SEED_OPTION = "index_cache_seed"
CAPABILITIES = frozenset(
    {
        "encryption",
        "authentication",
        "incremental",
        "changed-ranges",
        "dedup",
        "rollback-detection",
        "prune",
        "verify",
        "rekey",
    }
)


class NativeEngine(Engine):
    """qbhub's own block-delta engine."""

    def __init__(self, context: EngineContext) -> None:
        self.context = context
        self.state = LocalState(context.state_dir)
        self._repos: dict[int, Repository] = {}

    def _open(self, store: Store, *, fresh: bool = False) -> Repository:
        """Open `store` once per engine and store object (one KDF run, one index load).

        Writers pass `fresh=True` (under the store lock) so they never act on a stale root; the
        root is then read again, and the cached key and index are reused only if they still fit.
        With a read grant (a restore worker) the grant's keys open the archive: no passphrase,
        no KDF, no rollback memory (the worker's is throwaway; dom0 checked the root).
        """
        cached = self._repos.get(id(store))
        if cached is not None and cached.store is not store:
            cached = None
        if cached is not None and not fresh:
            return cached
        if self.context.read_grant is not None:
            if fresh:
                raise UsageError("a restore worker holds a read grant: it can't write")
            repo = self._open_granted(store, self.context.read_grant)
        else:
            repo = self._open_with_passphrase(store, reuse=cached)
        self._repos[id(store)] = repo
        return repo

    def _open_granted(self, store: Store, grant: dict[str, str]) -> Repository:
        """A restore worker's opening: lookups from dom0's index cache when it was handed one
        (read-only) and it fits this root, else from a cache built in the worker's own state."""
        seed_dir = self.context.options.get(INDEX_CACHE_SEED_OPTION)
        repo = Repository.open_granted(
            store, grant, cache_dir=self.context.state_dir / INDEX_CACHE_DIR
        )
        if seed_dir:
            repo.cache_seed = cache_path(Path(str(seed_dir)), repo.header.archive_id)
        return repo

    def _open_with_passphrase(self, store: Store, *, reuse: Repository | None = None) -> Repository:
        return Repository.open(
            store,
            lambda: self.context.passphrase.get(),
            self.state,
            reuse=reuse,
            allow_unencrypted=self.context.allow_unencrypted,
            announce=self.context.announce,
            cache_dir=self.context.state_dir / INDEX_CACHE_DIR,
        )

    def _refuse_if_granted(self) -> None:
        """Writes never happen with a read grant: refuse before anything is uploaded."""
        if self.context.read_grant is not None:
            raise UsageError("a restore worker holds a read grant: it can't write")

    def _archive_info(self, repo: Repository) -> dict[str, Any]:
        return {
            "archive_id": repo.header.archive_id,
            "encryption": repo.header.suite,
            "fingerprint": repo.fingerprint or None,
            "generation": repo.body.generation,
            "updated": repo.body.updated,
            "first_contact": repo.info.first_contact,
        }

    def grant_read(self, store: Store) -> ReadGrant:
        """Open the archive here (the KDF runs in dom0) with every check of an opening
        (unencrypted refusal, first-contact announcement, rollback, remembering), and return
        the facts of that root, the root's exact bytes, and the keys that read it (never the
        passphrase, the master key or its wrapping, nor the ID key that writing needs)."""
        self._refuse_if_granted()
        repo = self._open_with_passphrase(store)
        secret, pinned_root = repo.read_grant()
        return ReadGrant(facts=repo.facts, secret=secret, pinned_root=pinned_root)

    def prepare(self, store: Store) -> None:
        self._open(store).locator  # noqa: B018 - warms the index (cache) up for the backup

    def init_archive(self, store: Store, *, encryption: bool) -> dict[str, Any]:
        self._refuse_if_granted()
        if store.exists():
            raise UsageError(f"{store.url} already holds an archive")
        options = self.context.options
        passphrase = self.context.passphrase.get(confirm=True) if encryption else None
        repo = Repository.create(
            store,
            passphrase=passphrase,
            state=self.state,
            chunk_size=int(options.get("chunk_size") or DEFAULT_CHUNK_SIZE),
            compression_level=int(options.get("compression_level", DEFAULT_COMPRESSION_LEVEL)),
        )
        return {**self._archive_info(repo), "chunk_size": repo.body.chunk_size, "url": store.url}

    def backup(
        self,
        store: Store,
        volumes: list[VolumeSource],
        *,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        self._refuse_if_granted()
        with store.lock():
            repo = self._open(store, fresh=True)
            record, writer = run_session(
                repo,
                volumes,
                self.context.hook,
                self.context.progress,
                metadata=metadata,
            )
        return {
            **self._archive_info(repo),
            "session": record.session_id,
            "volumes": [_volume_summary(v) for v in record.volumes],
            "bytes_stored": writer.bytes_written,
            "packs_written": writer.packs_total - writer.packs_reused,
            "packs_reused": writer.packs_reused,
        }

    def restore_volume(
        self, store: Store, name: str, target: Path, *, session: str | None, overwrite: bool
    ) -> dict[str, Any]:
        repo = self._open(store)
        record, volume = _find_volume(repo, name, session)
        header = RestoreHeader(
            volumes=(RestoreVolume(volume.name, volume.size),), session=record.session_id
        )
        self.context.hook.qbhub_validate_restore(header=header)
        result = VolumeRestore(repo, self.context.progress).run(volume, target, overwrite=overwrite)
        return {**self._archive_info(repo), "session": record.session_id, **result}

    def list_sessions(self, store: Store, *, session: str | None) -> dict[str, Any]:
        repo = self._open(store)
        refs = [repo.find_session(session)] if session else repo.body.sessions
        sessions = []
        for ref in refs:
            record = repo.session_record(ref)
            sessions.append(
                {
                    "session": record.session_id,
                    "started": record.started,
                    "finished": record.finished,
                    "volumes": [_volume_summary(v) for v in record.volumes],
                    "bytes_stored": sum(v.bytes_new for v in record.volumes),
                    "bytes_read": sum(v.bytes_read for v in record.volumes),
                    "engine": "native",
                    **summary(record.metadata),
                }
            )
        stored = sum(size for _, size in store.list())
        return {**self._archive_info(repo), "sessions": sessions, "archive_bytes": stored}

    def verify(self, store: Store, *, quick: bool) -> dict[str, Any]:
        repo = self._open(store)
        return {
            **self._archive_info(repo),
            **verify_archive(repo, quick=quick, progress=self.context.progress),
        }

    def prune(self, store: Store, *, sessions: list[str], keep_last: int | None) -> dict[str, Any]:
        self._refuse_if_granted()
        with store.lock():
            repo = self._open(store, fresh=True)
            drop = choose_sessions(repo, sessions, keep_last)
            result = prune_archive(repo, drop, self.context.progress)
        return {**self._archive_info(repo), **result}

    def change_passphrase(self, store: Store) -> dict[str, Any]:
        self._refuse_if_granted()
        if self.context.new_passphrase is None:
            raise UsageError("no new passphrase source given")
        with store.lock():
            repo = self._open(store, fresh=True)
            repo.rewrap(self.context.new_passphrase.get(confirm=True))
        return self._archive_info(repo)

    def export_key(self, store: Store) -> dict[str, Any]:
        self._refuse_if_granted()
        repo = self._open(store)
        if repo.header.wrapped_key is None:
            raise UsageError("this archive is not encrypted: it has no key to export")
        header = exported_header(repo.root_bytes)
        return {**self._archive_info(repo), "format": repo.header.format, "header": header}

    def import_key(self, store: Store, header: bytes) -> dict[str, Any]:
        self._refuse_if_granted()
        exported = check_export(header)
        with store.lock():
            stored = read_stored_root(store)
            try:
                current = split_root(stored)[1]
            except IntegrityError:
                current = None
            if current is not None and current.archive_id != exported.archive_id:
                raise UsageError(
                    f"this export is of archive {exported.archive_id}, not of {current.archive_id}"
                )
            try:
                self._open_with_passphrase(store)
            except QbhubError:
                pass  # damaged (or a wrong passphrase): try the export
            else:
                raise UsageError(
                    "the archive's root opens with this passphrase: its key is intact, "
                    "nothing to import"
                )
            repo = first_that_opens(
                repair_candidates(stored, header),
                lambda root: self._open_with_passphrase(cast(Store, RootOverride(store, root))),
            )
            repo.commit()
        return {**self._archive_info(repo), "repaired": True}

    def archive_id(self, store: Store) -> str:
        data = store.get_root(MAX_ROOT)
        if data is None:
            raise NotFoundError(f"no qbhub archive at {store.url} (run `qbhub init` first)")
        return split_root(data)[1].archive_id

    def compare_volume(
        self, store: Store, name: str, path: Path, *, session: str | None
    ) -> dict[str, Any]:
        repo = self._open(store)
        record, volume = _find_volume(repo, name, session)
        stream = self.context.hook.qbhub_open_stream(path=str(path))
        if stream is None:
            raise UsageError(f"no installed stream plugin can read {path}")
        with stream:
            result = compare_volume(repo, volume, stream, self.context.progress)
        return {**self._archive_info(repo), "session": record.session_id, "path": str(path),
                **result}  # fmt: skip

    def describe_session(self, store: Store, session: str | None) -> dict[str, Any]:
        repo = self._open(store)
        if not repo.body.sessions:
            raise NotFoundError("the archive holds no session")
        ref = repo.find_session(session) if session else repo.body.sessions[-1]
        record = repo.session_record(ref)
        return {
            **self._archive_info(repo),
            "session": record.session_id,
            "metadata": record.metadata,
            "volumes": [{"name": v.name, "size": v.size} for v in record.volumes],
        }

    def open_volume(self, store: Store, session: str | None, name: str) -> NativeVolumeReader:
        repo = self._open(store)
        record, volume = _find_volume(repo, name, session)
        return NativeVolumeReader(repo, record.session_id, volume)

    def stream_volume(
        self, store: Store, session: str, name: str, write: Callable[[bytes], None]
    ) -> int:
        repo = self._open(store)
        _, volume = _find_volume(repo, name, session)
        return VolumeRestore(repo, self.context.progress).stream(volume, write)


def _find_volume(
    repo: Repository, name: str, session: str | None
) -> tuple[SessionRecord, VolumeRecord]:
    refs = [repo.find_session(session)] if session else list(reversed(repo.body.sessions))
    for ref in refs:
        record = repo.session_record(ref)
        volume = record.volume(name)
        if volume is not None:
            return record, volume
    where = f"session {session}" if session else "any session"
    raise NotFoundError(f"no volume named {name!r} in {where}")


def _volume_summary(v: VolumeRecord) -> dict[str, Any]:
    return {
        "name": v.name,
        "size": v.size,
        "provider": v.provider,
        "bytes_read": v.bytes_read,
        "chunks_new": v.chunks_new,
        "bytes_stored": v.bytes_new,
    }
