"""The built-in `file` store: an archive in a local directory (USB disk, NAS mount, any path).

Layout: `DIR/root` (the mutable root), `DIR/objects/XY/NAME` (immutable objects, fanned out by the
last two characters of their names), `DIR/lock` (writer lock, flock). Writes go to a temporary
file, are fsynced, then renamed into place: an object is either whole or absent after a crash.
The directories of new objects are fsynced once, just before the next root is written, so every
object a root names is durable before that root is.

The directory's content is untrusted (a hostile disk or NAS may plant anything in it):
- `DIR` itself is chosen by the user and may be reached through symlinks, but nothing below it
  is followed. Every operation opens `DIR` once and walks down one component at a time with
  `O_DIRECTORY|O_NOFOLLOW` relative to the directory before (openat), then opens, renames and
  unlinks relative to the last directory descriptor. A symlink at any level is refused with a
  one-line StoreError.
- Only regular files are read: every file is opened with `O_NONBLOCK|O_NOFOLLOW`, checked with
  fstat, and refused unless it is a regular file, so a FIFO, device, socket or directory in place
  of the root, an object or the lock file can't make a read hang.
- `list()` streams (name, size) of regular files whose names are valid object names in the right
  fan directory; stray files (`.DS_Store`, `Thumbs.db`, debris) are ignored.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..directio import ALIGN, write_direct
from ..errors import StoreError
from ..hookspecs import hookimpl
from ..safety.names import OBJECT_NAME, check_object_name
from .base import Bytes, Store, StoreType, waiting_message

TMP_PREFIX = ".tmp-"
DIRECT_MIN = 256 * 1024  # objects at least this large (packs) are written with O_DIRECT
FAN = re.compile(r"[a-z0-9._-]{1,2}")  # the last one or two characters of an object name
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
NOT_A_FILE = (errno.ENXIO, errno.ENODEV, errno.EISDIR, errno.EOPNOTSUPP, errno.ENOTDIR)
LOCK_POLL_MAX = 0.5  # seconds between two attempts to take a held lock, at most


def open_dir_at(parent: int, name: str, shown: str) -> int:
    """Open directory `name` relative to `parent`, never through a symlink.

    FileNotFoundError passes through (the caller knows what is missing); a symlink or any other
    non-directory raises StoreError naming `shown`.
    """
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(f"{shown} is a symlink or not a directory; refused") from None
        raise


def open_regular_at(parent: int, name: str, shown: str, flags: int = os.O_RDONLY) -> int:
    """Open `name` relative to `parent` if it is a regular file, without ever blocking.

    O_NONBLOCK makes opening a FIFO return at once; fstat then refuses anything that is not a
    regular file (StoreError naming `shown`), and the descriptor is returned in blocking mode.
    FileNotFoundError passes through.
    """
    try:
        fd = os.open(name, flags | FILE_FLAGS, 0o600, dir_fd=parent)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(f"{shown} is a symlink; refused") from None
        if exc.errno in NOT_A_FILE:
            raise StoreError(f"{shown} is not a regular file; refused") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreError(f"{shown} is not a regular file; refused")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def flock_waiting(fd: int, wait: float, on_wait: Callable[[], None] | None = None) -> bool:
    """Take an exclusive flock on `fd`, retrying for up to `wait` seconds; False if still held.
    `on_wait` is called once, when the lock is found held and there is time to wait."""
    deadline = time.monotonic() + max(0.0, wait)
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
        if on_wait is not None:
            on_wait()
            on_wait = None
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, LOCK_POLL_MAX)


def locked_message(where: str, wait: float) -> str:
    """The one line a held lock is reported with."""
    waited = f"waited {wait:g} s" if wait > 0 else "did not wait"
    return f"{where} is in use: locked by another qbhub command ({waited})"


def _open_new_at(directory: int, tmp: str, size: int) -> tuple[int, bool]:
    """Create `tmp` in `directory`: with O_DIRECT for large aligned writes when allowed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    direct = getattr(os, "O_DIRECT", 0)
    if direct and size >= DIRECT_MIN and size % ALIGN == 0:  # packs: bypass the page cache
        try:
            return os.open(tmp, flags | direct, 0o600, dir_fd=directory), True
        except OSError:
            pass
    return os.open(tmp, flags, 0o600, dir_fd=directory), False


def _write_all(fd: int, data: Bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_atomically_at(directory: int, name: str, data: Bytes, *, sync_dir: bool = True) -> None:
    """Write `name` in `directory` (a descriptor) via a fsynced temporary file and a rename."""
    tmp = f"{TMP_PREFIX}{name}.{secrets.token_hex(4)}"
    fd, direct = _open_new_at(directory, tmp, len(data))
    try:
        if direct:
            try:
                write_direct(fd, data)
            except OSError:  # the filesystem accepted O_DIRECT at open but not at write
                os.close(fd)
                fd = -1
                os.unlink(tmp, dir_fd=directory)
                direct = False
                fd, _ = _open_new_at(directory, tmp, 0)
        if not direct:
            _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with suppress(OSError):
            os.unlink(tmp, dir_fd=directory)
        raise
    os.close(fd)
    os.rename(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
    if sync_dir:
        os.fsync(directory)


def _fan_names(objects: int, *, strict: bool = True) -> Iterator[str]:
    """Names of the fan directories in `objects`; other entries (stray files) are ignored.

    A symlink with a fan's name is refused (StoreError) when `strict`, else skipped.
    """
    with os.scandir(objects) as entries:
        for entry in entries:
            if not FAN.fullmatch(entry.name):
                continue
            if entry.is_symlink():
                if strict:
                    raise StoreError(f"objects/{entry.name} is a symlink; refused")
                continue
            if entry.is_dir(follow_symlinks=False):
                yield entry.name


def _list_fan(objects: int, fan_name: str) -> Iterator[tuple[str, int]]:
    """(name, size) of the regular files in one fan directory named like its objects."""
    try:
        fan = open_dir_at(objects, fan_name, f"objects/{fan_name}")
    except FileNotFoundError:
        return  # removed while we listed
    try:
        with os.scandir(fan) as entries:
            for entry in entries:
                name = entry.name
                if not (OBJECT_NAME.fullmatch(name) and name[-2:] == fan_name):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    yield name, info.st_size
    finally:
        os.close(fan)


def _remove_debris(directory: int) -> int:
    """Unlink the temporary files (never directories) in `directory`; return how many."""
    removed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(TMP_PREFIX) and not entry.is_dir(follow_symlinks=False):
                with suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=directory)
                    removed += 1
    return removed


class LocalDirStore(Store):
    """An archive in a local directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.url = str(self.path)
        self._unsynced_fans: set[str] = set()
        self._dirs_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> LocalDirStore:
        return cls(url[len("file://") :] if url.startswith("file://") else url)

    def _io(self, what: str, exc: OSError) -> StoreError:
        return StoreError(f"{what} in {self.path}: {exc.strerror or exc}")

    def _open_base(self) -> int:
        """The archive directory (symlinks above and at it are the user's choice, followed)."""
        try:
            return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                raise StoreError(f"{self.path} is not a directory") from None
            raise

    @contextmanager
    def _dir(self, *parts: str, create_last: bool = False) -> Iterator[int]:
        """A descriptor of DIR/parts..., walked without following any symlink below DIR."""
        fd = self._open_base()
        try:
            for i, part in enumerate(parts):
                if create_last and i == len(parts) - 1:
                    with suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                child = open_dir_at(fd, part, "/".join(parts[: i + 1]))
                parent, fd = fd, child  # `fd` always names an open descriptor, even on a signal
                os.close(parent)
            yield fd
        finally:
            os.close(fd)

    def _open_object(self, name: str) -> int:
        check_object_name(name)
        try:
            with self._dir("objects", name[-2:]) as fan:
                return open_regular_at(fan, name, f"object {name}")
        except FileNotFoundError:
            raise StoreError(f"object {name} is missing from {self.path}") from None
        except OSError as exc:
            raise self._io(f"cannot open object {name}", exc) from exc

    def exists(self) -> bool:
        try:
            with self._dir() as base:
                return stat.S_ISREG(os.stat("root", dir_fd=base, follow_symlinks=False).st_mode)
        except (OSError, StoreError):
            return False

    def create(self) -> None:
        if self.exists():
            raise StoreError(f"{self.path} already holds an archive")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with self._dir() as base:
                if any(entry != "lost+found" for entry in os.listdir(base)):
                    raise StoreError(f"{self.path} is not empty; choose an empty or new directory")
                os.mkdir("objects", dir_fd=base)
        except OSError as exc:
            raise self._io("cannot create the archive directory", exc) from exc

    def put(self, name: str, data: Bytes) -> None:
        fan_name = check_object_name(name)[-2:]
        try:
            with self._dir("objects", fan_name, create_last=True) as fan:
                try:
                    os.stat(name, dir_fd=fan, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    raise StoreError(f"object {name} already exists; objects are immutable")
                write_atomically_at(fan, name, data, sync_dir=False)
            with self._dirs_lock:
                self._unsynced_fans.add(fan_name)
        except OSError as exc:
            raise self._io(f"cannot write object {name}", exc) from exc

    def get(self, name: str, max_size: int) -> bytes:
        fd = self._open_object(name)
        try:
            size = os.fstat(fd).st_size
            if size > max_size:
                raise StoreError(f"object {name} is {size} bytes, more than the {max_size} allowed")
            data = os.pread(fd, max_size + 1, 0)
        except OSError as exc:
            raise self._io(f"cannot read object {name}", exc) from exc
        finally:
            os.close(fd)
        if len(data) > max_size:
            raise StoreError(f"object {name} grew beyond the {max_size} bytes allowed")
        return data

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        if not (0 <= offset < 1 << 63 and 0 <= length < 1 << 31):
            raise StoreError(f"refused range of object {name}: offset {offset}, length {length}")
        fd = self._open_object(name)
        try:
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise self._io(f"cannot read object {name}", exc) from exc
        finally:
            os.close(fd)
        if len(data) != length:
            raise StoreError(
                f"object {name} is truncated: wanted {length} bytes at {offset}, got {len(data)}"
            )
        return data

    def list(self) -> Iterator[tuple[str, int]]:
        """Stream (name, size) of every object, fan directory by fan directory, in name order
        of the fans; never holds more than one directory listing of names at a time."""
        try:
            with self._dir("objects") as objects:
                for fan in sorted(_fan_names(objects)):
                    yield from _list_fan(objects, fan)
        except OSError as exc:
            raise self._io("cannot list objects", exc) from exc

    def delete(self, name: str) -> None:
        check_object_name(name)
        try:
            with self._dir("objects", name[-2:]) as fan:
                os.unlink(name, dir_fd=fan)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._io(f"cannot delete object {name}", exc) from exc

    def get_root(self, max_size: int) -> bytes | None:
        try:
            with self._dir() as base:
                fd = open_regular_at(base, "root", "the root")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._io("cannot open the root", exc) from exc
        try:
            data = os.pread(fd, max_size + 1, 0)
        except OSError as exc:
            raise self._io("cannot read the root", exc) from exc
        finally:
            os.close(fd)
        if len(data) > max_size:
            raise StoreError(f"the root of {self.path} is larger than {max_size} bytes")
        return data

    def put_root(self, data: bytes) -> None:
        try:
            with self._dirs_lock:
                fans, self._unsynced_fans = self._unsynced_fans, set()
            for fan_name in sorted(fans):
                with self._dir("objects", fan_name) as fan:
                    os.fsync(fan)
            with self._dir() as base:
                write_atomically_at(base, "root", data)
        except OSError as exc:
            raise self._io("cannot write the root", exc) from exc

    def remove_partial_uploads(self) -> int:
        try:
            with self._dir() as base:
                removed = _remove_debris(base)
            try:
                with self._dir("objects") as objects:
                    fans = sorted(_fan_names(objects, strict=False))
            except (FileNotFoundError, StoreError):
                return removed  # no objects directory, or a symlink: never followed
            for fan_name in fans:
                try:
                    with self._dir("objects", fan_name) as fan:
                        removed += _remove_debris(fan)
                except (FileNotFoundError, StoreError):
                    continue  # vanished, or became a symlink: never followed
        except OSError as exc:
            raise self._io("cannot remove partial uploads", exc) from exc
        return removed

    def _waiting_notice(self, wait: float) -> Callable[[], None] | None:
        tell = self.on_lock_wait
        if tell is None:
            return None
        return lambda: tell(waiting_message(f"the archive {self.path}", wait))

    @contextmanager
    def lock(self, *, wait: float | None = None) -> Iterator[None]:
        """Take the flock on DIR/lock, retrying for `wait` (default `lock_wait`) seconds."""
        wait = self.lock_wait if wait is None else wait
        try:
            with self._dir() as base:
                fd = open_regular_at(base, "lock", "the lock file", os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise self._io("cannot open the lock file", exc) from exc
        try:
            try:
                taken = flock_waiting(fd, wait, self._waiting_notice(wait))
            except OSError as exc:
                raise self._io("cannot lock the archive", exc) from exc
            if not taken:
                raise StoreError(locked_message(f"the archive {self.path}", wait))
            yield
        finally:
            os.close(fd)


@hookimpl
def qbhub_register_stores(register: Callable[[StoreType], None]) -> None:
    register(
        StoreType(
            scheme="file",
            description="a local directory (plain path or file://PATH)",
            open=LocalDirStore.from_url,
        )
    )
