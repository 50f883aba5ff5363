"""What a session says about itself besides its data: the host that made it, a comment and tags.

`make_notes` checks what the user gives `backup --comment/--tag` and adds the host name; the
result goes into the session's metadata, inside the engine's encryption. `summary` reads it
back for `qbhub list`, from metadata that authenticated but may have been written by another
machine or an older qbhub: every field is type-checked and made printable, never trusted raw.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from .errors import UsageError
from .safety.text import shown

TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}")
MAX_COMMENT = 1000
MAX_TAGS = 32
MAX_VMS = 1000  # VM names listed per session (a Qubes system has tens)


def make_notes(comment: str | None, tags: list[str]) -> dict[str, Any]:
    """The metadata fields of a new session, checked (a UsageError names what is wrong)."""
    if comment is not None:
        if len(comment) > MAX_COMMENT:
            raise UsageError(f"--comment is longer than {MAX_COMMENT} characters")
        if not comment.isprintable():
            raise UsageError("--comment must be one line of printable text")
    bad = [t for t in tags if not TAG.fullmatch(t)]
    if bad:
        raise UsageError(
            f"invalid tag {bad[0]!r}: use 1-64 of A-Z a-z 0-9 _ . : + -, starting with a "
            "letter or digit"
        )
    if len(set(tags)) > MAX_TAGS:
        raise UsageError(f"at most {MAX_TAGS} tags")
    notes: dict[str, Any] = {"host": socket.gethostname()}
    if comment:
        notes["comment"] = comment
    if tags:
        notes["tags"] = sorted(set(tags))
    return notes


def summary(metadata: object) -> dict[str, Any]:
    """host, comment, tags and VM names of a session's metadata, each printable and bounded."""
    if not isinstance(metadata, dict):
        return {}
    out: dict[str, Any] = {}
    for key, limit in (("host", 100), ("comment", MAX_COMMENT)):
        value = metadata.get(key)
        if isinstance(value, str) and value:
            out[key] = shown(value, limit)
    tags = metadata.get("tags")
    if isinstance(tags, list):
        out["tags"] = [shown(t, 64) for t in tags[:MAX_TAGS] if isinstance(t, str)]
    vms = metadata.get("vms")
    if isinstance(vms, list):
        names = [vm.get("name") for vm in vms if isinstance(vm, dict)]
        out["vms"] = [shown(n, 64) for n in names[:MAX_VMS] if isinstance(n, str)]
    return out
