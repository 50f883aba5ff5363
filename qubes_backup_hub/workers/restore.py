"""qbhub restore worker: runs in a disposable VM, parses the archive, emits a restore stream.

dom0 starts it as the `qbhub.RestoreWorker` service and sends one JOB frame (engine, read grant,
session, VM names, settings-only flag). The grant is what the engine needs to read this archive
(`Engine.grant_read`, made in dom0): never the passphrase. The worker reads the archive only
through dom0 (QUERY frames with read requests, answered only for objects dom0 listed), so it
holds no capability of its own; everything an attacker controls in storage is parsed here, not in
dom0. What it sends back is the restore stream described in `safety.restore_channel`: a strict
header, then exactly the declared bytes.

Local state: the engine's scratch state (an index cache it may have to build) lives in a
temporary directory under $HOME, which is disk in a DispVM (its private volume) and in the
LocalPlatform's sandbox (the DispVM's directory), not /tmp, which is often RAM. Where the platform
hands over dom0's own index cache read-only (the LocalPlatform binds it and names it in
$QBHUB_INDEX_CACHE_SEED), the engine gets that directory as its `index_cache_seed` option: the
file is used only if it is valid for the root dom0 pinned, and never written.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from ..engine import EngineContext
from ..errors import QbhubError, StoreError
from ..passphrase import PassphraseSource
from ..progress import Progress
from ..registry import load_registry
from ..safety.restore_channel import (
    DATA,
    END,
    FAIL,
    HEADER,
    JOB,
    MAX_DATA_FRAME,
    QUERY,
    REPLY,
    receive,
    send,
)
from ..store.base import Bytes, Store
from ..store.qrexec import OP
from .vm_stream import plan_vm_stream

MAX_JOB = 64 * 1024
SEED_ENV = "QBHUB_INDEX_CACHE_SEED"  # a read-only directory of dom0's index cache files


class RelayStore(Store):
    """A read-only store whose every request is relayed by dom0.

    The engine fetches from several threads while the main thread streams DATA frames over the
    same pipe, and dom0 answers one query at a time, writing its whole reply before it reads on.
    So `channel_lock` serializes the channel: a query's send and its reply's receipt happen under
    it as one step, and so does each DATA frame. Without it, frames interleave, and a query
    flushed behind a blocked DATA write deadlocks both sides (each blocked writing to the other).
    """

    def __init__(self, requests: BinaryIO, replies: BinaryIO) -> None:
        self.url = "relay://dom0"
        self._out, self._in = requests, replies
        self.channel_lock = threading.Lock()

    def _ask(self, op: str, payload: bytes, limit: int) -> bytes:
        with self.channel_lock:
            send(self._out, QUERY, bytes((OP[op],)) + payload)
            self._out.flush()
            _, reply = receive(self._in, {REPLY: limit + 4096})
        if not reply or reply[0] != 0:
            raise StoreError(reply[1:].decode("utf-8", "replace")[:300] or "store request failed")
        return reply[1:]

    def exists(self) -> bool:
        return self._ask("exists", b"", 16) == b"1"

    def get(self, name: str, max_size: int) -> bytes:
        return self._ask("get", f"{name}\n{max_size}".encode(), max_size)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        data = self._ask("range", f"{name}\n{offset}\n{length}".encode(), length)
        if len(data) != length:
            raise StoreError(f"object {name} is truncated")
        return data

    def list(self) -> Iterator[tuple[str, int]]:
        for line in self._ask("list", b"", 256 << 20).decode().splitlines():
            name, _, size = line.partition(" ")
            yield name, int(size)

    def get_root(self, max_size: int) -> bytes | None:
        return self._ask("root_get", str(max_size).encode(), max_size) or None

    def create(self) -> None:
        raise StoreError("the restore worker can't write")

    def put(self, name: str, data: Bytes) -> None:
        raise StoreError("the restore worker can't write")

    def delete(self, name: str) -> None:
        raise StoreError("the restore worker can't write")

    def put_root(self, data: bytes) -> None:
        raise StoreError("the restore worker can't write")

    @contextmanager
    def lock(self) -> Iterator[None]:
        raise StoreError("the restore worker can't write")
        yield  # pragma: no cover


def run(job: dict[str, Any], requests: BinaryIO, replies: BinaryIO) -> None:
    """Do one restore job: describe the session, then stream every selected volume."""
    store = RelayStore(requests, replies)
    registry = load_registry()
    seed = os.environ.get(SEED_ENV)
    options = {"index_cache_seed": seed} if seed else {}
    with tempfile.TemporaryDirectory(prefix="qbhub-worker-", dir=_scratch_parent()) as state_dir:
        context = EngineContext(
            hook=registry.pm.hook,
            passphrase=PassphraseSource(env_var=None, prompt=""),
            state_dir=Path(state_dir),
            progress=Progress(enabled=False),
            options=options,
            read_grant=_grant(job),
        )
        engine = registry.engine(str(job.get("engine", "native"))).create(context)
        info = engine.describe_session(store, job.get("session"))
        plan = plan_vm_stream(
            info["session"],
            info["metadata"],
            [str(v) for v in job.get("vms", [])],
            settings_only=bool(job.get("settings_only")),
        )
        send(requests, HEADER, json.dumps(plan.header).encode())
        for archive_name in plan.archive_names:
            engine.stream_volume(
                store, info["session"], archive_name, _data_writer(requests, store.channel_lock)
            )
        send(requests, END)
        requests.flush()


def _scratch_parent() -> str | None:
    """$HOME if it is a writable directory (disk), else None (the system's temporary dir)."""
    home = os.environ.get("HOME")
    if home and os.path.isdir(home) and os.access(home, os.W_OK):
        return home
    return None


def _grant(job: dict[str, Any]) -> dict[str, str]:
    grant = job.get("grant")
    if not isinstance(grant, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in grant.items()
    ):
        raise QbhubError("the job carries no read grant")
    return grant


def _data_writer(out: BinaryIO, lock: threading.Lock) -> Callable[[bytes], None]:
    """Send bytes as DATA frames, each one whole and flushed under the channel lock."""

    def write(data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), MAX_DATA_FRAME):
            with lock:
                send(out, DATA, view[start : start + MAX_DATA_FRAME])
                out.flush()

    return write


def main() -> int:
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    try:
        _, payload = receive(inp, {JOB: MAX_JOB})
        run(json.loads(payload), out, inp)
    except Exception as exc:  # everything ends as one FAIL line for dom0
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        send(out, FAIL, f"{type(exc).__name__}: {message}"[:1000].encode())
        out.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
