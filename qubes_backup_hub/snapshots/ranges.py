"""Byte-range helpers shared by the providers: merging, and the difference of two extent maps."""

from __future__ import annotations

from collections.abc import Iterable

from .fiemap import Extent

Range = tuple[int, int]  # (offset, length) in bytes


class RangeList:
    """Builds a sorted list of disjoint (offset, length) ranges from ranges added in order."""

    def __init__(self) -> None:
        self.ranges: list[Range] = []

    def add(self, offset: int, length: int) -> None:
        """Append [offset, offset+length), merging it with the last range when they touch."""
        if length <= 0:
            return
        if self.ranges:
            last_off, last_len = self.ranges[-1]
            if offset < last_off:
                raise ValueError("ranges must be added in order")
            if offset <= last_off + last_len:
                end = max(last_off + last_len, offset + length)
                self.ranges[-1] = (last_off, end - last_off)
                return
        self.ranges.append((offset, length))


def _segments(extents: Iterable[Extent], size: int) -> list[tuple[int, int, int | None]]:
    """(start, end, key) per extent clipped to [0, size); key = physical - logical, or None."""
    out: list[tuple[int, int, int | None]] = []
    for e in extents:
        start, end = e.logical, min(e.logical + e.length, size)
        if end <= start:
            continue
        if out and start < out[-1][1]:
            raise ValueError("overlapping or unordered FIEMAP extents")
        out.append((start, end, e.physical - e.logical if e.comparable else None))
    return out


def extent_map_diff(old: Iterable[Extent], new: Iterable[Extent], size: int) -> list[Range]:
    """Byte ranges of [0, size) whose bytes may differ between two files, from their extent maps.

    A range is unchanged only if it is a hole in both, or both map it to the same physical bytes
    through extents whose flags allow the comparison (not encoded, inline, delayed or unknown).
    Everything else is reported: false positives are possible, misses are not.
    """
    a, b = _segments(old, size), _segments(new, size)
    changed = RangeList()
    i = j = pos = 0
    while pos < size:
        while i < len(a) and a[i][1] <= pos:
            i += 1
        while j < len(b) and b[j][1] <= pos:
            j += 1
        nxt = size
        a_cov = i < len(a) and a[i][0] <= pos
        b_cov = j < len(b) and b[j][0] <= pos
        if i < len(a):
            nxt = min(nxt, a[i][1] if a_cov else a[i][0])
        if j < len(b):
            nxt = min(nxt, b[j][1] if b_cov else b[j][0])
        if a_cov and b_cov:
            same = a[i][2] is not None and a[i][2] == b[j][2]
        else:
            same = not a_cov and not b_cov
        if not same:
            changed.add(pos, nxt - pos)
        pos = nxt
    return changed.ranges
