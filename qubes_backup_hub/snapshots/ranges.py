"""Byte-range helpers shared by the providers: merging, and the difference of two extent maps."""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Iterable
from operator import itemgetter

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

    Two comparable extents map a byte to the same physical byte exactly when they overlap and
    have the same key (physical - logical). So the old extents are grouped by key, each new
    extent is intersected only with the old extents of its own key (found by bisection), and the
    result is what either map covers minus those intersections. Each pass is linear in the
    number of extents, with no per-boundary walk: a file fragmented by years of copy-on-write
    writes has hundreds of thousands of them.
    """
    a, b = _segments(old, size), _segments(new, size)
    return _subtract(_union(a, b), _same_spans(a, b))


def _same_spans(a: list[Segment], b: list[Segment]) -> list[tuple[int, int]]:
    """Sorted, disjoint spans that `a` and `b` map to the same physical bytes (comparably)."""
    by_key: dict[int, tuple[list[int], list[int]]] = {}
    for start, end, key in a:
        if key is not None:
            starts, ends = by_key.setdefault(key, ([], []))
            starts.append(start)
            ends.append(end)
    out: list[tuple[int, int]] = []
    for start, end, key in b:
        if key is None or key not in by_key:
            continue
        starts, ends = by_key[key]
        i = bisect_right(ends, start)  # the first old extent of this key ending after `start`
        while i < len(starts) and starts[i] < end:
            lo, hi = max(start, starts[i]), min(end, ends[i])
            if lo < hi:
                out.append((lo, hi))
            i += 1
    return out


def _union(a: list[Segment], b: list[Segment]) -> list[tuple[int, int]]:
    """Sorted, disjoint, maximal spans covered by `a` or `b` (each sorted and disjoint)."""
    out: list[tuple[int, int]] = []
    for start, end, _ in heapq.merge(a, b, key=itemgetter(0)):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _subtract(spans: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[Range]:
    """(offset, length) of what `spans` cover outside `minus` (both sorted and disjoint)."""
    out: list[Range] = []
    j = 0
    for start, end in spans:
        pos = start
        while j < len(minus) and minus[j][1] <= pos:
            j += 1
        k = j
        while k < len(minus) and minus[k][0] < end:
            lo, hi = minus[k]
            if lo > pos:
                out.append((pos, lo - pos))
            pos = max(pos, hi)
            k += 1
        if pos < end:
            out.append((pos, end - pos))
    return out
