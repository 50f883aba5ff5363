"""Blobs: the unit of storage. A blob's plaintext is compressed (or not), then sealed.

Sealed plaintext = one compression byte (0 = stored raw, 1 = zstd frame) followed by the payload.
Associated data = b"qbhub-blob-v1" || type byte || 32-byte ID, so a blob can't be replayed under
another ID or type. An ID is the keyed hash of the type byte and the raw (uncompressed) content.
"""

from __future__ import annotations

import threading
from enum import IntEnum

import zstandard

from qubes_backup_hub.errors import IntegrityError

from .crypto import Sealer
from .limits import MAX_CHUNK_SIZE, MAX_INDEX_OBJECT

BLOB_AAD_PREFIX = b"qbhub-blob-v1"
RAW, ZSTD = 0, 1
# Store compressed only when it saves at least 1/32 of the raw size.
MIN_SAVING_DIVISOR = 32
ONE_SHOT_LIMIT = MAX_CHUNK_SIZE  # expected raw lengths decompressed in one call (else streamed)
STREAM_STEP = 1 << 20
MAX_RAW = MAX_INDEX_OBJECT  # no blob is larger raw (index objects are the largest)


class BlobType(IntEnum):
    """What a blob holds; part of its ID and its associated data."""

    DATA = 1
    TREE = 2
    SESSION = 3
    INDEX = 4


TYPE_NAMES = {t.value: t.name.lower() for t in BlobType}


def blob_aad(type_code: int, blob_id: bytes) -> bytes:
    """The associated data that binds a sealed blob to its type and ID."""
    return BLOB_AAD_PREFIX + bytes((type_code,)) + blob_id


class BlobCodec:
    """Compresses+seals and opens+decompresses blobs; safe to share between threads."""

    def __init__(self, sealer: Sealer, level: int = 3) -> None:
        self.sealer = sealer
        self.level = level
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        comp = getattr(self._local, "compressor", None)
        if comp is None:
            comp = self._local.compressor = zstandard.ZstdCompressor(
                level=self.level, write_checksum=False, write_content_size=False
            )
        return comp

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dec = getattr(self._local, "decompressor", None)
        if dec is None:
            dec = self._local.decompressor = zstandard.ZstdDecompressor()
        return dec

    def encode(
        self, type_code: int, blob_id: bytes, raw: bytes | memoryview, *, compress: bool = True
    ) -> bytes | bytearray:
        """Return the sealed blob for `raw` content with `blob_id`.

        With `compress=False` the blob is stored raw, so its sealed length is exactly
        `len(raw) + 1 + sealer.overhead` (index objects rely on that for their padding).
        """
        packed = self._compressor().compress(raw) if compress and self.level > 0 else b""
        payload: bytes | memoryview
        if packed and len(packed) < len(raw) - len(raw) // MIN_SAVING_DIVISOR:
            flag, payload = ZSTD, packed
        else:
            flag, payload = RAW, raw
        plaintext = bytearray(1 + len(payload))
        plaintext[0] = flag
        plaintext[1:] = payload
        return self.sealer.seal(blob_aad(type_code, blob_id), plaintext)

    def decode(
        self, type_code: int, blob_id: bytes, sealed: bytes | memoryview, raw_length: int
    ) -> bytes:
        """Authenticate and decompress a blob; its raw content must be exactly `raw_length`."""
        if type_code not in TYPE_NAMES or not 0 <= raw_length <= MAX_RAW:
            raise IntegrityError(
                f"blob {blob_id.hex()[:16]} has type {type_code}, length {raw_length}"
            )
        what = f"{TYPE_NAMES[type_code]} blob {blob_id.hex()[:16]}"
        plaintext = self.sealer.open(blob_aad(type_code, blob_id), sealed, what)
        if not plaintext:
            raise IntegrityError(f"{what} is empty")
        flag, payload = plaintext[0], memoryview(plaintext)[1:]
        if flag == RAW:
            raw = bytes(payload)
        elif flag == ZSTD:
            try:
                # A frame that declares its size would make zstd allocate that size: refuse first.
                declared = zstandard.frame_content_size(payload)
                if declared not in (-1, raw_length):
                    raise IntegrityError(f"{what} declares {declared} bytes, expected {raw_length}")
                raw = self._decompress(payload, raw_length)
            except zstandard.ZstdError as exc:
                raise IntegrityError(f"{what} does not decompress: {exc}") from None
        else:
            raise IntegrityError(f"{what} has unknown compression {flag}")
        if len(raw) != raw_length:
            raise IntegrityError(f"{what} is {len(raw)} bytes, expected {raw_length}")
        return raw

    def _decompress(self, payload: memoryview, raw_length: int) -> bytes:
        """Decompress one frame, yielding at most `raw_length` + 1 bytes.

        One-shot decompression allocates its output limit up front; above ONE_SHOT_LIMIT a
        stream is read in steps instead, so memory follows the real output, not the length a
        caller expects (which comes from an index entry).
        """
        if raw_length <= ONE_SHOT_LIMIT:
            return self._decompressor().decompress(payload, max_output_size=raw_length)
        out = bytearray()
        with self._decompressor().stream_reader(payload) as reader:
            while len(out) <= raw_length:
                piece = reader.read(min(STREAM_STEP, raw_length + 1 - len(out)))
                if not piece:
                    break
                out += piece
        return bytes(out)

    def check_id(self, type_code: int, blob_id: bytes, raw: bytes) -> None:
        """Raise IntegrityError unless `raw` hashes to `blob_id`."""
        if self.sealer.blob_id(type_code, raw) != blob_id:
            raise IntegrityError(f"blob {blob_id.hex()[:16]} content does not match its ID")
