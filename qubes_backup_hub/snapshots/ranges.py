"""Byte-range helpers shared by the providers: merging, and the difference of two extent maps."""

from __future__ import annotations

from collections.abc import Iterable

from .fiemap import UNCOMPARABLE, Extent

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


Segment = tuple[int, int, int | None]  # (start, end, physical - logical or None)


def _segments(extents: Iterable[Extent], size: int) -> list[Segment]:
    """(start, end, key) per extent clipped to [0, size); key = physical - logical, or None."""
    out: list[Segment] = []
    last_end = 0
    for logical, physical, length, flags in extents:
        end = min(logical + length, size)
        if end <= logical:
            continue
        if logical < last_end:
            raise ValueError("overlapping or unordered FIEMAP extents")
        out.append((logical, end, None if flags & UNCOMPARABLE else physical - logical))
        last_end = end
    return out


def extent_map_diff(old: Iterable[Extent], new: Iterable[Extent], size: int) -> list[Range]:
    """Byte ranges of [0, size) whose bytes may differ between two files, from their extent maps.

    A range is unchanged only if it is a hole in both, or both map it to the same physical bytes
    through extents whose flags allow the comparison (not encoded, inline, delayed or unknown).
    Everything else is reported: false positives are possible, misses are not.

    Extents that appear identically in both maps (same span, same physical address, comparable)
    are set aside first, so the pointwise walk only visits what differs: within one map extents
    do not overlap, so a byte under such an extent is under no other extent of either map.
    """
    a, b = _segments(old, size), _segments(new, size)
    shared = {s for s in a if s[2] is not None}.intersection(b)
    if shared:
        a = [s for s in a if s not in shared]
        b = [s for s in b if s not in shared]
    return _pointwise_diff(a, b, size)


def _pointwise_diff(a: list[Segment], b: list[Segment], size: int) -> list[Range]:
    """The ranges where the coverage of two disjoint, ordered segment lists differs."""
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
