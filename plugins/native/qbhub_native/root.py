"""The archive root: the one mutable object, naming everything else through authenticated IDs.

Bytes: b"QBHUB-ROOT\n" || u32 LE header length || header (UTF-8 JSON) || sealed body.
The header is readable without the passphrase (format, archive ID, suite, KDF, wrapped key); it is
bound to the body as associated data: b"qbhub-root-v1" || header bytes. From format 2 the body is
sealed under a root key derived for it alone (`Keys.for_root`), and the wrapped key is bound to the
format (`crypto.wrap_aad`). The body is UTF-8 JSON:
generation, update time, defaults, the session list and the index list.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from qubes_backup_hub.errors import IntegrityError
from qubes_backup_hub.safety.jsonlimits import loads_bounded

from . import FORMAT_VERSION
from .crypto import Sealer, check_kdf

ROOT_MAGIC = b"QBHUB-ROOT\n"
ROOT_AAD_PREFIX = b"qbhub-root-v1"
WRAPPED_KEY_HEX = 2 * (12 + 64 + 16)  # nonce, master key, tag
SUPPORTED_FORMATS = (1, 2)  # 2: the root body sealed under a key of its own
MAX_GENERATION = 1 << 53  # JSON-safe; a root claiming more is malformed


@dataclass
class RootHeader:
    """The readable part of the root."""

    archive_id: str
    suite: str
    kdf: dict[str, Any] | None
    wrapped_key: str | None = None  # hex, when encrypted
    clear_key: str | None = None  # hex, when encryption is off
    format: int = FORMAT_VERSION

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "format": self.format,
            "archive_id": self.archive_id,
            "suite": self.suite,
            "kdf": self.kdf,
        }
        if self.wrapped_key is not None:
            doc["wrapped_key"] = self.wrapped_key
        if self.clear_key is not None:
            doc["clear_key"] = self.clear_key
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class SessionRef:
    """A session as the root lists it: ID, time, and the ID of its record blob."""

    session_id: str
    record: bytes
    record_length: int
    time: str


@dataclass
class RootBody:
    """The sealed part of the root."""

    generation: int
    updated: str
    chunk_size: int
    fanout: int
    compression_level: int
    sessions: list[SessionRef] = field(default_factory=list)
    indexes: list[tuple[str, int]] = field(default_factory=list)  # (object name, raw length)

    def encode(self) -> bytes:
        doc = {
            "generation": self.generation,
            "updated": self.updated,
            "chunk_size": self.chunk_size,
            "fanout": self.fanout,
            "compression_level": self.compression_level,
            "sessions": [
                {
                    "id": s.session_id,
                    "record": s.record.hex(),
                    "length": s.record_length,
                    "time": s.time,
                }
                for s in self.sessions
            ],
            "indexes": [{"name": n, "length": length} for n, length in self.indexes],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def split_root(data: bytes) -> tuple[bytes, RootHeader, bytes]:
    """Parse the root's framing and header; return (header bytes, header, sealed body)."""
    if not data.startswith(ROOT_MAGIC) or len(data) < len(ROOT_MAGIC) + 4:
        raise IntegrityError("the archive root is not a qbhub root (bad magic)")
    (hlen,) = struct.unpack_from("<I", data, len(ROOT_MAGIC))
    start = len(ROOT_MAGIC) + 4
    raw_header = data[start : start + hlen]
    if len(raw_header) != hlen or hlen > 65536:
        raise IntegrityError("the archive root header is truncated")
    try:
        doc = loads_bounded(raw_header, max_bytes=65536)
        fmt = doc["format"]
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt not in SUPPORTED_FORMATS:
            raise IntegrityError(
                f"archive format {fmt} is not supported by this qbhub (reads {SUPPORTED_FORMATS})"
            )
        header = RootHeader(
            archive_id=_hex_field(doc, "archive_id", 32),
            suite=doc["suite"],
            kdf=doc.get("kdf"),
            wrapped_key=_hex_field(doc, "wrapped_key", WRAPPED_KEY_HEX)
            if "wrapped_key" in doc
            else None,
            clear_key=_hex_field(doc, "clear_key", 128) if "clear_key" in doc else None,
            format=fmt,
        )
        _check_header_types(header)
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"the archive root header is malformed ({exc})") from None
    return raw_header, header, data[start + hlen :]


def _check_header_types(header: RootHeader) -> None:
    if not isinstance(header.suite, str):
        raise IntegrityError("the archive root names no encryption suite")
    kdf = header.kdf
    if kdf is None:
        return
    if not (
        isinstance(kdf, dict)
        and isinstance(kdf.get("name"), str)
        and all(isinstance(kdf.get(k), int) and not isinstance(kdf.get(k), bool) for k in "nrp")
    ):
        raise IntegrityError("the archive root holds malformed key-derivation parameters")
    check_kdf(kdf)  # KdfParametersError: bounded before anything could be authenticated
    _hex_field(kdf, "salt", 32)


def _hex_field(doc: dict[str, Any], key: str, length: int) -> str:
    value = doc[key]
    if (
        not isinstance(value, str)
        or len(value) != length
        or not all(c in "0123456789abcdef" for c in value)
    ):
        raise IntegrityError(f"the archive root field {key} is malformed")
    return value


def encode_root(header: RootHeader, body: RootBody, sealer: Sealer) -> bytes:
    raw_header = header.encode()
    sealed = sealer.seal(ROOT_AAD_PREFIX + raw_header, body.encode())
    return ROOT_MAGIC + struct.pack("<I", len(raw_header)) + raw_header + sealed


def open_body(raw_header: bytes, sealed: bytes, sealer: Sealer) -> RootBody:
    """Authenticate and parse the root body."""
    plaintext = sealer.open(ROOT_AAD_PREFIX + raw_header, sealed, "the archive root")
    try:
        doc = json.loads(plaintext)
        body = RootBody(
            generation=int(doc["generation"]),
            updated=str(doc["updated"]),
            chunk_size=int(doc["chunk_size"]),
            fanout=int(doc["fanout"]),
            compression_level=int(doc["compression_level"]),
            sessions=[
                SessionRef(
                    str(s["id"]), bytes.fromhex(s["record"]), int(s["length"]), str(s["time"])
                )
                for s in doc["sessions"]
            ],
            indexes=[(str(i["name"]), int(i["length"])) for i in doc["indexes"]],
        )
    except (ValueError, KeyError, TypeError, OverflowError) as exc:  # int(1e999) overflows
        raise IntegrityError(f"the archive root body is malformed ({exc})") from None
    if not 0 <= body.generation <= MAX_GENERATION:
        raise IntegrityError(f"the archive root claims generation {body.generation}")
    return body
