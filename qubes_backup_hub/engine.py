"""What an engine is to the host: its registration record and the operations the CLI calls."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pluggy

    from .passphrase import PassphraseSource
    from .progress import Progress
    from .safety.rollback import ArchiveFacts
    from .store.base import Store

# Capability words an engine may declare (shown by `qbhub engines`).
CAPABILITIES = {
    "encryption": "encrypts data and metadata before they leave this machine",
    "authentication": "detects any modification of stored data and metadata",
    "incremental": "stores only what changed since the previous session",
    "changed-ranges": "uses snapshot change metadata instead of rescanning whole volumes",
    "dedup": "stores identical chunks once, across sessions and volumes",
    "rollback-detection": "refuses an archive root older than the newest seen here",
    "prune": "removes sessions and reclaims their space",
    "verify": "re-reads and authenticates everything stored",
    "rekey": "changes the passphrase without re-encrypting data",
    "append-only": "init --append-only: storage keeps everything it is sent except on prune",
}


@dataclass(frozen=True)
class VolumeSource:
    """One volume to back up: its name in the archive and the view to read it from.

    `changed_ranges` lists (offset, length) byte ranges that may differ from this volume's copy
    in session `base_session` (the session the snapshot provider last committed); None means
    unknown. The engine trusts the ranges only if `base_session` is still the newest session
    holding the volume; otherwise it scans everything. `provider` names the snapshot provider.
    """

    name: str
    path: str
    changed_ranges: list[tuple[int, int]] | None = None
    provider: str = "plain"
    base_session: str | None = None


@dataclass
class EngineContext:
    """Everything an engine gets from the host: hooks, passphrases, local state, progress.

    `allow_unencrypted`: the user asked for an unencrypted archive (`--allow-unencrypted`);
    without it an engine refuses to read or write any archive whose root is not authenticated
    under the user's passphrase (exit 3), so storage cannot downgrade or substitute one.
    `announce`: called once with the authenticated ArchiveFacts when this machine meets an
    archive for the first time (the CLI prints `ArchiveFacts.line()`).
    `read_grant`: set only in a restore worker: the secret from `Engine.grant_read` that lets
    the engine read (never write) the archive without the passphrase.
    """

    hook: pluggy.HookRelay
    passphrase: PassphraseSource
    state_dir: Path
    progress: Progress
    new_passphrase: PassphraseSource | None = None
    options: dict[str, Any] = field(default_factory=dict)
    allow_unencrypted: bool = False
    announce: Callable[[ArchiveFacts], None] | None = None
    read_grant: dict[str, str] | None = None


@dataclass(frozen=True)
class ReadGrant:
    """What dom0 hands a restore worker instead of the passphrase (see `Engine.grant_read`).

    `facts` come from the root dom0 authenticated itself; `pinned_root` is the exact root dom0
    read and authenticated, which dom0's relay serves to the worker instead of asking storage
    again (empty for engines without one); `secret` is what the worker's engine needs to read.
    """

    facts: ArchiveFacts
    secret: dict[str, str]
    pinned_root: bytes


@dataclass(frozen=True)
class VMRestoreJob:
    """A VM-level restore as dom0 asks a worker for it: the session (None: the newest), the VMs
    (as the session names them), and whether to send settings without volume data."""

    session: str | None
    vms: list[str]
    settings_only: bool = False


class RestoreStream(Protocol):
    """dom0's end of a worker that sends the strict restore stream (`safety.restore_channel`):
    HEADER, then DATA frames carrying exactly the declared bytes, then END.

    `sessions`: the archive's sessions as dom0 checked them against its rollback memory; the
    header must name one of them (the one asked for, else the newest). `next_frame` returns the
    next HEADER, DATA or END frame and raises QbhubError for anything else (a FAIL frame, a frame
    over its size cap, the worker's end). `abort` kills the worker; `close` waits for its end.
    """

    sessions: list[str]

    def next_frame(self) -> tuple[bytes, bytes]: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


class Engine(ABC):
    """The operations a backup engine offers; every method returns a JSON-serialisable dict.

    `restores_in_own_worker`: VM-level restores run in this engine's own worker
    (`open_vm_restore`), not in the hub's restore worker with a read grant (`grant_read`): for
    engines whose tool needs the passphrase to read.
    """

    restores_in_own_worker: bool = False

    @abstractmethod
    def init_archive(self, store: Store, *, encryption: bool) -> dict[str, Any]:
        """Create a new, empty archive in `store` (refuse if one exists)."""

    @abstractmethod
    def backup(
        self,
        store: Store,
        volumes: list[VolumeSource],
        *,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Back up `volumes` as one new session and commit it, with `metadata` stored (encrypted)
        in the session record (VM settings, for VM-level backups)."""

    @abstractmethod
    def restore_volume(
        self, store: Store, name: str, target: Path, *, session: str | None, overwrite: bool
    ) -> dict[str, Any]:
        """Restore volume `name` (newest session holding it, or `session`) to `target`."""

    @abstractmethod
    def list_sessions(self, store: Store, *, session: str | None) -> dict[str, Any]:
        """Describe the archive's sessions (or one session's volumes)."""

    @abstractmethod
    def verify(self, store: Store, *, quick: bool) -> dict[str, Any]:
        """Check the archive; raise IntegrityError on the first problem found."""

    @abstractmethod
    def prune(self, store: Store, *, sessions: list[str], keep_last: int | None) -> dict[str, Any]:
        """Remove sessions and reclaim the space only they used."""

    @abstractmethod
    def change_passphrase(self, store: Store) -> dict[str, Any]:
        """Rewrap the archive key under a new passphrase (from the context)."""

    def compare_volume(
        self, store: Store, name: str, path: Path, *, session: str | None
    ) -> dict[str, Any]:
        """Compare volume `name` (newest session, or `session`) with the local `path`.

        Returns at least "differing_ranges" (list of [offset, length]) and "identical".
        """
        from .errors import UsageError

        raise UsageError("this engine cannot compare an archived volume with a local one")

    def prepare(self, store: Store) -> None:
        """Optionally do a coming backup's start-up work now (unlock the key, load the index).

        The host may call this from a worker thread while it takes snapshots, after making sure
        the passphrase needs no prompt; `backup` must still see a root written in between.
        The default does nothing.
        """
        return None

    @abstractmethod
    def archive_id(self, store: Store) -> str:
        """The archive ID, readable without the passphrase (snapshot views are kept per archive)."""

    def grant_read(self, store: Store) -> ReadGrant:
        """dom0's side of a restore: authenticate the root under the passphrase (running the KDF
        here), check it against the rollback memory, remember it, and return what a restore
        worker needs to read the archive: never the passphrase, nothing that allows writing.
        """
        from .errors import UsageError

        raise UsageError("this engine cannot restore through a restore worker")

    def open_vm_restore(self, store: Store, job: VMRestoreJob) -> RestoreStream:
        """Start this engine's own worker for a VM-level restore (`restores_in_own_worker`) and
        return dom0's end of its restore stream, once dom0 has checked the worker's listing of
        sessions against its rollback memory. The worker reads the session's settings document
        and sends the header and volumes as the hub's restore worker does
        (`workers.vm_stream.plan_vm_stream`); dom0 checks all of it as it checks that one's."""
        from .errors import UsageError

        raise UsageError("this engine has no restore worker of its own")

    def export_key(self, store: Store) -> dict[str, Any]:
        """What `key import` needs to repair the archive's key later ("header": bytes, plus the
        archive's facts); it must be useless without the passphrase."""
        from .errors import UsageError

        raise UsageError("this engine cannot export its key")

    def import_key(self, store: Store, header: bytes) -> dict[str, Any]:
        """Repair the archive's key from an export (the passphrase from the context must open
        the result, or nothing is written)."""
        from .errors import UsageError

        raise UsageError("this engine cannot import a key")

    def open_volume(self, store: Store, session: str | None, name: str) -> VolumeReader:
        """Random access to volume `name` of `session` (default: the newest holding it), for a
        read-only view (`qbhub mount`): only the parts read are fetched, each authenticated."""
        from .errors import UsageError

        raise UsageError("this engine cannot give random access to an archived volume")

    def session_settings(self, store: Store, session: str | None) -> dict[str, Any]:
        """For display (`list --settings`): {"session": ID, "vms": the VM documents the session
        (default: newest) holds}. The default reads them with `describe_session`; an engine
        that only its worker can read overrides it (what it returns is shown, never acted on)."""
        described = self.describe_session(store, session)
        metadata = described.get("metadata")
        vms = metadata.get("vms", []) if isinstance(metadata, dict) else []
        return {"session": described.get("session"), "vms": vms}

    @abstractmethod
    def describe_session(self, store: Store, session: str | None) -> dict[str, Any]:
        """Session `session` (default: newest): its ID, metadata and volumes with sizes, plus
        the archive's `archive_id`, `generation` and `identity` for dom0's rollback check."""

    @abstractmethod
    def stream_volume(
        self, store: Store, session: str, name: str, write: Callable[[bytes], None]
    ) -> int:
        """Call `write` with the volume's bytes in order (zeros for holes); return the size."""


class VolumeReader(Protocol):
    """Random reads of one archived volume (Engine.open_volume)."""

    session: str
    size: int
    chunks_fetched: int  # how many pieces were fetched from storage so far
    bytes_fetched: int

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer only at the end), authenticated."""
        ...


@dataclass(frozen=True)
class EngineType:
    """An engine as registered by a plugin: `register(EngineType(name=..., ...))`.

    `claims_root(root)`, if given, says whether an archive root (read unauthenticated) was
    written by this engine, so that every command after `init` finds the archive's engine
    without `--engine`; an archive no engine claims is taken to be native. It only picks which
    engine opens the archive, which then authenticates it as always.
    """

    name: str
    description: str
    capabilities: frozenset[str]
    create: Callable[[EngineContext], Engine]
    claims_root: Callable[[bytes], bool] | None = None


@contextmanager
def engine_prepared(engine: Engine, store: Store, *, background: bool) -> Iterator[None]:
    """Run `engine.prepare(store)` beside the body (snapshots), or before it.

    With `background` (only when the passphrase needs no prompt) the KDF and the index load
    overlap the snapshot work; an error from prepare is raised once the body is done, and the
    body's own error wins over it.
    """
    if not background:
        engine.prepare(store)
        yield
        return
    with ThreadPoolExecutor(1, thread_name_prefix="qbhub-prepare") as pool:
        preparing = pool.submit(engine.prepare, store)
        yield
        preparing.result()
