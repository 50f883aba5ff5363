"""extent_map_diff against a block-by-block oracle on random extent maps (no filesystem needed).

The maps imitate what btrfs and xfs report after a reflink clone and scattered rewrites: shared
extents split at different places in the two files, fresh extents, holes punched or filled, and
extents whose flags forbid comparing physical addresses. Then the native engine's read plan built
from such ranges (scan.read_windows: nearby spans read together, gaps read through) is checked to
cover every changed byte and to process nothing else.
"""

from __future__ import annotations

import random

import pytest

from qubes_backup_hub.snapshots.fiemap import EXTENT_ENCODED, EXTENT_LAST, Extent
from qubes_backup_hub.snapshots.ranges import RangeList, extent_map_diff

qbhub_native = pytest.importorskip(
    "qbhub_native", reason="the native engine plugin is not installed"
)
from qbhub_native.scan import read_windows, scan_ranges  # noqa: E402
from qbhub_native.tree import Geometry  # noqa: E402

BLOCK = 4096
Block = tuple[int, bool] | None  # (physical block, comparable) or a hole


def extents_of(blocks: list[Block], rng: random.Random) -> list[Extent]:
    """Runs of physically contiguous blocks as extents, cut at random extra points too."""
    out: list[Extent] = []
    start = 0
    for i in range(1, len(blocks) + 1):
        prev = blocks[i - 1]
        cur = blocks[i] if i < len(blocks) else None
        contiguous = (
            prev is not None
            and cur is not None
            and cur[0] == prev[0] + 1
            and cur[1] == prev[1]
            and rng.random() > 0.05
        )
        if contiguous:
            continue
        if prev is not None:
            first = blocks[start]
            assert first is not None
            flags = 0 if first[1] else EXTENT_ENCODED
            out.append(Extent(start * BLOCK, first[0] * BLOCK, (i - start) * BLOCK, flags))
        start = i
    if out:
        last = out[-1]
        out[-1] = Extent(last.logical, last.physical, last.length, last.flags | EXTENT_LAST)
    return out


def oracle(a: list[Block], b: list[Block]) -> list[tuple[int, int]]:
    ranges = RangeList()
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        same = (x is None and y is None) or (x is not None and x == y and x[1])
        if not same:
            ranges.add(i * BLOCK, BLOCK)
    return ranges.ranges


def random_pair(rng: random.Random, n: int) -> tuple[list[Block], list[Block]]:
    next_physical = 10 * n
    old: list[Block] = []
    phys = 0
    for _ in range(n):
        if rng.random() < 0.1:
            old.append(None)
        else:
            phys += 1 if rng.random() < 0.9 else rng.randrange(2, 50)
            old.append((phys, rng.random() > 0.03))
    new = list(old)
    for _ in range(rng.randrange(0, max(1, n // 10))):
        i = rng.randrange(n)
        run = rng.randrange(1, 8)
        kind = rng.random()
        for k in range(i, min(n, i + run)):
            if kind < 0.6:
                next_physical += 1
                new[k] = (next_physical, True)
            elif kind < 0.8:
                new[k] = None
            else:
                new[k] = old[(k * 7) % n]  # cloned from elsewhere: may equal by accident
    return old, new


@pytest.mark.parametrize("seed", range(200))
def test_diff_matches_block_oracle(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randrange(1, 400)
    old, new = random_pair(rng, n)
    size = n * BLOCK
    got = extent_map_diff(extents_of(old, rng), extents_of(new, rng), size)
    assert got == oracle(old, new)


def test_identical_maps_have_no_changes_and_extents_past_size_are_clipped() -> None:
    blocks: list[Block] = [(5 + i, True) for i in range(64)]
    rng = random.Random(1)
    assert extent_map_diff(extents_of(blocks, rng), extents_of(blocks, rng), 64 * BLOCK) == []
    grown = extents_of(blocks + [(1000, True)] * 3, rng)
    assert extent_map_diff(extents_of(blocks, rng), grown, 64 * BLOCK) == []


def test_identical_uncomparable_extents_are_reported() -> None:
    encoded = [Extent(0, 8 * BLOCK, 4 * BLOCK, EXTENT_ENCODED | EXTENT_LAST)]
    assert extent_map_diff(encoded, encoded, 4 * BLOCK) == [(0, 4 * BLOCK)]


def test_overlapping_extents_are_refused() -> None:
    bad = [Extent(0, 0, 2 * BLOCK, 0), Extent(BLOCK, 9 * BLOCK, BLOCK, EXTENT_LAST)]
    with pytest.raises(ValueError, match="overlapping"):
        extent_map_diff(bad, bad, 2 * BLOCK)


def test_many_extents_of_one_key_split_differently_in_each_map() -> None:
    """One physical run cut into many extents in both maps (btrfs splits long extents), cut at
    different places, with scattered rewrites: only the rewrites are reported."""
    n = 2000
    old: list[Block] = [(50 + i, True) for i in range(n)]
    new = list(old)
    rng = random.Random(3)
    for i in rng.sample(range(n), 150):
        new[i] = (10 * n + i, True)
    got = extent_map_diff(extents_of(old, rng), extents_of(new, rng), n * BLOCK)
    assert got == oracle(old, new)


def _check_plan(spans: list[tuple[int, int]], window: int, gap: int) -> None:
    """Every chunk of every span is processed exactly once, inside a read; nothing else is."""
    wanted = {c for a, b in spans for c in range(a, b)}
    processed: list[int] = []
    for first, count, parts in read_windows(spans, window, gap):
        assert 0 < count <= window
        assert parts[0][0] == first and parts[-1][0] + parts[-1][1] == first + count
        last_end = first
        for part_first, part_count in parts:
            assert part_count > 0 and part_first - last_end <= gap
            last_end = part_first + part_count
            processed.extend(range(part_first, last_end))
    assert processed == sorted(processed), "reads and parts come in volume order"
    assert len(processed) == len(set(processed)) and set(processed) == wanted


@pytest.mark.parametrize("seed", range(100))
def test_read_windows_cover_every_changed_byte_and_nothing_else(seed: int) -> None:
    """From scattered extent-map changes to the engine's reads: no changed byte is skipped."""
    rng = random.Random(seed)
    n = rng.randrange(1, 3000)
    old, new = random_pair(rng, n)
    size = n * BLOCK - rng.randrange(0, BLOCK)  # a ragged last chunk too
    changed = extent_map_diff(extents_of(old, rng), extents_of(new, rng), size)
    chunk = rng.choice([BLOCK, 4 * BLOCK, 16 * BLOCK])
    spans = scan_ranges(Geometry(size, chunk, 64), changed)
    for offset, length in changed:  # every changed byte lies in a scanned chunk
        assert any(a * chunk <= offset and offset + length <= b * chunk for a, b in spans)
    _check_plan(spans, rng.choice([1, 2, 32]), rng.choice([0, 1, 8]))


def test_read_windows_join_nearby_spans_and_split_far_ones() -> None:
    spans = [(0, 1), (3, 4), (13, 14), (40, 75)]
    plan = list(read_windows(spans, window=32, gap=8))
    assert plan == [
        (0, 4, [(0, 1), (3, 1)]),  # the 2 unchanged chunks between are read through
        (13, 1, [(13, 1)]),  # 9 unchanged chunks: a read of its own
        (40, 24, [(40, 24)]),  # cut at a window boundary: reads stay <= 32 chunks
        (64, 11, [(64, 11)]),
    ]
    _check_plan(spans, 32, 8)
