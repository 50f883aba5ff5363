"""Restoring a volume: walk its tree, fetch pack ranges in parallel, authenticate, write at offset.

Writes go to a fresh temporary file beside the target, renamed into place only after every chunk
authenticated and was written and fsynced: a failed restore leaves no partial file behind.
A block device is written in place (it can't be renamed); a failure says so.

The temporary file is `.NAME.qbhub-partial-PID-RANDOM`. Errors, Ctrl-C, SIGTERM and SIGHUP (the
CLI turns those into exceptions) remove it; a process killed outright (SIGKILL, power loss)
can't, so every restore first removes the partial files in its target directory whose PID is no
longer running: decrypted data does not linger beside the target.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

from qubes_backup_hub.directio import OffsetWriter, open_direct
from qubes_backup_hub.errors import IntegrityError, QbhubError, UsageError
from qubes_backup_hub.progress import Progress

from .blob import BlobType
from .index import BlobLocation
from .pids import pid_alive
from .repository import Repository
from .session import VolumeRecord
from .tree import ID_BYTES, ZERO_ID, iter_leaves

MAX_RUN_BYTES = 8 * 1024 * 1024
PARTIAL_MARK = ".qbhub-partial-"
PARTIAL_NAME = re.compile(r"\..+\.qbhub-partial-([1-9][0-9]{0,6})-[0-9a-f]{8}")
# One read of consecutive blobs in one pack: (pack, offset, total length, [(chunk, id, loc)])
Run = tuple[str, int, int, list[tuple[int, bytes, BlobLocation]]]


def plan_runs(repo: Repository, volume: VolumeRecord) -> Iterator[Run | int]:
    """Yield runs of blobs to read, and the index of every all-zero chunk (as an int)."""
    geometry = volume.geometry
    fanout = geometry.fanout
    run: list[tuple[int, bytes, BlobLocation]] = []
    run_pack, run_start, run_end = "", 0, 0
    for leaf, entries in iter_leaves(volume.tree_id, geometry, repo.load_page):
        first = leaf * fanout
        count = geometry.children(0, leaf)
        for k in range(count):
            blob_id = entries[k * ID_BYTES : (k + 1) * ID_BYTES] if entries else ZERO_ID
            if blob_id == ZERO_ID:
                yield first + k
                continue
            loc = repo.locator.get(blob_id)
            if loc is None or loc.type_code != BlobType.DATA:
                raise IntegrityError(
                    f"chunk {first + k} of volume {volume.name} ({blob_id.hex()[:16]}) is missing "
                    "from the archive"
                )
            if loc.raw_length != geometry.chunk_length(first + k):
                raise IntegrityError(
                    f"chunk {first + k} of volume {volume.name} has the wrong length"
                )
            contiguous = loc.pack == run_pack and loc.offset == run_end
            if run and (not contiguous or run_end - run_start > MAX_RUN_BYTES):
                yield run_pack, run_start, run_end - run_start, run
                run = []
            if not run:
                run_pack, run_start = loc.pack, loc.offset
            run.append((first + k, blob_id, loc))
            run_end = loc.offset + loc.length
    if run:
        yield run_pack, run_start, run_end - run_start, run


class VolumeRestore:
    """Restores one volume record to a path."""

    def __init__(self, repo: Repository, progress: Progress, workers: int | None = None) -> None:
        self.repo = repo
        self.progress = progress
        # Restores are I/O-bound: more threads than cores keep reads and writes overlapping.
        self.workers = workers or max(4, 2 * (os.cpu_count() or 2))

    def run(self, volume: VolumeRecord, target: Path, *, overwrite: bool) -> dict[str, object]:
        mode = _existing_mode(target)
        if mode is not None and stat.S_ISBLK(mode):
            return self._to_block_device(volume, target)
        if mode is not None and not stat.S_ISREG(mode):
            raise UsageError(f"{target} exists and is neither a regular file nor a block device")
        if mode is not None and not overwrite:
            raise UsageError(f"{target} exists; use --overwrite to replace it")
        remove_stale_partials(target.parent)
        tmp = target.parent / f".{target.name}{PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        # Written so that an exception raised anywhere (SIGTERM/SIGHUP become exceptions, and
        # arrive between any two bytecodes) still removes the file: `ours` is set before the
        # file can exist, and cleared only if creating it failed (then it is not ours).
        fd, ours = -1, True
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                ours = False
                raise UsageError(f"cannot create {tmp}: {exc.strerror}") from None
            os.ftruncate(fd, volume.size)
            direct_fd = open_direct(tmp, os.O_WRONLY)
            try:
                written = self._write_all(volume, fd, direct_fd, zero_fill=False)
            finally:
                if direct_fd is not None:
                    os.close(direct_fd)
            os.fsync(fd)
            fd, closing = -1, fd
            os.close(closing)
            os.rename(tmp, target)
        except BaseException as exc:
            if fd >= 0:
                with suppress(OSError):
                    os.close(fd)
            if ours:
                tmp.unlink(missing_ok=True)
            if isinstance(exc, QbhubError) and ours:
                raise type(exc)(f"{exc}; restore aborted, {target} was not written") from None
            raise
        return {
            "volume": volume.name,
            "target": str(target),
            "size": volume.size,
            "bytes_written": written,
        }

    def _to_block_device(self, volume: VolumeRecord, target: Path) -> dict[str, object]:
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        try:
            device_size = os.lseek(fd, 0, os.SEEK_END)
            if device_size < volume.size:
                raise UsageError(
                    f"{target} holds {device_size} bytes; the volume needs {volume.size}"
                )
            try:
                written = self._write_all(volume, fd, None, zero_fill=True)
            except QbhubError as exc:
                raise type(exc)(f"{exc}; the device {target} now holds a partial restore") from None
            os.fsync(fd)
        finally:
            os.close(fd)
        return {
            "volume": volume.name,
            "target": str(target),
            "size": volume.size,
            "bytes_written": written,
        }

    def _write_all(
        self, volume: VolumeRecord, fd: int, direct_fd: int | None, *, zero_fill: bool
    ) -> int:
        chunk_size = volume.chunk_size
        out = OffsetWriter(fd, direct_fd, MAX_RUN_BYTES + chunk_size)
        self.progress.start(volume.name, volume.size)
        written = 0
        zero = bytes(chunk_size)
        in_flight: deque[Future[int]] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="qbhub-restore") as pool:
            try:
                for item in plan_runs(self.repo, volume):
                    if isinstance(item, int):
                        length = volume.geometry.chunk_length(item)
                        if zero_fill:
                            os.pwrite(fd, zero[:length], item * chunk_size)
                            self.progress.advance(length)
                        else:
                            self.progress.skip(length)  # a hole: the bar moves, not the rate
                        continue
                    in_flight.append(pool.submit(self._fetch_and_write, item, out, chunk_size))
                    if len(in_flight) > 2 * self.workers:
                        n = in_flight.popleft().result()
                        written += n
                        self.progress.advance(n)
                while in_flight:
                    n = in_flight.popleft().result()
                    written += n
                    self.progress.advance(n)
            finally:
                for future in in_flight:
                    future.cancel()
        self.progress.finish()
        return written

    def stream(self, volume: VolumeRecord, write: Callable[[bytes], None]) -> int:
        """Hand the volume's bytes to `write` in order, zeros for holes; return the size.

        Runs are fetched and authenticated in parallel; results wait in a small reorder buffer
        (bounded by the runs in flight) until every chunk before them has been written.
        """
        geometry = volume.geometry
        ready: dict[int, bytes | None] = {}  # chunk -> raw bytes, or None for zeros
        next_chunk = 0
        in_flight: deque[Future[list[tuple[int, bytes]]]] = deque()

        def drain() -> None:
            nonlocal next_chunk
            while next_chunk in ready:
                raw = ready.pop(next_chunk)
                write(raw if raw is not None else bytes(geometry.chunk_length(next_chunk)))
                next_chunk += 1

        with ThreadPoolExecutor(self.workers, thread_name_prefix="qbhub-stream") as pool:
            for item in plan_runs(self.repo, volume):
                if isinstance(item, int):
                    ready[item] = None
                else:
                    in_flight.append(pool.submit(self._fetch, item))
                    if len(in_flight) > 2 * self.workers:
                        ready.update(in_flight.popleft().result())
                drain()
            while in_flight:
                ready.update(in_flight.popleft().result())
                drain()
        drain()
        if next_chunk != geometry.chunks:
            raise IntegrityError(f"volume {volume.name} is missing chunks from {next_chunk}")
        return volume.size

    def _fetch(self, run: Run) -> list[tuple[int, bytes]]:
        pack, start, length, blobs = run
        data = memoryview(self.repo.store.get_range(pack, start, length))
        codec = self.repo.codec
        return [
            (
                chunk,
                codec.decode(
                    BlobType.DATA, blob_id, data[loc.offset - start :][: loc.length], loc.raw_length
                ),
            )
            for chunk, blob_id, loc in blobs
        ]

    def _fetch_and_write(self, run: Run, out: OffsetWriter, chunk_size: int) -> int:
        """Read one run from its pack, authenticate each chunk, write contiguous chunks at once."""
        pack, start, length, blobs = run
        data = memoryview(self.repo.store.get_range(pack, start, length))
        codec = self.repo.codec
        written = 0
        group: list[bytes] = []
        group_start = group_end = -1
        for chunk, blob_id, loc in blobs:
            sealed = data[loc.offset - start : loc.offset - start + loc.length]
            raw = codec.decode(BlobType.DATA, blob_id, sealed, loc.raw_length)
            offset = chunk * chunk_size
            if group and (offset != group_end or group_end - group_start >= MAX_RUN_BYTES):
                out.write(group_start, group)
                group = []
            if not group:
                group_start = group_end = offset
            group.append(raw)
            group_end += len(raw)
            written += len(raw)
        if group:
            out.write(group_start, group)
        return written


def remove_stale_partials(directory: Path) -> list[str]:
    """Remove partial restore files in `directory` left by processes that no longer run.

    Only regular files named `.NAME.qbhub-partial-PID-XXXXXXXX` whose PID is not a live process
    are removed (never followed through a symlink); the names removed are returned. A live PID
    (a restore in progress, or a reused PID) keeps its file. Errors are ignored: this is tidying.
    """
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(directory) if PARTIAL_MARK in n]
    except OSError:
        return removed
    for name in names:
        match = PARTIAL_NAME.fullmatch(name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        path = directory / name
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.unlink(path)
                removed.append(name)
        except OSError:
            continue
    return removed


def _existing_mode(path: Path) -> int | None:
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        return None
