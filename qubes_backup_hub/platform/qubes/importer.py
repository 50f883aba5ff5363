"""Volume import through `admin.vm.volume.ImportWithSize`, streamed with an exact size.

qubesd does not take volume data over its socket (requests are capped at 64 KiB). In dom0 the
call runs the qrexec service implementation directly, as qubes-core-admin-client does for
streamed payloads: ``env QREXEC_REMOTE_DOMAIN=dom0 QREXEC_REQUESTED_TARGET=VM
/etc/qubes-rpc/admin.vm.volume.ImportWithSize VOLUME`` (through sudo when not root), stdin
``SIZE\\n`` then the data. That script asks qubesd (internal.vm.volume.ImportBegin) for a fresh
volume of SIZE bytes, copies exactly SIZE bytes into it with dd, then commits it
(internal.vm.volume.ImportEnd) and prints qubesd's response, which we parse like any other.
The VM must be halted.

The service counts the bytes itself: it copies at most SIZE bytes with dd, then checks that dd
copied exactly SIZE and that nothing follows, and reports "ok" or "fail" to qubesd
(internal.vm.volume.ImportEnd), which commits the new volume only on "ok" and otherwise discards
it. So the service is never killed mid-import (that would leave the import pending in qubesd: the
`file` driver then refuses the next import, LVM thin refuses imports, clones and reverts of that
volume). When our data is short, or reading it fails, its input is closed early; when it is long,
one byte more than SIZE is sent. Either way the service makes qubesd discard the import, and the
error is raised here after the service has finished.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Sequence
from typing import IO

from ...errors import UsageError
from .wire import QubesApiError, parse_response

IMPORT_SERVICE = "/etc/qubes-rpc/admin.vm.volume.ImportWithSize"
CHUNK = 1024 * 1024
MAX_OUTPUT = 1024 * 1024


def needs_sudo() -> bool:
    """The service runs as root; qubesadmin goes through sudo when it is not root already."""
    return os.getuid() != 0


def import_with_size(
    service: Sequence[str],
    vm: str,
    volume: str,
    size: int,
    data: IO[bytes],
    *,
    sudo: bool = False,
) -> None:
    """Import exactly `size` bytes from `data` into `vm`'s `volume`; refuse short or long data."""
    call = f"admin.vm.volume.ImportWithSize+{volume} on {vm}"
    if size <= 0:
        raise UsageError(f"{call}: size must be positive, got {size}")
    argv = [
        *(["sudo"] if sudo else []),
        "env",
        "QREXEC_REMOTE_DOMAIN=dom0",
        f"QREXEC_REQUESTED_TARGET={vm}",
        *service,
        volume,
    ]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as e:
        raise QubesApiError(call, "Connection", f"cannot run {service[0]}: {e}") from None
    assert proc.stdin is not None and proc.stdout is not None
    try:
        problem = _feed(proc.stdin, size, data)
    except BaseException:
        # Reading the data failed: end the service's input early so that it reports a short
        # import and qubesd discards it; then let the caller see the reason.
        _finish(proc)
        raise
    output = _finish(proc)
    if len(output) > MAX_OUTPUT:
        raise QubesApiError(call, "Malformed", "oversized response from the import service")
    if problem is None:
        parse_response(call, output)
        return
    try:
        parse_response(call, output)
    except QubesApiError as e:
        raise QubesApiError(
            call, "SizeMismatch", f"{problem}; qubesd discarded the import ({e.message})"
        ) from None
    raise QubesApiError(call, "SizeMismatch", f"{problem}, yet the import service reported success")


def _feed(stdin: IO[bytes], size: int, data: IO[bytes]) -> str | None:
    """Write the size line and up to size+1 bytes of data; say what was wrong with its length.

    Short data ends the service's input early; long data gets one byte past SIZE through, so
    the service itself sees the wrong length and refuses. None if the data was exactly SIZE.
    """
    remaining = size
    problem = None
    try:
        stdin.write(f"{size}\n".encode())
        while remaining:
            chunk = data.read(min(CHUNK, remaining))
            if not chunk:
                problem = f"data ended {remaining} bytes short of {size}"
                break
            remaining -= len(chunk)
            stdin.write(chunk)
        if problem is None:
            extra = data.read(1)
            if extra:
                problem = f"data is longer than the announced {size} bytes"
                stdin.write(extra)
    except BrokenPipeError:
        pass  # the service refused early (e.g. ImportBegin failed); its answer says why
    return problem


def _finish(proc: subprocess.Popen[bytes]) -> bytes:
    """Close the service's input, read its answer and wait for it to end (never killed)."""
    assert proc.stdin is not None and proc.stdout is not None
    with contextlib.suppress(OSError):
        proc.stdin.close()
    output = proc.stdout.read(MAX_OUTPUT + 1)
    proc.stdout.close()
    proc.wait()
    return output
