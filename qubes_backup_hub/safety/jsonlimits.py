"""JSON from untrusted sources, with its size and nesting bounded before it is decoded.

Python's decoder recurses once per nested array or object, so a header of a few kilobytes of
`[[[[...` raises RecursionError (or worse, deep inside a C stack). `loads_bounded` scans the bytes
once (strings and escapes skipped) and refuses nesting deeper than `max_depth` before decoding.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32
MAX_BYTES = 1 << 20

OPENERS = frozenset(b"[{")
CLOSERS = frozenset(b"]}")
QUOTE, BACKSLASH = ord('"'), ord("\\")


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in `data`, counted outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == BACKSLASH:
                escaped = True
            elif byte == QUOTE:
                in_string = False
        elif byte == QUOTE:
            in_string = True
        elif byte in OPENERS:
            depth += 1
            deepest = max(deepest, depth)
        elif byte in CLOSERS:
            depth -= 1
    return deepest


def loads_bounded(data: bytes, *, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> Any:
    """`json.loads(data)`, refused with ValueError when larger or deeper than the bounds."""
    if len(data) > max_bytes:
        raise ValueError(f"{len(data)} bytes of JSON (limit {max_bytes})")
    if nesting_depth(data) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return json.loads(data)
