"""Every inotify event under a directory tree, for tests that prove nothing touched it.

The hostile-storage matrix watches a directory outside the archive that a symlink in the archive
points at: any open, read, write or delete there by a command under test is an escape.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
IN_ALL_EVENTS = 0x00000FFF
IN_EVENT_NAMES = {
    0x1: "ACCESS",
    0x2: "MODIFY",
    0x4: "ATTRIB",
    0x8: "CLOSE_WRITE",
    0x10: "CLOSE_NOWRITE",
    0x20: "OPEN",
    0x40: "MOVED_FROM",
    0x80: "MOVED_TO",
    0x100: "CREATE",
    0x200: "DELETE",
    0x400: "DELETE_SELF",
    0x800: "MOVE_SELF",
    0x8000: "IGNORED",
}
_EVENT = struct.Struct("iIII")
IN_OPEN = 0x20
IN_CLOSE_NOWRITE = 0x10
IN_ISDIR = 0x40000000


class Watch:
    """Every inotify event (open, read, write, create, delete, ...) under a directory tree."""

    def __init__(self, top: Path) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.paths: dict[int, str] = {}
        directories = [dirpath for dirpath, _, _ in os.walk(top)]  # listed before watching
        for dirpath in directories:
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(dirpath), IN_ALL_EVENTS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), "inotify_add_watch", dirpath)
            self.paths[wd] = dirpath

    def events(self) -> list[str]:
        """What happened since the watch began, as 'path: EVENT|EVENT' strings.

        A close with no open seen under the watch is left out: it is the last copy of a
        descriptor opened before the watch began (this test's own directory walk, its copy
        inherited by a child that another case's thread forked in that instant and closed at
        exec), not something a command did after it started.
        """
        seen: list[str] = []
        opened: set[str] = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            pos = 0
            while pos < len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, pos)
                name = data[pos + _EVENT.size : pos + _EVENT.size + length].rstrip(b"\0")
                pos += _EVENT.size + length
                path = os.path.join(self.paths.get(wd, "?"), name.decode())
                if mask & IN_OPEN:
                    opened.add(path)
                if mask & ~IN_ISDIR == IN_CLOSE_NOWRITE and path not in opened:
                    continue
                what = "|".join(n for bit, n in IN_EVENT_NAMES.items() if mask & bit)
                seen.append(f"{path}: {what}")

    def close(self) -> None:
        os.close(self.fd)
