"""This machine's memory of archives: the newest root generation seen, to refuse rollbacks.

Lives under `$QBHUB_HOME/archives/ARCHIVE_ID.json` (default `~/.local/share/qbhub`). It is small,
holds no secrets, and is the only thing a backup needs to keep locally; losing it only weakens
rollback detection for the next contact with each archive.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import QbhubError

ARCHIVE_ID = re.compile(r"[0-9a-f]{32}")


def default_home() -> Path:
    """`$QBHUB_HOME`, else `$XDG_DATA_HOME/qbhub`, else `~/.local/share/qbhub`."""
    if os.environ.get("QBHUB_HOME"):
        return Path(os.environ["QBHUB_HOME"])
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "qbhub"


@dataclass
class ArchiveMemory:
    """What this machine remembers of one archive."""

    archive_id: str
    generation: int = 0
    seen_at: float = 0.0
    identity: str = ""  # engine-defined fingerprint of the archive's key and suite


class LocalState:
    """Reads and writes ArchiveMemory records in the state directory."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def _path(self, archive_id: str) -> Path:
        if not ARCHIVE_ID.fullmatch(archive_id):
            raise QbhubError(f"malformed archive ID {archive_id!r}")
        return self.home / "archives" / f"{archive_id}.json"

    def recall(self, archive_id: str) -> ArchiveMemory | None:
        """Return what is remembered of `archive_id`, or None on first contact."""
        path = self._path(archive_id)
        try:
            doc = json.loads(path.read_text())
            return ArchiveMemory(
                archive_id,
                int(doc["generation"]),
                float(doc["seen_at"]),
                str(doc.get("identity", "")),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QbhubError(f"local state {path} is unreadable ({exc}); move it aside") from None

    def remember(self, archive_id: str, generation: int, identity: str = "") -> None:
        """Record `generation` (and the archive's identity) as seen, keeping the newest."""
        known = self.recall(archive_id)
        if known is not None and known.generation >= generation and known.identity == identity:
            return
        if known is not None:
            generation = max(generation, known.generation)
        path = self._path(archive_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        doc = {"generation": generation, "seen_at": time.time(), "identity": identity}
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)
