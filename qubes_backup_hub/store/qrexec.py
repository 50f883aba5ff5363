"""The `qubes` store: an archive served by the storage agent in a backup VM (`qubes://VM/NAME`).

dom0 starts `qbhub.Storage NAME` in the backup VM through the platform (qrexec in Qubes, a
sandboxed process on the LocalPlatform) and speaks the agent's request/reply protocol (see
`qubes_backup_hub.agent.storage`) over its stdin/stdout. The agent is untrusted, so:

- Every call has a deadline (`timeout`, default DEFAULT_TIMEOUT seconds per call; a LOCK call
  gets its lock wait on top). The pipes are switched to non-blocking mode and every write and
  read waits in poll(2) for at most the time left, so a silent or slow agent, one that stops
  reading a large PUT, or one that sends half a reply, can't hang dom0. poll on the pipe
  descriptors was chosen over a reader thread: nothing is left running after a timeout, and no
  reply bytes are buffered beyond what the current call asked for.
- Every reply is capped before its body is read: the 5-byte header is checked against the cap of
  the call (the size asked for; 0 for calls that answer nothing; MAX_ERROR_REPLY for errors), and
  only then is exactly that many bytes read into a buffer of that size.
- LIST is paged: at most LIST_PAGE entries per reply, parsed line by line as it is yielded, with
  names strictly increasing (so a looping agent can't repeat itself) and at most
  `max_list_entries` (default MAX_LIST_ENTRIES, 4 million objects) in all.
- After a deadline, a protocol violation or a lost pipe the agent is killed and forgotten; the
  next call starts a new one, which does not hold the archive lock, so a writer can't carry on
  unnoticed (the agent refuses every mutation without the lock).

Every failure is a StoreError with one line (exit code 6). Content is authenticated by the engine
as from any store.
"""

from __future__ import annotations

import os
import re
import select
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from ..errors import QbhubError, StoreError, UsageError
from ..hookspecs import hookimpl
from ..platform.base import Platform, ServiceProcess
from ..safety.names import check_object_name
from ..safety.text import shown
from .base import Bytes, Store, StoreType, waiting_message

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
SERVICE = "qbhub.Storage"
DEFAULT_TIMEOUT = 120.0  # seconds per call
# Objects in one archive: 16 TiB of 4 MiB packs, four times the largest archive qbhub aims at.
# A hostile listing of that many costs dom0 about 1 GiB while it is held (measured 280 MiB per
# million entries); a compact in-memory listing would lower that (open).
MAX_LIST_ENTRIES = 4_000_000
LIST_PAGE = 50_000  # entries per LIST reply
LIST_LINE = 128 + 1 + 19 + 1  # longest valid "name size\n"
MAX_ERROR_REPLY = 4096
MAX_LOCK_WAIT = 86400.0  # seconds; the agent accepts up to this
CLOSE_WAIT = 10.0  # seconds the agent gets to end after its stdin is closed
SIZE = re.compile(rb"[0-9]{1,19}")


class _Broken(StoreError):
    """The channel to the agent can't be used any more (deadline, bad frame, lost pipe)."""


def _wait_for(fd: int, event: int, deadline: float, on_timeout: str) -> None:
    """Wait until `fd` is ready for `event` (or hung up); _Broken(on_timeout) at the deadline."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _Broken(on_timeout)
    poller = select.poll()
    poller.register(fd, event)
    if not poller.poll(max(1, int(remaining * 1000 + 0.999))):
        raise _Broken(on_timeout)


def send_all(fd: int, data: Bytes, deadline: float, on_timeout: str) -> None:
    """Write all of `data` to the non-blocking `fd` before `deadline`."""
    view = memoryview(data).cast("B")
    while view:
        _wait_for(fd, select.POLLOUT, deadline, on_timeout)
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue


def recv_exact(fd: int, n: int, deadline: float, on_timeout: str) -> bytes:
    """Exactly `n` bytes from the non-blocking `fd` before `deadline`; _Broken if it ends first.

    `n` has been capped by the caller: the buffer is allocated once, at that size.
    """
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        _wait_for(fd, select.POLLIN, deadline, on_timeout)
        try:
            count = os.readv(fd, [view[got:]])
        except BlockingIOError:
            continue
        if count == 0:
            raise _Broken("stopped answering (its reply ended early)")
        got += count
    view.release()
    return bytes(buf)


def parse_list_page(body: bytes, after: str, limit: int) -> Iterator[tuple[str, int]]:
    """(name, size) of each "name size\\n" line of one LIST page, checked one at a time.

    Every name must be a valid object name after `after` in (fan, name) order, strictly
    increasing, every size a decimal number, the page at most `limit` lines, each line ended.
    """
    previous = (after[-2:], after) if after else None
    pos = count = 0
    while pos < len(body):
        end = body.find(b"\n", pos, pos + LIST_LINE)
        if end < 0:
            raise StoreError("the storage agent sent a malformed LIST line")
        raw_name, _, raw_size = body[pos:end].partition(b" ")
        pos = end + 1
        name = check_object_name(raw_name.decode("ascii", "replace"))
        if not SIZE.fullmatch(raw_size):
            raise StoreError(f"the storage agent sent a malformed size for object {name}")
        key = (name[-2:], name)
        if previous is not None and key <= previous:
            raise StoreError("the storage agent listed objects out of order or twice")
        count += 1
        if count > limit:
            raise StoreError(f"the storage agent sent more than the {limit} LIST entries asked")
        previous = key
        yield name, int(raw_size)


class QrexecStore(Store):
    """A store reached through the storage agent in another VM."""

    def __init__(
        self,
        vm: str,
        archive: str,
        platform: Callable[[], Platform],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_list_entries: int = MAX_LIST_ENTRIES,
    ) -> None:
        self.vm, self.archive = vm, archive
        self.url = f"qubes://{vm}/{archive}"
        self.timeout = timeout  # seconds each call may take (a LOCK call: plus its wait)
        self.max_list_entries = max_list_entries
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

    # -- the channel ------------------------------------------------------------------------------

    def _start(self) -> ServiceProcess:
        proc = self._platform().call_service(self.vm, SERVICE, [self.archive])
        try:
            os.set_blocking(proc.stdin.fileno(), False)
            os.set_blocking(proc.stdout.fileno(), False)
        except (OSError, ValueError) as exc:
            self._abandon(proc)
            raise StoreError(f"cannot talk to the storage agent in {self.vm}: {exc}") from None
        return proc

    def _abandon(self, proc: ServiceProcess) -> None:
        """Kill an agent whose channel can't be trusted any more."""
        if self._process is proc:
            self._process = None
        with suppress(OSError, QbhubError, subprocess.SubprocessError):
            proc.kill()

    def _call(
        self,
        op: str,
        payload: Bytes = b"",
        max_reply: int = 0,
        extra: float = 0.0,
        tail: Bytes = b"",
    ) -> bytes:
        """Send one request (`payload` then `tail`), return the body of an ok reply of at most
        `max_reply` bytes. `extra` seconds are added to this call's deadline."""
        with self._lock:
            if self._process is None:
                self._process = self._start()
            proc = self._process
            deadline = time.monotonic() + self.timeout + extra
            late = f"did not answer {op.upper()} within {self.timeout + extra:g} s"
            try:
                status, body = self._exchange(proc, op, (payload, tail), max_reply, deadline, late)
            except _Broken as exc:
                self._abandon(proc)
                raise StoreError(f"the storage agent in {self.vm} {exc}") from None
            except OSError as exc:
                self._abandon(proc)
                raise StoreError(f"lost the storage agent in {self.vm}: {exc}") from None
        if status != 0:
            line = body.split(b"\n", 1)[0]
            raise StoreError(f"storage agent in {self.vm}: {shown(line) if line else 'failed'}")
        return body

    def _exchange(
        self,
        proc: ServiceProcess,
        op: str,
        parts: tuple[Bytes, Bytes],
        cap: int,
        deadline: float,
        late: str,
    ) -> tuple[int, bytes]:
        out, into = proc.stdin.fileno(), proc.stdout.fileno()
        send_all(out, HEADER.pack(OP[op], sum(len(p) for p in parts)), deadline, late)
        for part in parts:
            send_all(out, part, deadline, late)
        status, length = HEADER.unpack(recv_exact(into, HEADER.size, deadline, late))
        if status not in (0, 1):
            raise _Broken(f"sent a reply with an unknown status {status}")
        allowed = cap if status == 0 else MAX_ERROR_REPLY
        if length > allowed:
            raise _Broken(f"sent an oversized reply to {op.upper()}: {length} > {allowed} bytes")
        return status, recv_exact(into, length, deadline, late)

    # -- the Store interface ----------------------------------------------------------------------

    def exists(self) -> bool:
        answer = self._call("exists", max_reply=1)
        if answer not in (b"0", b"1"):
            raise StoreError(f"the storage agent in {self.vm} sent a malformed EXISTS reply")
        return answer == b"1"

    def create(self) -> None:
        self._call("create")  # the agent takes the lock for this session

    def put(self, name: str, data: Bytes) -> None:
        self._call("put", check_object_name(name).encode() + b"\n", tail=data)

    def get(self, name: str, max_size: int) -> bytes:
        data = self._call("get", f"{check_object_name(name)}\n{max_size}".encode(), max_size)
        if len(data) > max_size:
            raise StoreError(f"object {name} is larger than the {max_size} bytes allowed")
        return data

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        if not (0 <= offset < 1 << 63 and 0 <= length < 1 << 31):
            raise StoreError(f"refused range of object {name}: offset {offset}, length {length}")
        payload = f"{check_object_name(name)}\n{offset}\n{length}".encode()
        data = self._call("range", payload, length)
        if len(data) != length:
            raise StoreError(f"object {name} is truncated")
        return data

    def list(self) -> Iterator[tuple[str, int]]:
        """Stream every object, one page of at most LIST_PAGE entries per call."""
        after, total = "", 0
        while True:
            page = self._call("list", f"{after}\n{LIST_PAGE}".encode(), LIST_PAGE * LIST_LINE)
            count = 0
            for name, size in parse_list_page(page, after, LIST_PAGE):
                count += 1
                total += 1
                if total > self.max_list_entries:
                    raise StoreError(
                        f"{self.url} lists more than {self.max_list_entries} objects; refused"
                    )
                after = name
                yield name, size
            if count < LIST_PAGE:
                return

    def delete(self, name: str) -> None:
        self._call("delete", check_object_name(name).encode())

    def get_root(self, max_size: int) -> bytes | None:
        return self._call("root_get", str(max_size).encode(), max_size) or None

    def put_root(self, data: bytes) -> None:
        self._call("root_put", data)

    def remove_partial_uploads(self) -> int:
        answer = self._call("clean", max_reply=19)
        if not SIZE.fullmatch(answer):
            raise StoreError(f"the storage agent in {self.vm} sent a malformed CLEAN reply")
        return int(answer)

    @contextmanager
    def lock(self, *, wait: float | None = None) -> Iterator[None]:
        """Have the agent take the lock, waiting up to `wait` (default `lock_wait`) seconds.

        The agent holds it until this store is closed, which leaving the block does.
        """
        wait = min(max(self.lock_wait if wait is None else wait, 0.0), MAX_LOCK_WAIT)
        payload = str(round(wait * 1000)).encode() if wait > 0 else b""
        # The agent waits on its side: if its answer takes more than a second, say why.
        tell = self.on_lock_wait
        notice = None
        if tell is not None and wait > 1:
            text = waiting_message(f"the archive {self.url}", wait)
            notice = threading.Timer(1.0, tell, args=(text,))
            notice.daemon = True
            notice.start()
        try:
            self._call("lock", payload, extra=wait)
        finally:
            if notice is not None:
                notice.cancel()
        try:
            yield
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            proc, self._process = self._process, None
        if proc is None:
            return
        with suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=CLOSE_WAIT)
        except subprocess.TimeoutExpired:
            self._abandon(proc)


@hookimpl
def qbhub_register_stores(register: Callable[[StoreType], None]) -> None:
    register(
        StoreType(
            scheme="qubes",
            description="an archive served by the storage agent in a backup VM (qubes://VM/NAME)",
            open=QrexecStore.from_url,
        )
    )
