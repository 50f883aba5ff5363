"""extent_map_diff against a block-by-block oracle on random extent maps (no filesystem needed).

The maps imitate what btrfs and xfs report after a reflink clone and scattered rewrites: shared
extents split at different places in the two files, fresh extents, holes punched or filled, and
extents whose flags forbid comparing physical addresses.
"""

from __future__ import annotations

import random

import pytest

from qubes_backup_hub.snapshots.fiemap import EXTENT_ENCODED, EXTENT_LAST, Extent
from qubes_backup_hub.snapshots.ranges import RangeList, extent_map_diff

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
