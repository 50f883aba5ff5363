"""Session IDs as Borg archive names: ordering and choosing the next one."""

from __future__ import annotations

import time
from collections.abc import Iterable

from qubes_backup_hub.safety.names import SESSION_ID


def session_key(session: str) -> tuple[str, int]:
    """Sort key: the timestamp, then the numeric suffix (`-10` after `-9`)."""
    base, _, suffix = session.partition("-")
    return base, int(suffix) if suffix else 0


def next_session(existing: Iterable[str], now: float | None = None) -> str:
    """A session ID newer than every one in `existing`: now, or the newest's base plus -N."""
    names = [s for s in existing if SESSION_ID.fullmatch(s)]
    candidate = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    newest = max(names, key=session_key, default=None)
    if newest is None or session_key(candidate) > session_key(newest):
        return candidate
    base, suffix = session_key(newest)
    if suffix >= 999:
        raise ValueError("too many sessions within one second")
    return f"{base}-{suffix + 1}"
