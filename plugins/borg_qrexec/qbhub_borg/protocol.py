"""The conversation between dom0 and a Borg backup worker: qbhub's frames, a few more kinds.

Frames are those of `qubes_backup_hub.safety.restore_channel` (`u8 kind || u32 length ||
payload`, each capped by the reader before it is read). dom0 sends JOB (one JSON job), and after
the worker's LISTING a REPLY (JSON: go on, and with what). The worker sends LISTING (the session
names borg lists, for dom0's rollback check), PROGRESS, RESULT (a JSON document), or for a
restore the restore stream proper: HEADER, DATA..., END; or FAIL with one line.
"""

from __future__ import annotations

from qubes_backup_hub.safety.restore_channel import (
    DATA,
    END,
    FAIL,
    HEADER,
    JOB,
    MAX_DATA_FRAME,
    MAX_FAIL,
    MAX_HEADER,
    REPLY,
)

LISTING, PROGRESS, RESULT = b"L", b"P", b"O"
MAX_JOB = 1 << 20
MAX_LISTING = 8 << 20
MAX_PROGRESS = 256
MAX_RESULT = 16 << 20
MAX_REPLY_JSON = 1 << 20
STAGING = "/v"  # where the worker sees the volumes (read-only) and the session document
SESSION_DOC = ".qbhub-session.json"  # the settings document's name in every Borg archive

__all__ = [
    "DATA",
    "END",
    "FAIL",
    "HEADER",
    "JOB",
    "LISTING",
    "MAX_DATA_FRAME",
    "MAX_FAIL",
    "MAX_HEADER",
    "MAX_JOB",
    "MAX_LISTING",
    "MAX_PROGRESS",
    "MAX_REPLY_JSON",
    "MAX_RESULT",
    "PROGRESS",
    "REPLY",
    "RESULT",
    "SESSION_DOC",
    "STAGING",
]
