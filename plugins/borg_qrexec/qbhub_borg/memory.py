"""dom0's rollback memory for Borg archives: the sessions this machine has seen.

Borg keeps its own anti-rollback record (the manifest timestamp) in the client's home, which a
DispVM worker loses at every start, so the hub keeps one instead: per archive, every session it
saw and the newest. A listing that lacks a session this machine saw and did not prune, or whose
newest session is older than the newest seen, is refused. The file is read, compared and
replaced under one flock, and nothing a worker says changes it except through that check.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from qubes_backup_hub.errors import RollbackError
from qubes_backup_hub.safety.names import SESSION_ID

from .sessions import session_key

MAX_MEMORY = 16 << 20


@dataclass
class Seen:
    """What this machine knows of one archive."""

    sessions: set[str] = field(default_factory=set)
    newest: str | None = None
    known: bool = False  # False: first contact

    def check(self, listing: Iterable[str]) -> None:
        """Refuse a listing that lost a session or whose newest is older than ours."""
        present = set(listing)
        missing = sorted(self.sessions - present, key=session_key)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if missing[5:] else "")
            raise RollbackError(
                f"the archive lacks {len(missing)} session(s) this machine saw and did not prune "
                f"({shown}): storage deleted or rolled it back"
            )
        newest = max(present, key=session_key, default=None)
        if self.newest is not None and (
            newest is None or session_key(newest) < session_key(self.newest)
        ):
            raise RollbackError(
                f"the archive's newest session is {newest or 'none'}, older than {self.newest} "
                "seen here: storage rolled it back"
            )

    def add(self, sessions: Iterable[str]) -> None:
        self.sessions |= set(sessions)
        self.newest = max(
            [*self.sessions, *([self.newest] if self.newest else [])], key=session_key, default=None
        )


class Memory:
    """The memory file of one archive under `state_dir/borg/`."""

    def __init__(self, state_dir: Path, archive_id: str) -> None:
        self.path = state_dir / "borg" / f"{archive_id}.json"

    @contextmanager
    def locked(self) -> Iterator[Seen]:
        """Load under an exclusive lock; whatever the body leaves in the Seen is saved."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            seen = self._load()
            yield seen
            self._save(seen)

    def _load(self) -> Seen:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_MEMORY + 1)
        except FileNotFoundError:
            return Seen()
        if len(raw) > MAX_MEMORY:
            raise RollbackError(f"{self.path} is larger than {MAX_MEMORY} bytes")
        try:
            body = json.loads(raw)
            sessions = {s for s in body["sessions"] if SESSION_ID.fullmatch(s)}
            newest = body["newest"]
            if newest is not None and not SESSION_ID.fullmatch(newest):
                raise ValueError(newest)
        except (ValueError, KeyError, TypeError):
            raise RollbackError(f"{self.path} is damaged; remove it to start afresh") from None
        return Seen(sessions, newest, known=True)

    def _save(self, seen: Seen) -> None:
        body = {"sessions": sorted(seen.sessions, key=session_key), "newest": seen.newest}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(body, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
