"""This machine's memory of archives: the newest root generation seen, to refuse rollbacks.

An archive is known by its ID *and* its key fingerprint (a one-way digest of the archive's master
key, computed only after the root was authenticated under that key). Storage can copy an archive
ID onto an archive of its own making; it cannot make a root that authenticates under the user's
passphrase, so the pair names one archive the user really made.

Lives under `$QBHUB_HOME/archives/ARCHIVE_ID-FINGERPRINT.json` (default `~/.local/share/qbhub`).
It is small, holds no secrets, and is the only thing a backup needs to keep locally; losing it
only weakens rollback detection for the next contact with each archive. Only dom0 (the process
that authenticated a root itself, or wrote it) updates it: nothing a worker reports reaches it.

Readers racing a writer: a command reads the memory *before* it reads the root (`recall`), and
compares the root with that; a writer that commits in between raises the memory past the root the
reader got, which is not a rollback. `remember` only ever raises a generation.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..errors import QbhubError, RollbackError

ARCHIVE_ID = re.compile(r"[0-9a-f]{32}")
FINGERPRINT = re.compile(r"[0-9a-f]{16,64}")
MAX_GENERATION = 1 << 53  # a root claiming more is malformed (JSON-safe integer range)


def default_home() -> Path:
    """`$QBHUB_HOME`, else `$XDG_DATA_HOME/qbhub`, else `~/.local/share/qbhub`."""
    if os.environ.get("QBHUB_HOME"):
        return Path(os.environ["QBHUB_HOME"])
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "qbhub"


@dataclass(frozen=True)
class ArchiveFacts:
    """What dom0 learned from a root it authenticated itself (never from a worker's word)."""

    archive_id: str
    fingerprint: str  # hex digest of the archive's key (engine-defined, one-way)
    generation: int
    newest_session_time: str = ""  # "" when the archive holds no session
    encrypted: bool = True
    sessions: tuple[str, ...] = ()  # session IDs the root lists, oldest first

    def line(self) -> str:
        """The one line shown on first contact, so a user can tell an old copy from the current."""
        newest = self.newest_session_time or "no session yet"
        kind = "" if self.encrypted else " (UNENCRYPTED)"
        return (
            f"archive {self.archive_id}{kind}: key fingerprint {self.fingerprint}, "
            f"generation {self.generation}, newest session {newest}"
        )


@dataclass
class ArchiveMemory:
    """What this machine remembers of one archive (ID and key fingerprint)."""

    archive_id: str
    fingerprint: str
    generation: int = 0
    seen_at: float = 0.0


class LocalState:
    """Reads and writes ArchiveMemory records in the state directory."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def _path(self, archive_id: str, fingerprint: str) -> Path:
        if not ARCHIVE_ID.fullmatch(archive_id):
            raise QbhubError(f"malformed archive ID {archive_id!r}")
        if not FINGERPRINT.fullmatch(fingerprint):
            raise QbhubError(f"malformed key fingerprint {fingerprint!r}")
        return self.home / "archives" / f"{archive_id}-{fingerprint}.json"

    def recall(self, archive_id: str, fingerprint: str) -> ArchiveMemory | None:
        """Return what is remembered of this archive, or None on first contact."""
        path = self._path(archive_id, fingerprint)
        try:
            doc = json.loads(path.read_text())
            generation = doc["generation"]
            if not isinstance(generation, int) or not 0 <= generation <= MAX_GENERATION:
                raise ValueError("generation out of range")
            return ArchiveMemory(archive_id, fingerprint, generation, float(doc["seen_at"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QbhubError(f"local state {path} is unreadable ({exc}); move it aside") from None

    def recall_all(self, archive_id: str) -> dict[str, ArchiveMemory]:
        """Every memory of `archive_id`, by key fingerprint; read it *before* reading the root,
        when the fingerprint is not known yet (it needs the key the root wraps)."""
        if not ARCHIVE_ID.fullmatch(archive_id):
            raise QbhubError(f"malformed archive ID {archive_id!r}")
        found: dict[str, ArchiveMemory] = {}
        folder = self.home / "archives"
        if not folder.is_dir():
            return found
        for path in folder.glob(f"{archive_id}-*.json"):
            fingerprint = path.stem.partition("-")[2]
            if FINGERPRINT.fullmatch(fingerprint):
                memory = self.recall(archive_id, fingerprint)
                if memory is not None:
                    found[fingerprint] = memory
        return found

    def remember(self, archive_id: str, fingerprint: str, generation: int) -> None:
        """Record `generation` as seen (authenticated or written by this process); never lower."""
        if not isinstance(generation, int) or not 0 <= generation <= MAX_GENERATION:
            raise QbhubError(f"refusing to remember generation {generation!r}")
        path = self._path(archive_id, fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Two commands finishing at once must not let the lower generation land last.
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            known = self.recall(archive_id, fingerprint)
            if known is not None and known.generation >= generation:
                return
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            doc = {"generation": generation, "seen_at": time.time()}
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, path)


def check_rollback(known: ArchiveMemory | None, facts: ArchiveFacts) -> None:
    """Raise RollbackError if the authenticated root in `facts` is older than `known`.

    `known` must have been recalled *before* the root was read (see the module docstring).
    """
    if known is not None and facts.generation < known.generation:
        seen = datetime.fromtimestamp(known.seen_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
        raise RollbackError(
            f"archive rollback detected: the root is generation {facts.generation}, "
            f"but generation {known.generation} was seen here on {seen}"
        )
