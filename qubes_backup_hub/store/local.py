"""The built-in `file` store: an archive in a local directory (USB disk, NAS mount, any path).

Layout: `DIR/root` (the mutable root), `DIR/objects/XY/NAME` (immutable objects, fanned out by the
last two characters of their names), `DIR/lock` (writer lock, flock). Writes go to a temporary
file, are fsynced, then renamed into place: an object is either whole or absent after a crash.
The directories of new objects are fsynced once, just before the next root is written, so every
object a root names is durable before that root is.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..directio import ALIGN, open_direct, write_direct
from ..errors import StoreError
from ..hookspecs import hookimpl
from ..safety.names import check_object_name
from .base import Bytes, Store, StoreType

TMP_PREFIX = ".tmp-"
DIRECT_MIN = 256 * 1024  # objects at least this large (packs) are written with O_DIRECT


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(directory: Path, name: str, data: Bytes, *, sync_dir: bool = True) -> None:
    tmp = directory / f"{TMP_PREFIX}{name}.{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = None
    if len(data) >= DIRECT_MIN and len(data) % ALIGN == 0:  # packs: bypass the page cache
        fd = open_direct(tmp, flags)
    try:
        if fd is not None:
            try:
                write_direct(fd, data)
            except OSError:  # the filesystem accepted O_DIRECT at open but not at write
                os.close(fd)
                fd = None
                tmp.unlink(missing_ok=True)
        if fd is None:
            fd = os.open(tmp, flags, 0o600)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        os.fsync(fd)
    except BaseException:
        if fd is not None:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(tmp, directory / name)
    if sync_dir:
        _fsync_dir(directory)


class LocalDirStore(Store):
    """An archive in a local directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.url = str(self.path)
        self._unsynced_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> LocalDirStore:
        return cls(url[len("file://") :] if url.startswith("file://") else url)

    def _object_path(self, name: str) -> Path:
        check_object_name(name)
        return self.path / "objects" / name[-2:] / name

    def _io(self, what: str, exc: OSError) -> StoreError:
        return StoreError(f"{what} in {self.path}: {exc.strerror or exc}")

    def exists(self) -> bool:
        return (self.path / "root").is_file()

    def create(self) -> None:
        if self.exists():
            raise StoreError(f"{self.path} already holds an archive")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if any(p.name != "lost+found" for p in self.path.iterdir()):
                raise StoreError(f"{self.path} is not empty; choose an empty or new directory")
            (self.path / "objects").mkdir()
        except OSError as exc:
            raise self._io("cannot create the archive directory", exc) from exc

    def put(self, name: str, data: Bytes) -> None:
        target = self._object_path(name)
        try:
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                raise StoreError(f"object {name} already exists; objects are immutable")
            _write_atomically(target.parent, name, data, sync_dir=False)
            with self._dirs_lock:
                self._unsynced_dirs.add(target.parent)
        except OSError as exc:
            raise self._io(f"cannot write object {name}", exc) from exc

    def _open(self, name: str) -> int:
        try:
            return os.open(self._object_path(name), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise StoreError(f"object {name} is missing from {self.path}") from None
        except OSError as exc:
            raise self._io(f"cannot open object {name}", exc) from exc

    def get(self, name: str, max_size: int) -> bytes:
        fd = self._open(name)
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
        fd = self._open(name)
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
        objects = self.path / "objects"
        try:
            fan_dirs = sorted(os.scandir(objects), key=lambda e: e.name)
            for fan in fan_dirs:
                if not fan.is_dir(follow_symlinks=False):
                    continue
                for entry in os.scandir(fan.path):
                    if entry.name.startswith(TMP_PREFIX):
                        continue
                    yield entry.name, entry.stat(follow_symlinks=False).st_size
        except OSError as exc:
            raise self._io("cannot list objects", exc) from exc

    def delete(self, name: str) -> None:
        try:
            self._object_path(name).unlink(missing_ok=True)
        except OSError as exc:
            raise self._io(f"cannot delete object {name}", exc) from exc

    def get_root(self, max_size: int) -> bytes | None:
        try:
            fd = os.open(self.path / "root", os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._io("cannot open the root", exc) from exc
        try:
            data = os.pread(fd, max_size + 1, 0)
        finally:
            os.close(fd)
        if len(data) > max_size:
            raise StoreError(f"the root of {self.path} is larger than {max_size} bytes")
        return data

    def put_root(self, data: bytes) -> None:
        try:
            with self._dirs_lock:
                dirs, self._unsynced_dirs = self._unsynced_dirs, set()
            for directory in sorted(dirs):
                _fsync_dir(directory)
            _write_atomically(self.path, "root", data)
        except OSError as exc:
            raise self._io("cannot write the root", exc) from exc

    def remove_partial_uploads(self) -> int:
        removed = 0
        directories = [self.path, *(p for p in (self.path / "objects").iterdir() if p.is_dir())]
        for directory in directories:
            for tmp in directory.glob(f"{TMP_PREFIX}*"):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    @contextmanager
    def lock(self) -> Iterator[None]:
        try:
            fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise self._io("cannot open the lock file", exc) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StoreError(
                        f"{self.path} is in use by another qbhub process (lock held)"
                    ) from None
                raise self._io("cannot lock the archive", exc) from exc
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
