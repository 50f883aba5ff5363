"""JSON from untrusted sources, with its size and nesting bounded before it is decoded.

Python's decoder recurses once per nested array or object, so a header of a few kilobytes of
`[[[[...` raises RecursionError (or worse, deep inside a C stack). `loads_bounded` decodes the
bytes as strict UTF-8 (json.loads would also take UTF-16 and UTF-32, whose bytes a scanner of
UTF-8 misreads: a `"` byte inside a UTF-16 character hid 50,000 brackets from it), scans the text
once (strings and escapes skipped) and refuses nesting deeper than `max_depth` before decoding.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32
MAX_BYTES = 1 << 20

OPENERS = frozenset("[{")
CLOSERS = frozenset("]}")
QUOTE, BACKSLASH = '"', "\\"


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text`, counted outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == BACKSLASH:
                escaped = True
            elif char == QUOTE:
                in_string = False
        elif char == QUOTE:
            in_string = True
        elif char in OPENERS:
            depth += 1
            deepest = max(deepest, depth)
        elif char in CLOSERS:
            depth -= 1
    return deepest


def loads_bounded(data: bytes, *, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> Any:
    """`json.loads` of `data` as UTF-8, refused with ValueError when it is not UTF-8 or is
    larger or deeper than the bounds (UnicodeDecodeError is a ValueError)."""
    if len(data) > max_bytes:
        raise ValueError(f"{len(data)} bytes of JSON (limit {max_bytes})")
    text = data.decode("utf-8")
    if nesting_depth(text) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return json.loads(text)
