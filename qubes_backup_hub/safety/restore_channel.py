"""The channel between dom0 and a restore worker (a DispVM): frames over stdin/stdout.

Every frame is `u8 kind || u32 BE length || payload`. dom0 sends JOB first (a JSON job), then
answers each store request with REPLY. The worker sends QUERY frames (read-only store requests:
the worker never touches storage itself), then the restore stream proper: one HEADER (strict
JSON, at most 1 MiB), DATA frames carrying exactly the declared bytes of each volume in order,
and END; or FAIL with a one-line reason. dom0 caps every frame before reading it.
"""

from __future__ import annotations

import struct
from typing import IO

from ..errors import IntegrityError

FRAME = struct.Struct(">BI")
JOB, REPLY, QUERY, HEADER, DATA, END, FAIL = b"J", b"R", b"Q", b"H", b"D", b"Z", b"X"
MAX_HEADER = 1 << 20
MAX_DATA_FRAME = 1 << 20
MAX_QUERY = 4096
MAX_REPLY = 80 << 20
MAX_FAIL = 4096


def send(stream: IO[bytes], kind: bytes, payload: bytes | memoryview = b"") -> None:
    stream.write(FRAME.pack(kind[0], len(payload)))
    stream.write(payload)


def receive(stream: IO[bytes], limits: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Read one frame whose kind is a key of `limits` and whose length is within its limit."""
    head = _read_exact(stream, FRAME.size)
    if head is None:
        raise IntegrityError("the restore worker ended without finishing its stream")
    if len(head) != FRAME.size:
        raise IntegrityError("the restore worker's stream ends inside a frame header")
    kind, length = bytes((head[0],)), FRAME.unpack(head)[1]
    if kind not in limits:
        raise IntegrityError(f"the restore worker sent an unexpected frame {kind!r}")
    if length > limits[kind]:
        raise IntegrityError(
            f"the restore worker sent a {length}-byte frame (limit {limits[kind]})"
        )
    payload = _read_exact(stream, length) if length else b""
    if payload is None or len(payload) != length:
        raise IntegrityError("the restore worker's stream is truncated")
    return kind, payload


def _read_exact(stream: IO[bytes], n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        block = stream.read(n - len(data))
        if not block:
            return None if not data else bytes(data)
        data += block
    return bytes(data)
