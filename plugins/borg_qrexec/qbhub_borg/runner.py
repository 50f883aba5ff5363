"""dom0's side of the worker model on the LocalPlatform: sandboxes, the transport, the frames.

A `WorkerSession` starts one backup worker (`qbhub_borg.worker` in a bubblewrap sandbox: no
network, read-only system, the volumes bound read-only under `protocol.STAGING`, a fresh scratch
home under `$QBHUB_HOME/borg-workers/` as its only writable place) and the worker's transport to
storage: a Unix socket, bound into the worker, whose every connection dom0 hands, unread, as
stdin/stdout to a new `qbhub_borg.serve` sandbox (`borg serve --restrict-to-repository`) whose only
writable place is the archive directory. dom0 never reads those bytes: it only connects the two
ends, as qrexec does between a DispVM and the backup VM. dom0 talks to the worker in frames and
reads nothing else from it. Leftovers of a command killed outright (its scratch home holds Borg's
cache) are removed by the next one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import IO

from qubes_backup_hub.errors import (
    IntegrityError,
    NotFoundError,
    PassphraseError,
    StoreError,
    UsageError,
)
from qubes_backup_hub.platform.local.sandbox import Sandbox, SandboxSpec, import_roots
from qubes_backup_hub.safety.restore_channel import receive, send

from .protocol import FAIL, JOB, MAX_FAIL, STAGING
from .rsh import SOCKET
from .serve import BREAK_LOCK

GRACE = 5.0  # seconds a worker or server gets to end by itself at close
MAX_CONNECTIONS = 64  # borg opens the repository once or twice per command
WORKER_MODULE = "qbhub_borg.worker"
SERVE_MODULE = "qbhub_borg.serve"


SOCKET_PREFIX = "qbhub-borg-socket-"


def sweep_dead(parent: Path, prefix: str) -> None:
    """Remove `parent/PREFIX<pid>-*` directories whose qbhub process has died (a command
    killed outright leaves its worker's scratch home, with Borg's cache, behind)."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        pid, sep, _ = entry.name.removeprefix(prefix).partition("-")
        if not entry.name.startswith(prefix) or not sep or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


class WorkerFailed(StoreError):
    """The worker reported a failure (its one line), or ended without finishing."""


def _spec(module: str, home: Path, *, args: tuple[str, ...] = (), **kw: object) -> SandboxSpec:
    return SandboxSpec(module=module, home=home, args=args, ro_paths=import_roots(), **kw)  # type: ignore[arg-type]


class WorkerSession:
    """One worker and its storage transport; a context manager that leaves nothing behind."""

    def __init__(
        self,
        archive_dir: Path,
        *,
        state_dir: Path,
        append_only: bool = False,
        volumes: list[tuple[Path, str]] = (),  # type: ignore[assignment]
        session_doc: bytes | None = None,
        sandbox: Sandbox | None = None,
        exclusive: bool = False,
    ) -> None:
        self.sandbox = sandbox or Sandbox()
        if not self.sandbox.sandboxed:
            raise UsageError(
                "the borg engine runs borg only in a bubblewrap sandbox, and bubblewrap is not "
                "usable here (install bubblewrap)"
            )
        self.archive_dir = archive_dir.resolve()
        self.append_only = append_only
        self.exclusive = exclusive  # dom0 holds the archive's lock for the whole job
        self.volumes = volumes
        self.session_doc = session_doc
        self.logs = state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._servers: list[subprocess.Popen[bytes]] = []
        self._closing = threading.Event()
        workers = state_dir / "borg-workers"
        workers.mkdir(parents=True, exist_ok=True, mode=0o700)
        sweep_dead(workers, "")
        sweep_dead(Path(tempfile.gettempdir()), SOCKET_PREFIX)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=workers))
        self.scratch = self.workdir / "home"
        self.scratch.mkdir(mode=0o700)
        # the socket's path must stay short (108 bytes), so it lives in the temp directory
        self.sockdir = Path(tempfile.mkdtemp(prefix=f"{SOCKET_PREFIX}{os.getpid()}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> WorkerSession:
        try:
            self._listen()
            self._start_worker()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(grace=GRACE if exc is None else 0.0)

    def close(self, grace: float = 0.0) -> None:
        """End the worker and every storage-side server; remove the scratch directories.

        A worker that finished its job ends by itself, and each `borg serve` when borg hangs
        up, so both get a short grace period (letting borg release its repository lock) before
        anything still running is killed; after a failure (`grace` 0) everything is killed at
        once.
        """
        self._closing.set()
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.to_worker.close()
            self._end(self.proc, grace)
        with contextlib.suppress(OSError):
            self.listener.close()
        for server in self._servers:
            self._end(server, grace)
        shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self.sockdir, ignore_errors=True)

    @staticmethod
    def _end(proc: subprocess.Popen[bytes], grace: float) -> None:
        if grace:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    # -- the transport --------------------------------------------------------------------------

    def _listen(self) -> None:
        self.socket_path = self.sockdir / "borg.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o666)
        self.listener.listen(4)
        threading.Thread(target=self._accept, daemon=True, name="qbhub-borg-accept").start()

    def _accept(self) -> None:
        for _ in range(MAX_CONNECTIONS):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self._closing.is_set():
                conn.close()
                return
            with conn:
                self._servers.append(self._start_server(conn))

    def _start_server(self, conn: socket.socket) -> subprocess.Popen[bytes]:
        """`borg serve` beside the storage, with the connection as its stdin and stdout."""
        args: tuple[str, ...] = ("--append-only",) if self.append_only else ()
        if self.exclusive and not self._servers:
            args += (BREAK_LOCK,)  # the first server of a job dom0 holds the archive lock for
        spec = _spec(SERVE_MODULE, self.archive_dir, args=args)
        with open(self.logs / "borg-serve.log", "ab") as log:
            return subprocess.Popen(
                self.sandbox.argv(spec),
                stdin=conn.fileno(),
                stdout=conn.fileno(),
                stderr=log,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                close_fds=True,
                start_new_session=True,
            )

    # -- the worker -----------------------------------------------------------------------------

    def _start_worker(self) -> None:
        binds = [(path, f"{STAGING}/{name}") for path, name in self.volumes]
        if self.session_doc is not None:
            doc = self.workdir / "session.json"
            doc.write_bytes(self.session_doc)
            from .protocol import SESSION_DOC

            binds.append((doc, f"{STAGING}/{SESSION_DOC}"))
        binds.append((self.socket_path, SOCKET))
        spec = _spec(WORKER_MODULE, self.scratch, ro_binds=tuple(binds))
        with open(self.logs / "borg-worker.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.sandbox.argv(spec),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                close_fds=True,
                start_new_session=True,
            )

    @property
    def to_worker(self) -> IO[bytes]:
        assert self.proc is not None and self.proc.stdin is not None
        return self.proc.stdin

    @property
    def from_worker(self) -> IO[bytes]:
        assert self.proc is not None and self.proc.stdout is not None
        return self.proc.stdout

    def send(self, kind: bytes, payload: bytes) -> None:
        try:
            send(self.to_worker, kind, payload)
            self.to_worker.flush()
        except OSError as exc:
            raise WorkerFailed(f"the borg worker ended early ({exc.strerror})") from None

    def start_job(self, job: bytes) -> None:
        self.send(JOB, job)

    def receive(self, limits: dict[bytes, int]) -> tuple[bytes, bytes]:
        """The next frame of a kind in `limits`; a FAIL frame becomes WorkerFailed."""
        kind, payload = receive(self.from_worker, {**limits, FAIL: MAX_FAIL})
        if kind == FAIL:
            line = payload.decode("utf-8", "replace").splitlines()
            shown = "".join(c if c.isprintable() else "?" for c in (line[0] if line else ""))
            if shown.startswith("BadPassphrase:"):
                raise PassphraseError(shown.partition(": ")[2][:300])
            if shown.startswith("NotFound:"):
                raise NotFoundError(shown.partition(": ")[2][:300])
            if shown.startswith("Damaged:"):
                raise IntegrityError(f"borg worker: {shown.partition(': ')[2][:300]}")
            raise WorkerFailed(f"borg worker: {shown[:300] or 'failed'}")
        return kind, payload
