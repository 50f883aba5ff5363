#!/usr/bin/env python3
"""qbhub storage agent: serves one archive directory to dom0 over stdin/stdout (qrexec service).

Runs in the backup VM as the `qbhub.Storage` service. It needs nothing but Python: copy this one
file into the backup VM (or its template) if qbhub is not installed there. It never trusts its
caller either: it serves exactly one directory, BASE/ARCHIVE, where BASE is fixed by the VM
($QBHUB_STORAGE_BASE, default ~/qbhub-archives) and ARCHIVE is the service argument, a single
name; every object name is checked, every size capped.

What it guarantees, whatever the caller sends and whatever is planted in the directory:
- Nothing below BASE/ARCHIVE is followed through a symlink: every operation opens BASE/ARCHIVE
  (which the VM's owner may have made a symlink) and walks down one component at a time with
  O_DIRECTORY|O_NOFOLLOW, then reads, writes, renames and unlinks relative to that descriptor.
- Only regular files are read, opened with O_NONBLOCK and checked with fstat, so a FIFO, device,
  socket or directory in place of an object, the root or the lock file can't make it hang.
- Every malformed request (unknown op, bad numbers, bad names, bad UTF-8, missing fields) gets an
  error reply, never a traceback; a frame it can't resynchronise after (a truncated frame, a
  length above MAX_REQUEST) gets an error reply, then the agent ends with status 1.
- PUT, DELETE, ROOT_PUT and CLEAN need the writer lock held by this session. CREATE takes the
  lock itself (`qbhub init` writes the first objects and root right after it without calling
  LOCK), failing if another session holds it.
- LIST skips anything that is not a regular file named like an object in the right fan
  directory (`Thumbs.db`, `.DS_Store`, debris), and pages its answer.

The directory layout is the one qbhub's local directory store uses (root, objects/XY/NAME), so
an archive written through the agent can be read from a USB disk directly, and the other way.

Protocol (all integers big-endian): each request is `u8 op || u32 length || payload`, each reply
`u8 status || u32 length || payload` (status 0: ok, 1: error with a one-line UTF-8 message).
Numbers are ASCII decimal digits below 2^63. Payloads:
  PUT     name \\n data        -> ""            GET   name \\n max        -> data
  RANGE   name \\n off \\n len  -> data          DELETE name              -> ""
  LIST    ""                 -> "name size\\n" for every object
  LIST    after \\n limit     -> at most `limit` (<= MAX_LIST_PAGE) lines, in (fan, name) order,
                                strictly after object `after` ("" for the first page); a page
                                shorter than `limit` is the last
  ROOT_GET max               -> data (empty: no root)
  ROOT_PUT data              -> ""            CREATE ""               -> "" (takes the lock)
  LOCK    "" or wait_ms      -> "" (retries a held lock for wait_ms, at most MAX_LOCK_WAIT s)
  EXISTS  ""                 -> "1" or "0"    CLEAN ""                -> count of debris removed
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
FAN = re.compile(r"[a-z0-9._-]{1,2}")
ARCHIVE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NUMBER = re.compile(rb"[0-9]{1,19}")
MAX_NUMBER = (1 << 63) - 1
MAX_OBJECT = 80 * 1024 * 1024
MAX_ROOT = 16 * 1024 * 1024
MAX_REQUEST = MAX_OBJECT + 4096
MAX_LIST_PAGE = 100_000
MAX_LOCK_WAIT = 86400  # seconds
MAX_ERROR = 4096
HEADER = struct.Struct(">BI")
OPS = {
    1: "put",
    2: "get",
    3: "range",
    4: "list",
    5: "delete",
    6: "root_get",
    7: "root_put",
    8: "create",
    9: "lock",
    10: "exists",
    11: "clean",
}
NEEDS_LOCK = frozenset({"put", "delete", "root_put", "clean"})
TMP = ".tmp-"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
NOT_A_FILE = (errno.ENXIO, errno.ENODEV, errno.EISDIR, errno.EOPNOTSUPP, errno.ENOTDIR)


class AgentError(Exception):
    """A refused or failed request; its message goes back to the caller."""


def read_exact(stream: BinaryIO, n: int) -> bytes:
    """Up to `n` bytes: fewer only if the stream ended."""
    data = bytearray()
    while len(data) < n:
        block = stream.read(n - len(data))
        if not block:
            break
        data += block
    return bytes(data)


# -- parsing requests ---------------------------------------------------------------------------


def fields(payload: bytes, count: int) -> list[bytes]:
    """Exactly `count` newline-separated fields, else AgentError."""
    parts = payload.split(b"\n")
    if len(parts) != count:
        raise AgentError(f"malformed request: expected {count} fields, got {len(parts)}")
    return parts


def object_name(field: bytes) -> str:
    """`field` as an object name, else AgentError."""
    try:
        name = field.decode("ascii")
    except UnicodeDecodeError:
        raise AgentError("refused object name (not ASCII)") from None
    if not NAME.fullmatch(name):
        raise AgentError(f"refused object name {name[:140]!r}")
    return name


def number(field: bytes, what: str, limit: int = MAX_NUMBER) -> int:
    """`field` as a decimal number in [0, limit], else AgentError."""
    if not NUMBER.fullmatch(field) or int(field) > limit:
        raise AgentError(f"refused {what} {field[:30]!r}: a decimal number up to {limit}")
    return int(field)


# -- files and directories, never through a symlink --------------------------------------------


def open_dir_at(parent: int, name: str, shown: str) -> int:
    """Directory `name` under `parent`; FileNotFoundError passes, a symlink is refused."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise AgentError(f"{shown} is a symlink or not a directory; refused") from None
        raise


def open_regular_at(parent: int, name: str, shown: str, flags: int = os.O_RDONLY) -> int:
    """Regular file `name` under `parent`, opened without blocking; anything else is refused."""
    try:
        fd = os.open(name, flags | FILE_FLAGS, 0o600, dir_fd=parent)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AgentError(f"{shown} is a symlink; refused") from None
        if exc.errno in NOT_A_FILE:
            raise AgentError(f"{shown} is not a regular file; refused") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AgentError(f"{shown} is not a regular file; refused")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_regular_at(parent: int, name: str) -> bool:
    """True if `name` under `parent` is a regular file (a symlink is not)."""
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def write_at(directory: int, name: str, data: bytes) -> None:
    """Write `name` via a fsynced temporary file, a rename and a directory fsync."""
    tmp = f"{TMP}{name}.{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=directory)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with suppress(OSError):
            os.unlink(tmp, dir_fd=directory)
        raise
    os.close(fd)
    os.rename(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
    os.fsync(directory)


def fan_names(objects: int, *, strict: bool = True) -> list[str]:
    """Sorted fan directories of `objects`; stray entries are skipped, symlinks refused."""
    found = []
    with os.scandir(objects) as entries:
        for entry in entries:
            if not FAN.fullmatch(entry.name):
                continue
            if entry.is_symlink():
                if strict:
                    raise AgentError(f"objects/{entry.name} is a symlink; refused")
            elif entry.is_dir(follow_symlinks=False):
                found.append(entry.name)
    return sorted(found)


def fan_objects(objects: int, fan: str) -> list[tuple[str, int]]:
    """Sorted (name, size) of the regular files in one fan directory named like its objects."""
    try:
        fd = open_dir_at(objects, fan, f"objects/{fan}")
    except FileNotFoundError:
        return []
    found = []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if NAME.fullmatch(entry.name) and entry.name[-2:] == fan:
                    with suppress(FileNotFoundError):
                        info = entry.stat(follow_symlinks=False)
                        if stat.S_ISREG(info.st_mode):
                            found.append((entry.name, info.st_size))
    finally:
        os.close(fd)
    return sorted(found)


def remove_debris(directory: int) -> int:
    """Unlink the temporary files (never directories) in `directory`; return how many."""
    removed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(TMP) and not entry.is_dir(follow_symlinks=False):
                with suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=directory)
                    removed += 1
    return removed


# -- the archive --------------------------------------------------------------------------------


class Archive:
    """One archive directory, with the local directory store's layout."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_fd: int | None = None

    def close(self) -> None:
        """Release the lock, if this session holds it."""
        fd, self.lock_fd = self.lock_fd, None
        if fd is not None:
            os.close(fd)

    @contextmanager
    def directory(self, *parts: str, create: bool = False) -> Iterator[int]:
        """A descriptor of ARCHIVE/parts..., creating missing components if `create`."""
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK)
        except NotADirectoryError:
            raise AgentError("the archive directory is not a directory") from None
        try:
            for i, part in enumerate(parts):
                if create:
                    with suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                child = open_dir_at(fd, part, "/".join(parts[: i + 1]))
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def handle(self, op: str | None, payload: bytes) -> bytes:
        """Do one request; raise AgentError (or OSError) to refuse it."""
        method = getattr(self, f"op_{op}", None) if op else None
        if method is None:
            raise AgentError("unknown operation")
        if op in NEEDS_LOCK and self.lock_fd is None:
            raise AgentError(f"{op} needs the archive lock (send LOCK first)")
        result: bytes = method(payload)
        return result

    def open_object(self, name: str) -> int:
        try:
            with self.directory("objects", name[-2:]) as fan:
                return open_regular_at(fan, name, f"object {name}")
        except FileNotFoundError:
            raise AgentError(f"object {name} is missing") from None

    def op_put(self, payload: bytes) -> bytes:
        head, sep, data = payload.partition(b"\n")
        if not sep:
            raise AgentError("malformed request: PUT needs a name and a newline")
        name = object_name(head)
        with self.directory("objects", name[-2:], create=True) as fan:
            try:
                os.stat(name, dir_fd=fan, follow_symlinks=False)
            except FileNotFoundError:
                write_at(fan, name, data)
                return b""
        raise AgentError(f"object {name} already exists; objects are immutable")

    def op_get(self, payload: bytes) -> bytes:
        head, limit_field = fields(payload, 2)
        name, limit = object_name(head), number(limit_field, "size limit")
        fd = self.open_object(name)
        try:
            size = os.fstat(fd).st_size
            if size > min(limit, MAX_OBJECT):
                raise AgentError(f"object {name} is {size} bytes, more than the {limit} allowed")
            data = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        return data

    def op_range(self, payload: bytes) -> bytes:
        head, offset_field, length_field = fields(payload, 3)
        name = object_name(head)
        offset = number(offset_field, "offset")
        length = number(length_field, "length", MAX_OBJECT)
        fd = self.open_object(name)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise AgentError(f"object {name} is truncated")
        return data

    def op_list(self, payload: bytes) -> bytes:
        after, limit = "", None
        if payload:
            after_field, limit_field = fields(payload, 2)
            after = object_name(after_field) if after_field else ""
            limit = max(1, number(limit_field, "page size", MAX_LIST_PAGE))
        return "".join(f"{n} {s}\n" for n, s in self.list_page(after, limit)).encode()

    def list_page(self, after: str, limit: int | None) -> Iterator[tuple[str, int]]:
        """Objects in (fan, name) order strictly after `after`, at most `limit` of them."""
        start = (after[-2:], after)
        count = 0
        try:
            with self.directory("objects") as objects:
                for fan in fan_names(objects):
                    if after and fan < start[0]:
                        continue
                    for name, size in fan_objects(objects, fan):
                        if after and (fan, name) <= start:
                            continue
                        if limit is not None and count >= limit:
                            return
                        count += 1
                        yield name, size
        except FileNotFoundError:
            return

    def op_delete(self, payload: bytes) -> bytes:
        name = object_name(payload)
        try:
            with self.directory("objects", name[-2:]) as fan:
                os.unlink(name, dir_fd=fan)
        except FileNotFoundError:
            pass
        return b""

    def op_root_get(self, payload: bytes) -> bytes:
        limit = min(number(payload, "size limit"), MAX_ROOT)
        try:
            with self.directory() as base:
                fd = open_regular_at(base, "root", "the root")
        except FileNotFoundError:
            return b""
        try:
            if os.fstat(fd).st_size > limit:
                raise AgentError("the root is larger than allowed")
            data = os.pread(fd, limit + 1, 0)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise AgentError("the root is larger than allowed")
        return data

    def op_root_put(self, payload: bytes) -> bytes:
        if len(payload) > MAX_ROOT:
            raise AgentError("the root is larger than allowed")
        with self.directory() as base:
            self.sync_fans()
            write_at(base, "root", payload)
        return b""

    def sync_fans(self) -> None:
        """fsync every fan directory, so the objects a new root names are durable before it."""
        try:
            with self.directory("objects") as objects:
                for fan in fan_names(objects, strict=False):
                    with suppress(FileNotFoundError, AgentError):
                        fd = open_dir_at(objects, fan, f"objects/{fan}")
                        try:
                            os.fsync(fd)
                        finally:
                            os.close(fd)
        except (FileNotFoundError, AgentError):
            return  # no objects directory, or a symlink: never followed

    def op_create(self, payload: bytes) -> bytes:
        if payload:
            raise AgentError("malformed request: CREATE takes no payload")
        self.op_lock(b"")
        with self.directory(create=True) as base:
            if is_regular_at(base, "root"):
                raise AgentError("the directory already holds an archive")
            with suppress(FileExistsError):
                os.mkdir("objects", dir_fd=base)
            os.close(open_dir_at(base, "objects", "objects"))  # refuses a symlink
        return b""

    def op_exists(self, payload: bytes) -> bytes:
        try:
            with self.directory() as base:
                return b"1" if is_regular_at(base, "root") else b"0"
        except FileNotFoundError:
            return b"0"

    def op_lock(self, payload: bytes) -> bytes:
        wait = number(payload, "lock wait (ms)", MAX_LOCK_WAIT * 1000) / 1000 if payload else 0
        if self.lock_fd is not None:
            return b""
        with self.directory(create=True) as base:
            fd = open_regular_at(base, "lock", "the lock file", os.O_RDWR | os.O_CREAT)
        try:
            taken = flock_waiting(fd, wait)
        except BaseException:
            os.close(fd)
            raise
        if not taken:
            os.close(fd)
            waited = f"waited {wait:g} s" if wait else "did not wait"
            raise AgentError(f"the archive is in use: locked by another qbhub command ({waited})")
        self.lock_fd = fd
        return b""

    def op_clean(self, payload: bytes) -> bytes:
        with self.directory() as base:
            count = remove_debris(base)
        try:
            with self.directory("objects") as objects:
                fans = fan_names(objects, strict=False)
                for fan in fans:
                    with suppress(FileNotFoundError, AgentError):
                        fd = open_dir_at(objects, fan, f"objects/{fan}")
                        try:
                            count += remove_debris(fd)
                        finally:
                            os.close(fd)
        except (FileNotFoundError, AgentError):
            pass  # no objects directory, or a symlink: never followed
        return str(count).encode()


def flock_waiting(fd: int, wait: float) -> bool:
    """Take an exclusive flock on `fd`, retrying for up to `wait` seconds; False if still held."""
    deadline = time.monotonic() + wait
    delay = 0.02
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.5)


# -- the request loop ---------------------------------------------------------------------------


def answer(archive: Archive, op_code: int, payload: bytes) -> tuple[int, bytes]:
    """(status, body) for one well-framed request; every failure becomes an error reply."""
    try:
        return 0, archive.handle(OPS.get(op_code), payload)
    except AgentError as exc:
        message = str(exc)
    except OSError as exc:
        message = f"{exc.strerror or 'I/O error'} (errno {exc.errno})"
    except (ValueError, UnicodeError, OverflowError) as exc:
        message = f"malformed request: {exc}"
    except Exception as exc:  # the caller gets one line, never a traceback
        message = f"internal error: {type(exc).__name__}"
    return 1, " ".join(message.split()).encode("utf-8", "replace")[:MAX_ERROR]


def reply(replies: BinaryIO, status: int, body: bytes) -> None:
    replies.write(HEADER.pack(status, len(body)) + body)
    replies.flush()


def serve(archive: Archive, requests: BinaryIO, replies: BinaryIO) -> int:
    """Answer requests until the caller closes the stream; return the exit status.

    0: the caller closed the stream between requests. 1: a frame was truncated or too large
    (answered with an error reply, as far as the caller still listens), or the caller went away.
    """
    try:
        while True:
            head = read_exact(requests, HEADER.size)
            if not head:
                return 0
            if len(head) != HEADER.size:
                reply(replies, 1, b"truncated request header")
                return 1
            op_code, length = HEADER.unpack(head)
            if length > MAX_REQUEST:
                reply(replies, 1, f"request of {length} bytes is larger than allowed".encode())
                return 1
            payload = read_exact(requests, length)
            if len(payload) != length:
                reply(replies, 1, b"truncated request")
                return 1
            reply(replies, *answer(archive, op_code, payload))
    except OSError:  # the caller closed its end of the pipes
        return 1
    finally:
        archive.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not ARCHIVE.fullmatch(argv[0]):
        print("usage: storage ARCHIVE_NAME (a single name, no slashes)", file=sys.stderr)
        return 2
    base = Path(os.environ.get("QBHUB_STORAGE_BASE") or Path.home() / "qbhub-archives")
    code = serve(Archive(base / argv[0]), sys.stdin.buffer, sys.stdout.buffer)
    if code:
        print("qbhub storage agent: ended after a malformed request", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
