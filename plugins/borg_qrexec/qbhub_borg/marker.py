"""The qbhub root of a Borg archive: which engine wrote it, and the archive's qbhub identity.

The store's root object holds only this small marker; the Borg repository lives beside it (in
`borg/`) and is never read by dom0. The marker is written by storage's side of the trust line
like everything else, so it is parsed strictly and believed only for what it can't abuse: which
engine to use, the archive ID the rollback memory is keyed by (swapping it in gains storage no
more than a first contact), and whether the repository was created append-only.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from qubes_backup_hub.errors import IntegrityError
from qubes_backup_hub.safety.jsonlimits import loads_bounded

MAGIC = b"QBHUB-BORG\n"
MAX_MARKER = 4096
ARCHIVE_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Marker:
    """The archive's engine facts: ID, encryption mode, append-only."""

    archive_id: str
    append_only: bool = False
    encryption: str = "repokey-blake2"

    @classmethod
    def new(cls, *, append_only: bool) -> Marker:
        return cls(archive_id=secrets.token_hex(16), append_only=append_only)

    def encode(self) -> bytes:
        body = {
            "engine": "borg",
            "version": 1,
            "archive_id": self.archive_id,
            "append_only": self.append_only,
            "encryption": self.encryption,
        }
        return MAGIC + json.dumps(body, sort_keys=True).encode() + b"\n"


def is_marker(root: bytes) -> bool:
    """True if `root` looks like a marker this engine wrote (the host picks the engine by it)."""
    return root.startswith(MAGIC)


def decode(root: bytes) -> Marker:
    """Parse a marker strictly; IntegrityError for anything else."""
    if not is_marker(root) or len(root) > MAX_MARKER:
        raise IntegrityError("the archive root is not a qbhub Borg archive marker")
    try:
        body = loads_bounded(root[len(MAGIC) :])
    except (UnicodeDecodeError, ValueError):
        raise IntegrityError("the Borg archive marker is not valid JSON") from None
    if (
        not isinstance(body, dict)
        or set(body) != {"engine", "version", "archive_id", "append_only", "encryption"}
        or body["engine"] != "borg"
        or body["version"] != 1
        or not isinstance(body["archive_id"], str)
        or not ARCHIVE_ID.fullmatch(body["archive_id"])
        or not isinstance(body["append_only"], bool)
        or body["encryption"] != "repokey-blake2"
    ):
        raise IntegrityError("the Borg archive marker is malformed")
    return Marker(body["archive_id"], body["append_only"], body["encryption"])
