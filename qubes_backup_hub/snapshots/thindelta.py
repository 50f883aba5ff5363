"""A streaming parser for `thin_delta` output: the byte ranges that differ between two thin devices.

`thin_delta --snap1 A --snap2 B META` (thin-provisioning-tools 0.9) prints, in data-block units::

    <superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="1000">
      <diff left="1" right="2">
        <same begin="0" length="10"/>
        <different begin="10" length="1"/>
        <left_only begin="90" length="5"/>
        <right_only begin="100" length="5"/>
      </diff>
    </superblock>

`different`, `left_only` (now unmapped: reads as zeros) and `right_only` ranges changed. The
output of a 1 TiB pool can hold millions of elements, so it is parsed as a stream: one compiled
regular expression over fixed-size reads, no document tree, no per-block loop, memory bounded by
the result. Anything unexpected (unknown element, text between elements, ranges out of order, a
truncated document) raises ThinDeltaError: a caller must then scan the whole volume.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import IO

from ..errors import QbhubError
from .ranges import Range, RangeList

SECTOR = 512
READ_SIZE = 1 << 20
MAX_CARRY = 4096  # the longest element we accept; a longer partial one is an error

_TOKEN = re.compile(
    rb"\s*<(?:(same|different|left_only|right_only) begin=\"(\d{1,19})\" length=\"(\d{1,19})\"\s*/"
    rb"|(superblock|diff)((?:\s+[a-z_]+=\"[^\"<>]{0,64}\")*)\s*"
    rb"|/(superblock|diff))>"
)
_ATTR = re.compile(rb"([a-z_]+)=\"([^\"]*)\"")


class ThinDeltaError(QbhubError):
    """thin_delta output that cannot be trusted (malformed, truncated or inconsistent)."""

    exit_code = 3


@dataclass
class ThinDelta:
    """The parsed result: block size, the two device IDs, and the changed byte ranges."""

    data_block_size: int = 0  # sectors
    left: int = -1
    right: int = -1
    changed: list[Range] = field(default_factory=list)
    blocks_compared: int = 0


class _Parser:
    """The state machine behind `parse_thin_delta`."""

    def __init__(self) -> None:
        self.result = ThinDelta()
        self.ranges = RangeList()
        self.stage = 0  # 0 before <superblock>, 1 in it, 2 in <diff>, 3 after </diff>, 4 done
        self.next_block = 0
        self.block_bytes = 0

    def feed(self, buf: bytes) -> int:
        """Consume whole elements from `buf`; return how many bytes were consumed."""
        pos = 0
        ranges_add = self.ranges.add
        for m in _TOKEN.finditer(buf):
            if m.start() != pos:
                raise ThinDeltaError(f"thin_delta output: unexpected text {buf[pos : pos + 40]!r}")
            pos = m.end()
            kind = m.group(1)
            if kind is not None:
                if self.stage != 2:
                    raise ThinDeltaError("thin_delta output: a range outside <diff>")
                begin, length = int(m.group(2)), int(m.group(3))
                if begin < self.next_block or length <= 0:
                    raise ThinDeltaError(f"thin_delta output: range at block {begin} out of order")
                self.next_block = begin + length
                self.result.blocks_compared += length
                if kind != b"same":
                    ranges_add(begin * self.block_bytes, length * self.block_bytes)
            else:
                self._structure(m)
        return pos

    def _structure(self, m: re.Match[bytes]) -> None:
        opening, closing = m.group(4), m.group(6)
        attrs = {k.decode(): v.decode() for k, v in _ATTR.findall(m.group(5) or b"")}
        try:
            if opening == b"superblock" and self.stage == 0:
                self.result.data_block_size = int(attrs["data_block_size"])
                if not 0 < self.result.data_block_size <= 1 << 22:
                    raise ValueError("impossible data_block_size")
                self.block_bytes = self.result.data_block_size * SECTOR
                self.stage = 1
            elif opening == b"diff" and self.stage == 1:
                self.result.left, self.result.right = int(attrs["left"]), int(attrs["right"])
                self.stage = 2
            elif closing == b"diff" and self.stage == 2:
                self.stage = 3
            elif closing == b"superblock" and self.stage == 3:
                self.stage = 4
            else:
                raise ValueError(f"element {m.group(0).strip()[:40]!r} in the wrong place")
        except (KeyError, ValueError) as exc:
            raise ThinDeltaError(f"thin_delta output: {exc}") from None

    def finish(self, rest: bytes) -> ThinDelta:
        if rest.strip() or self.stage != 4:
            raise ThinDeltaError("thin_delta output is truncated or has trailing text")
        self.result.changed = self.ranges.ranges
        return self.result


def parse_thin_delta(stream: IO[bytes], read_size: int = READ_SIZE) -> ThinDelta:
    """Parse thin_delta's (non-verbose) output from a binary stream, incrementally."""
    parser = _Parser()
    carry = b""
    while True:
        block = stream.read(read_size)
        if not block:
            return parser.finish(carry)
        buf = carry + block if carry else block
        used = parser.feed(buf)
        carry = buf[used:]
        if len(carry) > MAX_CARRY:
            raise ThinDeltaError(f"thin_delta output: unexpected text {carry[:40]!r}")
