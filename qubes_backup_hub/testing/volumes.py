"""Volume images with the shapes an engine must round-trip bit-exact."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20


def zero_volume(path: Path, size: int, seed: int = 0) -> None:
    """All zeros, and a hole throughout."""
    with open(path, "wb") as f:
        f.truncate(size)


def sparse_volume(path: Path, size: int, seed: int = 0) -> None:
    """Mostly holes, with random data at scattered, unaligned places (and at the very end)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(8):
            offset = rng.randrange(0, size - 4096)
            f.seek(offset)
            f.write(rng.randbytes(rng.randrange(1, 4096)))
        f.seek(size - 17)
        f.write(rng.randbytes(17))


def random_volume(path: Path, size: int, seed: int = 0) -> None:
    """Incompressible random bytes, an odd size."""
    rng = random.Random(seed)
    path.write_bytes(rng.randbytes(size - 3))


def text_volume(path: Path, size: int, seed: int = 0) -> None:
    """Compressible, repetitive text-like bytes (dedup and compression friendly)."""
    rng = random.Random(seed)
    words = [rng.randbytes(6).hex().encode() for _ in range(200)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
    path.write_bytes(bytes(out[:size]))


KINDS: dict[str, Callable[[Path, int, int], None]] = {
    "zero": zero_volume,
    "sparse": sparse_volume,
    "random": random_volume,
    "text": text_volume,
}


def change_some(path: Path, seed: int, count: int = 4) -> None:
    """Overwrite `count` small random ranges in place (a typical incremental's change)."""
    rng = random.Random(seed)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for _ in range(count):
            f.seek(rng.randrange(0, max(size - 8192, 1)))
            f.write(rng.randbytes(8192))
