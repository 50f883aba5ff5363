"""Volume import through `admin.vm.volume.ImportWithSize`, streamed with an exact size.

qubesd does not take volume data over its socket (requests are capped at 64 KiB). In dom0 the
call runs the qrexec service implementation directly, as qubes-core-admin-client does for
streamed payloads: ``env QREXEC_REMOTE_DOMAIN=dom0 QREXEC_REQUESTED_TARGET=VM
/etc/qubes-rpc/admin.vm.volume.ImportWithSize VOLUME`` (through sudo when not root), stdin
``SIZE\\n`` then the data. That script asks qubesd (internal.vm.volume.ImportBegin) for a fresh
volume of SIZE bytes, copies exactly SIZE bytes into it with dd, then commits it
(internal.vm.volume.ImportEnd) and prints qubesd's response, which we parse like any other.
The VM must be halted.

dd stops quietly at end of input, so the script would commit a short import padded with zeros.
We therefore never give it the last byte before we know the data is exactly SIZE bytes long: the
final chunk is held back until one more read proves there is nothing after it, and on short or
long data the service is terminated before its input is closed, so ImportEnd never runs and the
volume keeps its previous content.
"""

from __future__ import annotations

import contextlib
import os
import signal
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
    problem = _feed(proc.stdin, size, data)
    if problem is not None:
        _abort(proc)
        raise QubesApiError(call, "SizeMismatch", problem + "; import aborted, nothing written")
    output = proc.stdout.read(MAX_OUTPUT + 1)
    proc.wait()
    if len(output) > MAX_OUTPUT:
        raise QubesApiError(call, "Malformed", "oversized response from the import service")
    parse_response(call, output)


def _feed(stdin: IO[bytes], size: int, data: IO[bytes]) -> str | None:
    """Write the size line and the data, holding back the final chunk; None if all went in."""
    remaining = size
    try:
        stdin.write(f"{size}\n".encode())
        while remaining:
            chunk = data.read(min(CHUNK, remaining))
            if not chunk:
                return f"data ended {remaining} bytes short of {size}"
            remaining -= len(chunk)
            if remaining == 0 and data.read(1):
                return f"data is longer than the announced {size} bytes"
            stdin.write(chunk)
        stdin.close()
    except BrokenPipeError:
        pass  # the service refused early; its answer on stdout says why
    return None


def _abort(proc: subprocess.Popen[bytes]) -> None:
    """Stop the service before it sees end of input, so it never commits the import."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
