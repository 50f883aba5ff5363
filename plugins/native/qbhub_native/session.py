"""Session records: what one backup session holds (a SESSION blob, UTF-8 JSON)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from qubes_backup_hub.errors import IntegrityError, UsageError
from qubes_backup_hub.safety.names import check_session_id, check_volume_name

from .limits import MAX_CHUNK_SIZE, MAX_VOLUME_SIZE, MIN_CHUNK_SIZE
from .tree import ID_BYTES, Geometry


@dataclass
class VolumeRecord:
    """One volume in a session: name, size, tree, and what the backup cost."""

    name: str
    size: int
    chunk_size: int
    fanout: int
    tree: str  # hex tree ID
    provider: str = "plain"
    bytes_read: int = 0
    chunks_new: int = 0
    bytes_new: int = 0  # sealed bytes this volume added to the archive

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.chunk_size, self.fanout)

    @property
    def tree_id(self) -> bytes:
        return bytes.fromhex(self.tree)


@dataclass
class SessionRecord:
    """A session: its ID, start and end times, volumes, and free-form metadata."""

    session_id: str
    started: str
    finished: str
    volumes: list[VolumeRecord] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    def volume(self, name: str) -> VolumeRecord | None:
        return next((v for v in self.volumes if v.name == name), None)


TREE_HEX = re.compile(f"[0-9a-f]{{{2 * ID_BYTES}}}")
VOLUME_INTS = ("size", "chunk_size", "fanout", "bytes_read", "chunks_new", "bytes_new")
VOLUME_FIELDS = {"name", "tree", "provider", *VOLUME_INTS}


def decode_session(data: bytes) -> SessionRecord:
    """Parse and sanity-check a session record (already authenticated).

    Guarantees: raises only IntegrityError on malformed input (bad JSON, nesting too deep, wrong
    types, impossible values); unknown keys are ignored (FORMAT.md section 8).
    """
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"session record is malformed ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("volumes"), list):
        raise IntegrityError("session record is malformed (no volume list)")
    fields = [doc.get(k) for k in ("session_id", "started", "finished")]
    metadata = doc.get("metadata", {})
    if not all(isinstance(f, str) for f in fields) or not isinstance(metadata, dict):
        raise IntegrityError("session record is malformed (wrong field types)")
    volumes = [_decode_volume(v) for v in doc["volumes"]]
    record = SessionRecord(str(fields[0]), str(fields[1]), str(fields[2]), volumes, metadata)
    try:
        check_session_id(record.session_id)
    except UsageError as exc:
        raise IntegrityError(f"session record holds a bad session ID: {exc}") from None
    if len({v.name for v in volumes}) != len(volumes):
        raise IntegrityError("session record names a volume twice")
    return record


def _decode_volume(doc: object) -> VolumeRecord:
    """One volume entry, its types and ranges checked; IntegrityError otherwise."""
    if not isinstance(doc, dict):
        raise IntegrityError("session record has a malformed volume entry")
    known = {k: v for k, v in doc.items() if k in VOLUME_FIELDS}
    if not all(isinstance(known.get(k), str) for k in ("name", "tree")) or not all(
        type(known.get(k, 0)) is int for k in VOLUME_INTS
    ):
        raise IntegrityError("session record has a malformed volume entry")
    if not isinstance(known.get("provider", ""), str):
        raise IntegrityError("session record has a malformed volume entry")
    try:
        volume = VolumeRecord(**known)
        check_volume_name(volume.name)
    except (TypeError, ValueError, UsageError) as exc:
        raise IntegrityError(f"session record has a bad volume entry: {exc}") from None
    if not (
        0 <= volume.size <= MAX_VOLUME_SIZE
        and MIN_CHUNK_SIZE <= volume.chunk_size <= MAX_CHUNK_SIZE
        and volume.chunk_size % 4096 == 0
        and 2 <= volume.fanout <= 65535
        and TREE_HEX.fullmatch(volume.tree)
    ):
        raise IntegrityError(f"session record has an impossible volume entry {volume.name!r}")
    return volume
