"""A copy of the archive key kept apart from the archive (`qbhub key export` / `key import`).

What is exported is the root's header exactly as stored: archive ID, format, KDF parameters and
the master key wrapped under the passphrase. It is no secret without the passphrase (the same
bytes sit in the archive's root, readable by storage) but it is everything the passphrase needs:
the header is also the associated data of the root's sealed body, so a root whose header was
damaged (a flipped byte in the wrapped key or the KDF parameters) can no longer be opened by
anyone, even with the right passphrase. `key import` puts the exported header back in front of
the stored body and keeps the result only if it authenticates under the passphrase, then commits
it as a new generation. It can't help when the body itself is lost or damaged, nor after a
passphrase change or format upgrade made since the export (the header then differs): export
again after either.
"""

from __future__ import annotations

import struct
from typing import Any

from qubes_backup_hub.errors import IntegrityError, NotFoundError, QbhubError, UsageError
from qubes_backup_hub.store.base import Store

from .limits import MAX_ROOT
from .root import ROOT_MAGIC, RootHeader, split_root


class RootOverride:
    """`store`, except that its root reads as `root` (for opening a repaired root before it is
    written; a commit through it writes to `store`)."""

    def __init__(self, store: Store, root: bytes) -> None:
        self._store, self._root = store, root

    def get_root(self, limit: int) -> bytes | None:
        return self._root[:limit]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def exported_header(root_bytes: bytes) -> bytes:
    """The header bytes of an authenticated root, as `key export` writes them."""
    return split_root(root_bytes)[0]


def check_export(header: bytes) -> RootHeader:
    """The parsed header of an export (IntegrityError if it is not a root header)."""
    framed = ROOT_MAGIC + struct.pack("<I", len(header)) + header
    parsed = split_root(framed)[1]
    if parsed.wrapped_key is None:
        raise UsageError("this export is of an unencrypted archive: it holds no wrapped key")
    return parsed


def repair_candidates(stored: bytes, header: bytes) -> list[bytes]:
    """Roots made of the exported header and the stored body, for each place the body may
    start: after the stored header (framing intact), or after a header as long as the export's
    (the length field itself damaged)."""
    prefix = len(ROOT_MAGIC) + 4
    starts = [prefix + len(header)]
    if len(stored) >= prefix and stored.startswith(ROOT_MAGIC):
        (stored_length,) = struct.unpack_from("<I", stored, len(ROOT_MAGIC))
        if prefix + stored_length < len(stored):
            starts.insert(0, prefix + stored_length)
    framed = ROOT_MAGIC + struct.pack("<I", len(header)) + header
    return [framed + stored[start:] for start in dict.fromkeys(starts) if start < len(stored)]


def read_stored_root(store: Store) -> bytes:
    data = store.get_root(MAX_ROOT)
    if data is None:
        raise NotFoundError(
            f"no archive root at {store.url}: an exported key can repair a damaged root's key, "
            "not a lost root"
        )
    return data


def first_that_opens(candidates: list[bytes], open_root: Any) -> Any:
    """open_root(candidate) of the first candidate that authenticates; IntegrityError if none."""
    for candidate in candidates:
        try:
            return open_root(candidate)
        except QbhubError:
            continue
    raise IntegrityError(
        "the exported key does not open this archive's root: a wrong passphrase, another "
        "archive, a passphrase changed or a format upgraded since the export, or the root's "
        "body is damaged too"
    )
