"""Volume pools of the LocalPlatform: directories of volume files, `POOL/VM/VOLUME.img`.

A volume is a plain (sparse) file whose size is the volume's size; the filesystem decides whether
snapshots can be reflinks. Imports write into a fresh temporary file and rename it into place only
once exactly the promised number of bytes has arrived, so no reader ever sees a partial volume.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ...errors import IntegrityError, NotFoundError, UsageError
from ...safety.names import check_volume_name
from ..base import PERSISTENT_VOLUMES
from .statefile import check_pool_name, check_vm_name

GIB = 1 << 30
DEFAULT_SIZES = {"private": 2 * GIB, "root": 10 * GIB}
MAX_VOLUME_SIZE = 1 << 50
SIZE = re.compile(r"([0-9]{1,16})\s*(?:([KMGTP])(?:i?B)?|B)?", re.IGNORECASE)
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
COPY_CHUNK = 1 << 20
ZEROS = bytes(COPY_CHUNK)
FICLONE = 0x40049409  # _IOW(0x94, 9, int): share every extent of another file


def parse_size(text: str) -> int:
    """Bytes in `text`: a number with an optional binary suffix (512, 64K, 64M, 2G, 1TiB)."""
    match = SIZE.fullmatch(text.strip())
    if not match:
        raise UsageError(f"bad size {text[:40]!r}: use e.g. 512M, 2G or a number of bytes")
    size = int(match.group(1)) * UNITS[(match.group(2) or "").upper()]
    return check_size(size)


def check_size(size: int) -> int:
    """Return `size` if it is a possible volume size, else raise UsageError."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_VOLUME_SIZE:
        raise UsageError(f"impossible volume size {size!r}")
    return size


def own_volumes(klass: str) -> tuple[str, ...]:
    """The volumes a VM of `klass` owns (an AppVM's root belongs to its template)."""
    return PERSISTENT_VOLUMES.get(klass, ())


class Pools:
    """Every pool under `root` (`$QBHUB_HOME/local/pools`); a pool is created when first used."""

    driver = "file"

    def __init__(self, root: Path) -> None:
        self.root = root

    def pool_dir(self, pool: str) -> Path:
        return self.root / check_pool_name(pool)

    def vm_dir(self, pool: str, vm: str) -> Path:
        return self.pool_dir(pool) / check_vm_name(vm)

    def volume_path(self, pool: str, vm: str, volume: str) -> Path:
        return self.vm_dir(pool, vm) / f"{check_volume_name(volume)}.img"

    def list_pools(self) -> list[str]:
        names = {"default"}
        if self.root.is_dir():
            names.update(p.name for p in self.root.iterdir() if p.is_dir())
        return sorted(names)

    def volume_size(self, pool: str, vm: str, volume: str) -> int:
        path = self.volume_path(pool, vm, volume)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"volume {vm}:{volume} is missing from pool {pool}") from None

    def create_volumes(self, pool: str, vm: str, sizes: dict[str, int]) -> None:
        """Create `vm`'s volumes as empty sparse files of the given sizes (replacing leftovers)."""
        vm_dir = self.vm_dir(pool, vm)
        vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for volume, size in sizes.items():
            fd = os.open(
                self.volume_path(pool, vm, volume), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
            )
            try:
                os.ftruncate(fd, check_size(size))
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(vm_dir)

    def import_volume(self, pool: str, vm: str, volume: str, size: int, data: IO[bytes]) -> None:
        """Replace the volume with exactly `size` bytes from `data`, which must end right there.

        Zero blocks become holes. Short or long input is refused and leaves the old volume as it
        was; the new content appears only by an atomic rename.
        """
        check_size(size)
        with _replacing(self.volume_path(pool, vm, volume), "import") as out:
            _copy_exact(data, out, size, f"{vm}:{volume}")
            out.truncate(size)

    def resize_volume(self, pool: str, vm: str, volume: str, size: int) -> None:
        """Set the volume file to `size` bytes: growing adds zeros; shrinking is refused unless
        the part cut off holds no data at all (a hole), so no data is ever lost."""
        check_size(size)
        fd = os.open(self.volume_path(pool, vm, volume), os.O_RDWR)
        try:
            if size < os.fstat(fd).st_size and _has_data_from(fd, size):
                raise UsageError(f"volume {vm}:{volume} holds data past {size} bytes; not shrunk")
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def clone_volume(
        self, src_pool: str, src_vm: str, dst_pool: str, dst_vm: str, volume: str
    ) -> None:
        """Replace `dst_vm`'s volume with a copy of `src_vm`'s: a reflink where the filesystem
        can share blocks, else a sparse copy; it appears only by an atomic rename."""
        source = self.volume_path(src_pool, src_vm, volume)
        size = self.volume_size(src_pool, src_vm, volume)
        target = self.volume_path(dst_pool, dst_vm, volume)
        with _replacing(target, "clone") as out, open(source, "rb") as src:
            try:
                fcntl.ioctl(out.fileno(), FICLONE, src.fileno())
            except OSError:
                _copy_exact(src, out, size, f"{src_vm}:{volume}")
                out.truncate(size)

    def remove_vm(self, pool: str, vm: str) -> list[str]:
        """Delete `vm`'s directory in `pool` and every file in it; return the volumes removed."""
        vm_dir = self.vm_dir(pool, vm)
        removed: list[str] = []
        if not vm_dir.is_dir():
            return removed
        for entry in sorted(vm_dir.iterdir()):
            if entry.suffix == ".img" and not entry.name.startswith("."):
                removed.append(entry.stem)
            entry.unlink()
        vm_dir.rmdir()
        _fsync_dir(vm_dir.parent)
        return removed


def _has_data_from(fd: int, offset: int) -> bool:
    """True if the file has a data extent at or after `offset` (SEEK_DATA; else assume so)."""
    try:
        os.lseek(fd, offset, os.SEEK_DATA)
        return True
    except OSError as exc:
        return exc.errno != errno.ENXIO


@contextmanager
def _replacing(target: Path, purpose: str) -> Iterator[IO[bytes]]:
    """A new hidden file beside `target`, fsynced and renamed over it if the body succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_name(f".{target.name}.{purpose}-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _copy_exact(data: IO[bytes], out: IO[bytes], size: int, what: str) -> None:
    left = size
    while left:
        chunk = data.read(min(left, COPY_CHUNK))
        if len(chunk) > min(left, COPY_CHUNK):
            raise IntegrityError(f"volume {what}: the data source returned more than asked")
        if not chunk:
            raise IntegrityError(
                f"volume {what}: the data ended after {size - left} of {size} bytes; "
                "nothing imported"
            )
        if chunk == ZEROS[: len(chunk)]:
            out.seek(len(chunk), os.SEEK_CUR)
        else:
            out.write(chunk)
        left -= len(chunk)
    if data.read(1):
        raise IntegrityError(
            f"volume {what}: the data is longer than {size} bytes; nothing imported"
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
