"""dom0's side of a Borg restore: check the worker's header, write exactly the declared bytes.

What the worker sends is qbhub's restore stream. The header must name exactly the one volume
asked for, from a session dom0 has in its checked listing (the one asked for if any), with a
bounded size; the restore-validate hooks then see it before a byte is written. The bytes go to
a temporary file beside the target (all-zero blocks left as holes), which replaces the target
only after exactly the declared length and END arrived.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

from qubes_backup_hub.errors import IntegrityError, UsageError
from qubes_backup_hub.progress import Progress
from qubes_backup_hub.safety.jsonlimits import loads_bounded
from qubes_backup_hub.safety.restore_header import RestoreHeader, RestoreVolume

from .protocol import DATA, END, MAX_DATA_FRAME
from .runner import WorkerSession

MAX_VOLUME = 1 << 50  # 1 PiB
ZERO = bytes(MAX_DATA_FRAME)


def parse_header(
    payload: bytes, *, name: str, session: str | None, known: set[str]
) -> RestoreHeader:
    """The worker's header, checked field by field; IntegrityError for any deviation."""
    try:
        body: Any = loads_bounded(payload)
    except ValueError:
        raise IntegrityError("the borg worker's restore header is not JSON") from None
    if not isinstance(body, dict) or set(body) != {"session", "volumes"}:
        raise IntegrityError("the borg worker's restore header has the wrong fields")
    volumes = body["volumes"]
    if (
        not isinstance(volumes, list)
        or len(volumes) != 1
        or not isinstance(volumes[0], dict)
        or set(volumes[0]) != {"name", "size"}
    ):
        raise IntegrityError("the borg worker's restore header must describe one volume")
    size = volumes[0]["size"]
    if volumes[0]["name"] != name:
        raise IntegrityError("the borg worker describes another volume than the one asked for")
    if type(size) is not int or not 0 <= size <= MAX_VOLUME:
        raise IntegrityError("the borg worker's volume size is out of range")
    got = body["session"]
    if not isinstance(got, str) or got not in known or (session is not None and got != session):
        raise IntegrityError("the borg worker restores from a session dom0 did not expect")
    return RestoreHeader(volumes=(RestoreVolume(name, size),), session=got)


def receive_volume(
    worker: WorkerSession, header: RestoreHeader, target: Path, progress: Progress
) -> int:
    """Copy exactly the declared bytes into `target`; return the bytes of data written."""
    size = header.volumes[0].size
    is_device = target.exists() and stat.S_ISBLK(target.stat().st_mode)
    temp = target if is_device else target.with_name(f".{target.name}.qbhub-partial")
    fd = os.open(temp, os.O_WRONLY | (0 if is_device else os.O_CREAT | os.O_TRUNC), 0o600)
    done = written = 0
    try:
        progress.start(f"restore {header.volumes[0].name}", size)
        while True:
            kind, payload = worker.receive({DATA: MAX_DATA_FRAME, END: 0})
            if kind == END:
                break
            if done + len(payload) > size:
                raise IntegrityError("the borg worker sent more bytes than it declared")
            if payload != ZERO[: len(payload)] or is_device:
                os.pwrite(fd, payload, done)
                written += len(payload)
            done += len(payload)
            progress.advance(len(payload))
        if done != size:
            raise IntegrityError(f"the borg worker sent {done} of {size} declared bytes")
        if not is_device:
            os.ftruncate(fd, size)
        os.fsync(fd)
        progress.finish()
    except BaseException:
        os.close(fd)
        if not is_device:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        raise
    os.close(fd)
    if not is_device:
        os.replace(temp, target)
    return written


def check_target(target: Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing regular file without --overwrite, or anything odd."""
    try:
        mode = target.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISBLK(mode):
        return
    if not stat.S_ISREG(mode):
        raise UsageError(f"{target} is neither a regular file nor a block device")
    if not overwrite:
        raise UsageError(f"{target} exists (use --overwrite to replace it)")
