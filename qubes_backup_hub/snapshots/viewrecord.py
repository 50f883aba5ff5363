"""The sidecar of a kept snapshot view: which archive, volume, size and session the view belongs to.

A small JSON file next to the view, written atomically (temporary file, fsync, rename). It carries
a SHA-256 of its own fields so that damage is detected; anything missing, malformed or failing
that check is reported as "damaged", and the provider then makes the engine scan the whole volume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass

RECORD_FORMAT = 1
MAX_RECORD_BYTES = 4096
_VIEW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,200}")  # a file or LV name, no path


class ViewRecordError(Exception):
    """The sidecar is missing or cannot be trusted; the message says why."""


@dataclass(frozen=True)
class ViewRecord:
    """What a kept view is: archive ID, volume name and size, base session, view name, identity.

    `identity` pins the exact view object: the inode of a reflink view, the thin ID of an LV.
    """

    archive_id: str
    volume: str
    size: int
    base_session: str
    view: str  # name of the view: a file beside the sidecar, or a logical volume
    identity: int

    def _fields(self) -> dict[str, object]:
        return {"format": RECORD_FORMAT, **asdict(self)}

    def encode(self) -> bytes:
        doc = self._fields()
        doc["checksum"] = _checksum(doc)
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> ViewRecord:
        try:
            doc = json.loads(data)
            checksum = doc.pop("checksum")
            if checksum != _checksum(doc):
                raise ViewRecordError("its checksum does not match")
            if doc.pop("format") != RECORD_FORMAT:
                raise ViewRecordError("unknown sidecar format")
            record = cls(**doc)
        except ViewRecordError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ViewRecordError(f"it is malformed ({type(exc).__name__})") from None
        types_ok = all(
            isinstance(v, t)
            for v, t in (
                (record.archive_id, str),
                (record.volume, str),
                (record.size, int),
                (record.base_session, str),
                (record.view, str),
                (record.identity, int),
            )
        )
        if not types_ok or not _VIEW_NAME.fullmatch(record.view):
            raise ViewRecordError("it holds fields of the wrong type or shape")
        return record


def _checksum(doc: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def read_record(path: str) -> ViewRecord:
    """Read and check a sidecar; raise ViewRecordError saying why it cannot be used."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        raise ViewRecordError("no view is kept from a previous backup") from None
    except OSError as exc:
        raise ViewRecordError(f"it cannot be read ({exc.strerror})") from None
    if len(data) > MAX_RECORD_BYTES:
        raise ViewRecordError("it is too large")
    return ViewRecord.decode(data)


def write_record(path: str, record: ViewRecord) -> None:
    """Write a sidecar atomically and durably (temporary file, fsync, rename, directory fsync)."""
    directory = os.path.dirname(path)
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, record.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
