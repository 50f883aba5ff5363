"""Kernel primitives for reflink snapshots: FIEMAP extent maps, FICLONE copies, filesystem type.

Only ``fcntl.ioctl`` and ``struct``: no compiled helpers. FIEMAP is always asked with
FIEMAP_FLAG_SYNC, because without it data still in the page cache has no extent yet and a
comparison of two maps would miss it (measured; see ../shared/notes/peers.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import secrets
import struct
from typing import NamedTuple

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FIEMAP_FLAG_SYNC = 0x1

EXTENT_LAST = 0x1
EXTENT_UNKNOWN = 0x2
EXTENT_DELALLOC = 0x4
EXTENT_ENCODED = 0x8
EXTENT_NOT_ALIGNED = 0x100
EXTENT_DATA_INLINE = 0x200
EXTENT_DATA_TAIL = 0x400
# Extents whose physical address does not identify their bytes one-to-one: never "unchanged".
UNCOMPARABLE = (
    EXTENT_UNKNOWN
    | EXTENT_DELALLOC
    | EXTENT_ENCODED
    | EXTENT_NOT_ALIGNED
    | EXTENT_DATA_INLINE
    | EXTENT_DATA_TAIL
)

_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, reserved, flags, reserved
_BATCH = 2048  # extents per ioctl call

BTRFS_MAGIC = 0x9123683E
XFS_MAGIC = 0x58465342
FS_NAMES = {BTRFS_MAGIC: "btrfs", XFS_MAGIC: "xfs"}


class Extent(NamedTuple):
    """One FIEMAP extent: logical and physical byte offsets, length, FIEMAP_EXTENT_* flags."""

    logical: int
    physical: int
    length: int
    flags: int

    @property
    def comparable(self) -> bool:
        """True if equal physical addresses imply equal bytes."""
        return not self.flags & UNCOMPARABLE


def fiemap(fd: int, start: int = 0, length: int | None = None) -> list[Extent]:
    """The extents of the open file `fd` in [start, start+length), in logical order (synced)."""
    end = os.fstat(fd).st_size if length is None else start + length
    extents: list[Extent] = []
    pos = start
    buf = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
    while pos < end:
        _HEADER.pack_into(buf, 0, pos, end - pos, FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = _HEADER.unpack_from(buf, 0)[3]
        if mapped == 0:
            break
        records = bytes(buf[_HEADER.size : _HEADER.size + mapped * _EXTENT.size])
        extents.extend(map(Extent._make, _EXTENT.iter_unpack(records)))
        tail = extents[-1]
        if tail.flags & EXTENT_LAST or tail.logical + tail.length <= pos:
            break
        pos = tail.logical + tail.length
    return extents


def ficlone(src_fd: int, dst_fd: int) -> None:
    """Make `dst_fd` share every extent of `src_fd` (an atomic, metadata-only copy)."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def filesystem_type(path: str) -> str | None:
    """ "btrfs", "xfs" or None (another filesystem, or statfs unavailable), from statfs f_type."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64
    if libc.statfs(os.fsencode(path), buf) != 0:
        return None
    (f_type,) = struct.unpack_from("=q", buf.raw, 0)
    return FS_NAMES.get(f_type & 0xFFFFFFFF)


def reflink_supported(directory: str) -> bool:
    """True if FICLONE works between two new files in `directory` (probed, then removed)."""
    a = b = -1
    token = secrets.token_hex(6)
    names = [os.path.join(directory, f".qbhub-probe-{token}-{k}") for k in (0, 1)]
    try:
        a = os.open(names[0], os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        b = os.open(names[1], os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.pwrite(a, bytes(4096), 0)
        ficlone(a, b)
        return True
    except OSError:
        return False
    finally:
        for fd in (a, b):
            if fd >= 0:
                os.close(fd)
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(name)
