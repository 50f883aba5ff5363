"""Validation of names that cross a trust boundary (object names, volume names, session IDs)."""

from __future__ import annotations

import re

from ..errors import StoreError, UsageError

OBJECT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")
SESSION_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z(-[0-9]{1,3})?")


def check_object_name(name: str) -> str:
    """Return `name` if it is a valid store object name, else raise StoreError."""
    if not isinstance(name, str) or not OBJECT_NAME.fullmatch(name):
        raise StoreError(f"refused object name {name!r}: must match {OBJECT_NAME.pattern}")
    return name


def check_volume_name(name: str) -> str:
    """Return `name` if it is a valid volume name, else raise UsageError."""
    if not isinstance(name, str) or not VOLUME_NAME.fullmatch(name):
        raise UsageError(
            f"invalid volume name {name!r}: use 1-128 of A-Z a-z 0-9 . _ : + -, "
            "starting with a letter or digit"
        )
    return name


def check_session_id(session_id: str) -> str:
    """Return `session_id` if it has the form YYYYMMDDTHHMMSSZ[-N], else raise UsageError."""
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        raise UsageError(f"invalid session ID {session_id!r}: expected e.g. 20261126T160102Z")
    return session_id
