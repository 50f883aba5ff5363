#!/usr/bin/env python3
"""qbhub storage agent: serves one archive directory to dom0 over stdin/stdout (qrexec service).

Runs in the backup VM as the `qbhub.Storage` service. It needs nothing but Python: copy this one
file into the backup VM (or its template) if qbhub is not installed there. It never trusts its
caller either: it serves exactly one directory, BASE/ARCHIVE, where BASE is fixed by the VM
($QBHUB_STORAGE_BASE, default ~/qbhub-archives) and ARCHIVE is the service argument, a single
name; every object name is checked, every size capped, and symlinks are never followed.

The directory layout is the one qbhub's local directory store uses (root, objects/XY/NAME), so
an archive written through the agent can be read from a USB disk directly, and the other way.

Protocol (all integers big-endian): each request is `u8 op || u32 length || payload`, each reply
`u8 status || u32 length || payload` (status 0: ok, 1: error with a UTF-8 message). Payloads:
  PUT     name \\n data        -> ""            GET   name \\n max        -> data
  RANGE   name \\n off \\n len  -> data          LIST  ""                -> "name size\\n"...
  DELETE  name               -> ""            ROOT_GET max            -> data (empty: no root)
  ROOT_PUT data              -> ""            CREATE ""               -> ""
  LOCK    ""                 -> ""            EXISTS ""               -> "1" or "0"
  CLEAN   ""                 -> count         (remove partial uploads; only while locked)
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import struct
import sys
from pathlib import Path
from typing import BinaryIO

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
ARCHIVE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_OBJECT = 80 * 1024 * 1024
MAX_ROOT = 16 * 1024 * 1024
MAX_REQUEST = MAX_OBJECT + 4096
HEADER = struct.Struct(">BI")
OPS = {
    1: "put",
    2: "get",
    3: "range",
    4: "list",
    5: "delete",
    6: "root_get",
    7: "root_put",
    8: "create",
    9: "lock",
    10: "exists",
    11: "clean",
}
TMP = ".tmp-"


class AgentError(Exception):
    """A refused or failed request; its message goes back to the caller."""


def read_exact(stream: BinaryIO, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        block = stream.read(n - len(data))
        if not block:
            return None if not data else bytes(data)
        data += block
    return bytes(data)


class Archive:
    """One archive directory, with the local directory store's layout."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_fd: int | None = None

    def object_path(self, name: str) -> Path:
        if not NAME.fullmatch(name):
            raise AgentError(f"refused object name {name!r}")
        return self.path / "objects" / name[-2:] / name

    def write(self, directory: Path, name: str, data: bytes) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{TMP}{name}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, directory / name)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def read(self, path: Path, offset: int, length: int) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise AgentError(f"object {path.name} is missing") from None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def handle(self, op: str, payload: bytes) -> bytes:
        fields = payload.split(b"\n", 2) if op in ("put", "range", "get") else [payload]
        if op == "put":
            name, data = fields[0].decode(), payload[len(fields[0]) + 1 :]
            target = self.object_path(name)
            if target.exists():
                raise AgentError(f"object {name} already exists; objects are immutable")
            self.write(target.parent, name, data)
            return b""
        if op == "get":
            name, limit = fields[0].decode(), int(fields[1])
            path = self.object_path(name)
            size = path.lstat().st_size if path.exists() else -1
            if size < 0:
                raise AgentError(f"object {name} is missing")
            if size > min(limit, MAX_OBJECT):
                raise AgentError(f"object {name} is {size} bytes, more than the {limit} allowed")
            return self.read(path, 0, size)
        if op == "range":
            name, offset, length = fields[0].decode(), int(fields[1]), int(fields[2])
            if not 0 <= length <= MAX_OBJECT or offset < 0:
                raise AgentError("refused range")
            data = self.read(self.object_path(name), offset, length)
            if len(data) != length:
                raise AgentError(f"object {name} is truncated")
            return data
        if op == "list":
            lines = []
            objects = self.path / "objects"
            for fan in sorted(objects.iterdir()) if objects.is_dir() else []:
                for entry in os.scandir(fan):
                    if not entry.name.startswith(TMP) and entry.is_file(follow_symlinks=False):
                        lines.append(f"{entry.name} {entry.stat(follow_symlinks=False).st_size}\n")
            return "".join(lines).encode()
        if op == "delete":
            self.object_path(payload.decode()).unlink(missing_ok=True)
            return b""
        if op == "root_get":
            root = self.path / "root"
            if not root.exists():
                return b""
            if root.lstat().st_size > min(int(payload), MAX_ROOT):
                raise AgentError("the root is larger than allowed")
            return self.read(root, 0, MAX_ROOT)
        if op == "root_put":
            if len(payload) > MAX_ROOT:
                raise AgentError("the root is larger than allowed")
            for fan in (self.path / "objects").iterdir():
                fd = os.open(fan, os.O_RDONLY | os.O_DIRECTORY)
                os.fsync(fd)
                os.close(fd)
            self.write(self.path, "root", payload)
            return b""
        if op == "create":
            if (self.path / "root").exists():
                raise AgentError("the directory already holds an archive")
            (self.path / "objects").mkdir(parents=True, exist_ok=True)
            return b""
        if op == "exists":
            return b"1" if (self.path / "root").is_file() else b"0"
        if op == "lock":
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise AgentError("the archive is in use by another qbhub process") from None
                raise
            self.lock_fd = fd
            return b""
        if op == "clean":
            if self.lock_fd is None:
                raise AgentError("clean needs the lock")
            count = 0
            for tmp in [*self.path.glob(f"{TMP}*"), *self.path.glob(f"objects/*/{TMP}*")]:
                tmp.unlink(missing_ok=True)
                count += 1
            return str(count).encode()
        raise AgentError(f"unknown operation {op}")


def serve(archive: Archive, requests: BinaryIO, replies: BinaryIO) -> None:
    """Answer requests until the caller closes the stream."""
    while True:
        head = read_exact(requests, HEADER.size)
        if head is None:
            return
        if len(head) != HEADER.size:
            raise AgentError("truncated request")
        op_code, length = HEADER.unpack(head)
        if length > MAX_REQUEST or op_code not in OPS:
            raise AgentError("refused request")
        payload = read_exact(requests, length) or b""
        if len(payload) != length:
            raise AgentError("truncated request")
        try:
            status, body = 0, archive.handle(OPS[op_code], payload)
        except (AgentError, OSError, ValueError, UnicodeDecodeError) as exc:
            status, body = 1, str(exc).encode()[:4096]
        replies.write(HEADER.pack(status, len(body)) + body)
        replies.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not ARCHIVE.fullmatch(argv[0]):
        print("usage: storage ARCHIVE_NAME (a single name, no slashes)", file=sys.stderr)
        return 2
    base = Path(os.environ.get("QBHUB_STORAGE_BASE") or Path.home() / "qbhub-archives")
    try:
        serve(Archive(base / argv[0]), sys.stdin.buffer, sys.stdout.buffer)
    except AgentError as exc:
        print(f"qbhub storage agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
