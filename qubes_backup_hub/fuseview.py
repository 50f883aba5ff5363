"""A read-only FUSE file system of archived volumes (`qbhub mount`), on plain Linux.

The tree is `/SESSION/VOLUME` for every session and volume the archive lists (or the one volume
asked for, as `/VOLUME`): regular files, mode 0444, the session's time as their time. A read
asks the engine's VolumeReader (Engine.open_volume) for exactly the bytes asked, so only the
chunks under them are fetched, each authenticated; nothing is ever written. The file system
library is mfusepy (a maintained fork of fusepy, pure Python over libfuse 3 with ctypes: no
compiler, no build of its own), imported only by `qbhub mount`.

In Qubes, dom0 never mounts archive data: there the view runs in a DispVM (not built yet).
"""

from __future__ import annotations

import errno
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .engine import VolumeReader
from .errors import QbhubError

OPEN_READERS = 8  # volumes kept open at once (each holds its upper tree pages)


@dataclass(frozen=True)
class ViewFile:
    """One file of the view: which session and volume it shows."""

    session: str
    volume: str
    size: int
    mtime: float


def session_mtime(session: str) -> float:
    """The POSIX time of a session ID (YYYYMMDDTHHMMSSZ[-N]); now if it does not parse."""
    try:
        return datetime.strptime(session[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return time.time()


def layout(sessions: list[dict[str, Any]], only_volume: str | None) -> dict[str, ViewFile]:
    """Path -> file, from a list_sessions result; with `only_volume`, just `/VOLUME`."""
    files: dict[str, ViewFile] = {}
    for s in sessions:
        for v in s.get("volumes", []):
            view = ViewFile(s["session"], v["name"], int(v["size"]), session_mtime(s["session"]))
            if only_volume is None:
                files[f"/{s['session']}/{v['name']}"] = view
            elif v["name"] == only_volume:
                files[f"/{v['name']}"] = view
    return files


class ArchiveView:
    """The FUSE operations (getattr, readdir, open, read) over `files`; everything read-only."""

    def __init__(
        self, files: dict[str, ViewFile], open_volume: Callable[[str, str], VolumeReader]
    ) -> None:
        self.files = files
        self.open_volume = open_volume
        self.dirs: dict[str, list[str]] = {"/": []}
        for path in files:
            parent, _, name = path.rpartition("/")
            parent = parent or "/"
            if parent not in self.dirs:
                self.dirs[parent] = []
                self.dirs["/"].append(parent.lstrip("/"))
            self.dirs[parent].append(name)
        self.readers: OrderedDict[tuple[str, str], VolumeReader] = OrderedDict()
        self.chunks_fetched = 0
        self.bytes_fetched = 0
        self.bytes_read = 0
        self.started = time.time()

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        if path in self.dirs:
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, "st_mtime": self.started,
                    "st_ctime": self.started, "st_atime": self.started}  # fmt: skip
        view = self.files.get(path)
        if view is None:
            raise _fuse_error(errno.ENOENT)
        return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": view.size,
                "st_mtime": view.mtime, "st_ctime": view.mtime, "st_atime": view.mtime,
                "st_blocks": (view.size + 511) // 512}  # fmt: skip

    def readdir(self, path: str, fh: int) -> list[str]:
        if path not in self.dirs:
            raise _fuse_error(errno.ENOENT)
        return [".", "..", *sorted(self.dirs[path])]

    def open(self, path: str, flags: int) -> int:
        if path not in self.files:
            raise _fuse_error(errno.ENOENT)
        if flags & 3 != 0:  # O_WRONLY or O_RDWR
            raise _fuse_error(errno.EROFS)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        view = self.files.get(path)
        if view is None:
            raise _fuse_error(errno.ENOENT)
        try:
            reader = self._reader(view)
            before = reader.chunks_fetched, reader.bytes_fetched
            data = reader.read(offset, size)
        except QbhubError:  # a chunk that fails authentication is an I/O error, never bytes
            raise _fuse_error(errno.EIO) from None
        self.chunks_fetched += reader.chunks_fetched - before[0]
        self.bytes_fetched += reader.bytes_fetched - before[1]
        self.bytes_read += len(data)
        return data

    def _reader(self, view: ViewFile) -> VolumeReader:
        key = (view.session, view.volume)
        reader = self.readers.get(key)
        if reader is None:
            reader = self.open_volume(view.session, view.volume)
            self.readers[key] = reader
            if len(self.readers) > OPEN_READERS:
                self.readers.popitem(last=False)
        else:
            self.readers.move_to_end(key)
        return reader


def _fuse_error(code: int) -> Exception:
    from mfusepy import FuseOSError

    return FuseOSError(code)


def serve(view: ArchiveView, mountpoint: str) -> None:
    """Mount `view` at `mountpoint` read-only and serve it until it is unmounted."""
    try:
        import mfusepy
    except (ImportError, OSError) as exc:
        raise QbhubError(
            f"FUSE is not available ({exc}): install mfusepy (pip) and libfuse 3 "
            "(Debian: libfuse3-3)"
        ) from None

    class Operations(mfusepy.Operations):
        getattr = view.getattr
        readdir = view.readdir
        open = view.open
        read = view.read

    try:
        mfusepy.FUSE(Operations(), mountpoint, foreground=True, nothreads=True, ro=True,
                     fsname="qbhub", subtype="qbhub")  # fmt: skip
    except RuntimeError as exc:
        raise QbhubError(f"cannot mount at {mountpoint}: {exc}") from None
