"""Text from untrusted sources (storage, the storage agent, a worker) made safe to print.

Whatever such a source says may end up on the user's terminal in an error line. Control
characters there could clear the screen, move the cursor or forge a success line, so every such
string goes through `shown` first: bounded, decoded leniently, every unprintable character
written as an escape.
"""

from __future__ import annotations


def shown(raw: bytes | str, limit: int = 300) -> str:
    """`raw` as one bounded line of printable characters ("..." marks a cut)."""
    text = raw if isinstance(raw, str) else raw[: limit * 4].decode("utf-8", errors="replace")
    cut = len(text) > limit
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:limit])
    return text + ("..." if cut else "")
