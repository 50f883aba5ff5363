"""Whether the process that left a temporary file behind still runs (stale-file cleanup)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True unless no process has this PID (a process we may not signal still counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
