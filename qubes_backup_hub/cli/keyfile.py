"""The text form of an exported archive key: printable, and checked line by line when typed back.

    qbhub key export 1
    archive 0874c955b25cbde6a46521ff1ee95dfb
    01 eyJhcmNoaXZlX2lkIjoiMDg3NGM5NTViMjVjYmRlNmE0NjUyMWZm 5c1e
    02 ...

Each data line is its number, 48 characters of base64 and 4 hex digits of SHA-256 over
"number:characters": a line typed wrong from paper is named by its number. Blank lines and
lines starting with # are ignored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from ..errors import UsageError

MAGIC = "qbhub key export 1"
WIDTH = 48
LINE = re.compile(r"([0-9]{2,4}) ([A-Za-z0-9+/=]{1,48}) ([0-9a-f]{4})")
MAX_EXPORT = 1 << 16


def line_check(number: int, chars: str) -> str:
    return hashlib.sha256(f"{number}:{chars}".encode()).hexdigest()[:4]


def encode(archive_id: str, header: bytes) -> str:
    data = base64.b64encode(header).decode()
    lines = [MAGIC, f"archive {archive_id}"]
    for n, start in enumerate(range(0, len(data), WIDTH), 1):
        chars = data[start : start + WIDTH]
        lines.append(f"{n:02d} {chars} {line_check(n, chars)}")
    return "\n".join(lines) + "\n"


def decode(text: str) -> tuple[str, bytes]:
    """(archive ID, header bytes) of an export; a UsageError names the first bad line."""
    if len(text) > MAX_EXPORT:
        raise UsageError("this is too long to be a qbhub key export")
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(lines) < 3 or lines[0] != MAGIC or not lines[1].startswith("archive "):
        raise UsageError(f"not a qbhub key export (it must start with {MAGIC!r})")
    archive_id = lines[1].removeprefix("archive ").strip()
    chars = []
    for expected, line in enumerate(lines[2:], 1):
        match = LINE.fullmatch(line)
        if match is None or int(match.group(1)) != expected:
            raise UsageError(f"key export line {expected:02d} is malformed: {line[:60]!r}")
        if line_check(expected, match.group(2)) != match.group(3):
            raise UsageError(f"key export line {expected:02d} has a typo (its check fails)")
        chars.append(match.group(2))
    try:
        return archive_id, base64.b64decode("".join(chars), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("the key export's data is not valid base64") from None
