"""`BORG_RSH` inside the backup worker: connect borg to the storage side's `borg serve`.

borg starts this as `RSH HOST borg serve ...` and speaks its RPC over our stdin/stdout. We
ignore the arguments (the storage side runs a fixed, restricted `borg serve`) and copy bytes
between our stdin/stdout and the one socket dom0 put in the sandbox, which dom0 connects to
the storage side without reading it (on Qubes this is `qrexec-client-vm BACKUPVM
qbhub.BorgServe+ARCHIVE`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading

SOCKET = "/run/qbhub/borg.sock"
BLOCK = 1 << 20


def _pump_in(sock: socket.socket) -> None:
    """stdin -> socket, then half-close so the server sees the end."""
    with contextlib.suppress(OSError):
        while block := os.read(0, BLOCK):
            sock.sendall(block)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def relay(path: str) -> int:
    """Copy both directions until the server closes; 0 on a clean end."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        print(f"qbhub borg rsh: cannot reach the storage side: {exc}", file=sys.stderr)
        return 255
    threading.Thread(target=_pump_in, args=(sock,), daemon=True).start()
    try:
        while block := sock.recv(BLOCK):
            view = memoryview(block)
            while view:
                view = view[os.write(1, view) :]
    except OSError:
        return 255
    return 0


def main() -> int:
    return relay(os.environ.get("QBHUB_BORG_SOCKET", SOCKET))


if __name__ == "__main__":
    sys.exit(main())
