"""Session records: what one backup session holds (a SESSION blob, UTF-8 JSON)."""

from __future__ import annotations

import json
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


def decode_session(data: bytes) -> SessionRecord:
    """Parse and sanity-check a session record (already authenticated)."""
    try:
        doc = json.loads(data)
        volumes = [VolumeRecord(**v) for v in doc["volumes"]]
        record = SessionRecord(
            session_id=str(doc["session_id"]),
            started=str(doc["started"]),
            finished=str(doc["finished"]),
            volumes=volumes,
            metadata=dict(doc.get("metadata", {})),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"session record is malformed ({exc})") from None
    try:
        check_session_id(record.session_id)
    except UsageError as exc:
        raise IntegrityError(f"session record holds a bad session ID: {exc}") from None
    for v in volumes:
        try:
            check_volume_name(v.name)
        except UsageError as exc:
            raise IntegrityError(f"session record holds a bad volume name: {exc}") from None
        if not (
            0 <= v.size <= MAX_VOLUME_SIZE
            and MIN_CHUNK_SIZE <= v.chunk_size <= MAX_CHUNK_SIZE
            and 2 <= v.fanout <= 65535
            and len(v.tree) == 2 * ID_BYTES
        ):
            raise IntegrityError(f"session record has an impossible volume entry {v.name!r}")
    return record
