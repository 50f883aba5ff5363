"""Deterministic benchmark workload: a disk image of 64 KiB blocks.

The image holds, shuffled, 40% random blocks, 30% all-zero blocks and 30% text-like blocks
(English-like words and numbers that zstd -3 compresses about 2.6x per block). Everything derives
from one integer seed, so two runs with the same seed and size write identical bytes; every random
and every text block is distinct, so deduplication cannot shrink the workload.

The same logical blocks can be laid out densely (block i at offset i * 64 KiB) or spread in
clusters across a large sparse file (``Layout.sparse``), with holes in between. ``mutate`` then
rewrites 1% of the blocks, chosen at random from the seed, with new random data.

Run ``python bench/workload.py build OUT --size 2GiB`` to write an image by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

BLOCK = 64 * 1024
ZERO_BLOCK = bytes(BLOCK)
CLUSTER_BLOCKS = 256  # a sparse layout keeps 16 MiB of consecutive blocks together

RANDOM, ZERO, TEXT = "random", "zero", "text"
SHARES = ((RANDOM, 0.4), (ZERO, 0.3))  # TEXT takes the rest

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no "
    "will more can out said what up its about than into them only some could time these two "
    "may first then do any like my now over such our man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three backup volume block disk "
    "qube snapshot archive data server kernel error value index offset length session manifest "
    "chunk restore"
)
_VOCAB = tuple(_WORDS.split())
_TOKENS = 65536  # text is drawn from a table of 2**16 word pairs, indexed by random 16-bit values


def parse_size(text: str) -> int:
    """Parse a size such as ``2GiB``, ``256MiB``, ``64M`` or ``1048576`` into bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = text.strip().lower().removesuffix("ib").removesuffix("b")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


@dataclass(frozen=True)
class Layout:
    """Where logical block i of the workload lives in the image file."""

    nblocks: int
    file_size: int
    stride_blocks: int  # distance between cluster starts, in blocks; CLUSTER_BLOCKS when dense

    @classmethod
    def dense(cls, nblocks: int) -> Layout:
        """Block i at offset i * BLOCK; the file is exactly nblocks blocks long."""
        return cls(nblocks, nblocks * BLOCK, CLUSTER_BLOCKS)

    @classmethod
    def sparse(cls, nblocks: int, volume_size: int) -> Layout:
        """Clusters of CLUSTER_BLOCKS blocks spread evenly over the volume, holes between."""
        clusters = -(-nblocks // CLUSTER_BLOCKS)
        stride = (volume_size // BLOCK) // clusters
        if stride < CLUSTER_BLOCKS:
            raise ValueError(f"a {volume_size}-byte volume cannot hold {nblocks} blocks sparsely")
        return cls(nblocks, volume_size, stride)

    def offset(self, index: int) -> int:
        """Byte offset of logical block ``index`` in the file."""
        cluster, within = divmod(index, CLUSTER_BLOCKS)
        return (cluster * self.stride_blocks + within) * BLOCK


def block_kinds(seed: int, nblocks: int) -> list[str]:
    """The shuffled kind of every block: 40% random, 30% zero, the rest text."""
    kinds: list[str] = []
    for kind, share in SHARES:
        kinds += [kind] * round(nblocks * share)
    kinds += [TEXT] * (nblocks - len(kinds))
    random.Random(f"qbhub-bench:{seed}:kinds").shuffle(kinds)
    return kinds


def _token_table(rng: random.Random) -> list[bytes]:
    """2**16 short phrases: word pairs, words with numbers, sentence ends and commas."""
    table = []
    for _ in range(_TOKENS):
        roll, word, other = rng.random(), rng.choice(_VOCAB), rng.choice(_VOCAB)
        if roll < 0.12:
            phrase = f"{word} {rng.randrange(100000)}"
        elif roll < 0.20:
            phrase = f"{word}.\n{other.capitalize()}"
        elif roll < 0.25:
            phrase = f"{word}, {other}"
        else:
            phrase = f"{word} {other}"
        table.append(phrase.encode())
    return table


def _text_block(rng: random.Random, table: list[bytes]) -> bytes:
    """One 64 KiB text-like block: phrases picked by random 16-bit indices."""
    parts: list[bytes] = []
    length = 0
    while length <= BLOCK:
        picks = memoryview(rng.randbytes(BLOCK // 5 & ~1)).cast("H")
        chunk = b" ".join([table[i] for i in picks])
        parts.append(chunk)
        length += len(chunk) + 1
    return b" ".join(parts)[:BLOCK]


def iter_blocks(seed: int, nblocks: int) -> Iterator[tuple[int, str, bytes]]:
    """Yield (index, kind, data) for every block of the workload, in index order."""
    rand_rng = random.Random(f"qbhub-bench:{seed}:random")
    text_rng = random.Random(f"qbhub-bench:{seed}:text")
    table = _token_table(random.Random(f"qbhub-bench:{seed}:vocab"))
    for index, kind in enumerate(block_kinds(seed, nblocks)):
        if kind == RANDOM:
            yield index, kind, rand_rng.randbytes(BLOCK)
        elif kind == TEXT:
            yield index, kind, _text_block(text_rng, table)
        else:
            yield index, kind, ZERO_BLOCK


def write_image(path: str, seed: int, layout: Layout, sparse_zeros: bool = False) -> None:
    """Write the workload to a new file at ``path`` and fsync it.

    Zero blocks are written as real zeros unless ``sparse_zeros``, which leaves them as holes.
    """
    with open(path, "wb") as f:
        f.truncate(layout.file_size)
        for index, kind, data in iter_blocks(seed, layout.nblocks):
            if kind == ZERO and sparse_zeros:
                continue
            f.seek(layout.offset(index))
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def mutated_blocks(seed: int, nblocks: int) -> list[int]:
    """The sorted indices of the 1% of blocks that ``mutate`` rewrites."""
    rng = random.Random(f"qbhub-bench:{seed}:mutate")
    return sorted(rng.sample(range(nblocks), max(1, nblocks // 100)))


def mutate(path: str, seed: int, layout: Layout) -> int:
    """Rewrite 1% of the blocks in place with new random data, fsync; return bytes rewritten."""
    rng = random.Random(f"qbhub-bench:{seed}:mutate-data")
    indices = mutated_blocks(seed, layout.nblocks)
    fd = os.open(path, os.O_WRONLY)
    try:
        for index in indices:
            os.pwrite(fd, rng.randbytes(BLOCK), layout.offset(index))
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(indices) * BLOCK


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield (start, end) of the data regions of a file, skipping holes (SEEK_DATA/SEEK_HOLE)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def content_digest(path: str) -> str:
    """SHA-256 of a file's logical content, independent of how its zeros are stored.

    Hashes the file size and, for every non-zero 64 KiB-aligned block, its offset and bytes. Holes
    are skipped without reading them, so a 64 GiB sparse file hashes as fast as its data.
    """
    h = hashlib.sha256()
    size = os.stat(path).st_size
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb", buffering=0) as f:
        for start, end in _data_ranges(f.fileno(), size):
            pos = start - start % BLOCK
            f.seek(pos)
            while pos < end:
                block = f.read(BLOCK)
                if not block:
                    break
                if block != ZERO_BLOCK[: len(block)]:
                    h.update(pos.to_bytes(8, "little"))
                    h.update(block)
                pos += len(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Command line: build (and optionally mutate) an image by hand."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "mutate", "digest"])
    parser.add_argument("path")
    parser.add_argument("--size", default="2GiB", help="data size (default 2GiB)")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--sparse-volume", default=None, help="spread the data over this size")
    parser.add_argument("--sparse-zeros", action="store_true", help="leave zero blocks as holes")
    args = parser.parse_args(argv)
    nblocks = parse_size(args.size) // BLOCK
    layout = (
        Layout.sparse(nblocks, parse_size(args.sparse_volume))
        if args.sparse_volume
        else Layout.dense(nblocks)
    )
    started = time.perf_counter()
    if args.action == "build":
        write_image(args.path, args.seed, layout, args.sparse_zeros)
    elif args.action == "mutate":
        mutate(args.path, args.seed, layout)
    else:
        print(content_digest(args.path))
    print(f"{args.action}: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
