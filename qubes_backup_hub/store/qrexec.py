"""The `qubes` store: an archive served by the storage agent in a backup VM (`qubes://VM/NAME`).

dom0 starts `qbhub.Storage NAME` in the backup VM through the platform (qrexec in Qubes, a
sandboxed process on the LocalPlatform) and speaks the agent's request/reply protocol (see
`qubes_backup_hub.agent.storage`) over its stdin/stdout. The agent is untrusted: every reply is
size-capped before it is read, and its content is authenticated by the engine as from any store.
"""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import StoreError, UsageError
from ..hookspecs import hookimpl
from ..platform.base import Platform, ServiceProcess
from ..safety.names import check_object_name
from .base import Bytes, Store, StoreType

HEADER = struct.Struct(">BI")
OP = {
    "put": 1,
    "get": 2,
    "range": 3,
    "list": 4,
    "delete": 5,
    "root_get": 6,
    "root_put": 7,
    "create": 8,
    "lock": 9,
    "exists": 10,
    "clean": 11,
}
URL = re.compile(r"qubes://([a-zA-Z][a-zA-Z0-9_.-]{0,30})/([A-Za-z0-9][A-Za-z0-9._-]{0,63})")
MAX_LIST_REPLY = 256 * 1024 * 1024
SERVICE = "qbhub.Storage"


class QrexecStore(Store):
    """A store reached through the storage agent in another VM."""

    def __init__(self, vm: str, archive: str, platform: Callable[[], Platform]) -> None:
        self.vm, self.archive = vm, archive
        self.url = f"qubes://{vm}/{archive}"
        self._platform = platform
        self._process: ServiceProcess | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> QrexecStore:
        match = URL.fullmatch(url)
        if not match:
            raise UsageError(
                f"bad URL {url!r}: use qubes://BACKUPVM/ARCHIVE (one name, no slashes)"
            )
        from ..platform.detect import default_platform

        return cls(match.group(1), match.group(2), default_platform)

    def _call(self, op: str, payload: bytes = b"", max_reply: int = 1 << 20) -> bytes:
        with self._lock:
            if self._process is None:
                self._process = self._platform().call_service(self.vm, SERVICE, [self.archive])
            proc = self._process
            try:
                proc.stdin.write(HEADER.pack(OP[op], len(payload)))
                proc.stdin.write(payload)
                proc.stdin.flush()
                head = proc.stdout.read(HEADER.size)
                if len(head) != HEADER.size:
                    raise StoreError(f"the storage agent in {self.vm} stopped answering")
                status, length = HEADER.unpack(head)
                if length > max_reply + 4096:
                    raise StoreError(f"the storage agent in {self.vm} sent an oversized reply")
                body = proc.stdout.read(length)
            except (BrokenPipeError, OSError) as exc:
                raise StoreError(f"lost the storage agent in {self.vm}: {exc}") from None
            if len(body) != length:
                raise StoreError(f"the storage agent in {self.vm} sent a truncated reply")
            if status != 0:
                message = body.decode("utf-8", "replace").splitlines()[0][:300] if body else ""
                raise StoreError(f"storage agent in {self.vm}: {message or 'failed'}")
            return body

    def exists(self) -> bool:
        return self._call("exists") == b"1"

    def create(self) -> None:
        self._call("create")

    def put(self, name: str, data: Bytes) -> None:
        self._call("put", check_object_name(name).encode() + b"\n" + bytes(data))

    def get(self, name: str, max_size: int) -> bytes:
        data = self._call("get", f"{check_object_name(name)}\n{max_size}".encode(), max_size)
        if len(data) > max_size:
            raise StoreError(f"object {name} is larger than the {max_size} bytes allowed")
        return data

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        payload = f"{check_object_name(name)}\n{offset}\n{length}".encode()
        data = self._call("range", payload, length)
        if len(data) != length:
            raise StoreError(f"object {name} is truncated")
        return data

    def list(self) -> Iterator[tuple[str, int]]:
        for line in self._call("list", max_reply=MAX_LIST_REPLY).decode().splitlines():
            name, _, size = line.partition(" ")
            yield check_object_name(name), int(size)

    def delete(self, name: str) -> None:
        self._call("delete", check_object_name(name).encode())

    def get_root(self, max_size: int) -> bytes | None:
        return self._call("root_get", str(max_size).encode(), max_size) or None

    def put_root(self, data: bytes) -> None:
        self._call("root_put", data)

    def remove_partial_uploads(self) -> int:
        return int(self._call("clean") or b"0")

    @contextmanager
    def lock(self) -> Iterator[None]:
        self._call("lock")  # held by the agent process until this store is closed
        try:
            yield
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            proc, self._process = self._process, None
        if proc is not None:
            proc.stdin.close()
            proc.wait(timeout=30)


@hookimpl
def qbhub_register_stores(register: Callable[[StoreType], None]) -> None:
    register(
        StoreType(
            scheme="qubes",
            description="an archive served by the storage agent in a backup VM (qubes://VM/NAME)",
            open=QrexecStore.from_url,
        )
    )
