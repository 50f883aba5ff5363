"""Incremental metadata grows with the change, not the volume; the changed-ranges seam.

DESIGN §3: per-volume manifests are a hash tree whose unchanged subtrees are shared between
sessions, so a one-chunk incremental stores one chunk and the few tree pages on its path, whatever
the volume's size. A snapshot provider may hand the engine the byte ranges changed since the
previous session; the engine then reads only those, and falls back to a full scan whenever it
cannot trust them against the previous session (none, or a different geometry).
"""

from __future__ import annotations

import ctypes
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import CHUNK, PASSPHRASE, Qbhub, rewrite_blocks
from qbhub_native.engine import NativeEngine

from qubes_backup_hub.engine import EngineContext, VolumeSource
from qubes_backup_hub.passphrase import PassphraseSource
from qubes_backup_hub.progress import Progress
from qubes_backup_hub.registry import load_registry
from qubes_backup_hub.store.base import Store

MiB = 1024 * 1024
GiB = 1024 * MiB
# What a one-chunk incremental may store beyond the chunk: the tree pages on the chunk's path
# (at most 8 KiB each before compression), the session record, pack padding and an index object.
PATH_METADATA = 64 * 1024
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


# -- helpers ------------------------------------------------------------------------------------


def backup(qbhub: Qbhub, archive: Path, path: Path, name: str) -> dict[str, Any]:
    """Back up one volume through the CLI; return its JSON result."""
    return qbhub.json("volume", "backup", "--dest", archive, f"{path}={name}")


def sparse_volume(path: Path, size: int, seed: int) -> Path:
    """`size` bytes apparent with 1 MiB of random data at four places (start, 1/3, 1/2, end)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in (0, size // 3 // CHUNK * CHUNK, size // 2, size - MiB):
            f.seek(offset)
            f.write(rng.randbytes(MiB))
    return path


def counter_volume(path: Path, chunks: int, seed: int) -> Path:
    """`chunks` non-zero chunks, each distinct (a counter and the seed), the rest of each a hole.

    Every chunk has its own ID, so a flat list of chunk IDs would grow with the chunk count.
    """
    with open(path, "wb") as f:
        f.truncate(chunks * CHUNK)
        for i in range(chunks):
            f.seek(i * CHUNK)
            f.write((seed << 32 | i).to_bytes(8, "little") * 8)
    return path


def punch_hole(path: Path, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length) of a file (it then reads as zeros)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def same_sparse_content(a: Path, b: Path) -> bool:
    """True if two (possibly huge, sparse) files are equal: compare where either holds data."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for offset, length in sorted(_extents(fa.fileno()) + _extents(fb.fileno())):
            fa.seek(offset)
            fb.seek(offset)
            if fa.read(length) != fb.read(length):
                return False
    return True


def _extents(fd: int) -> list[tuple[int, int]]:
    size, pos, out = os.fstat(fd).st_size, 0, []
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        pos = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, pos - start))
    return out


def random_volume(
    path: Path, blocks: int, seed: int, *, zero_every: int = 0, tail: bytes = b""
) -> Path:
    """`blocks` random chunks (every `zero_every`-th one written as zeros), then `tail`."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(blocks):
            zero = zero_every and i % zero_every == zero_every - 1
            f.write(bytes(CHUNK) if zero else rng.randbytes(CHUNK))
        f.write(tail)
    return path


def engine_for(tmp_path: Path) -> NativeEngine:
    """A NativeEngine in this process, wired as the CLI wires it (cli/context.py)."""
    registry = load_registry()
    secret = tmp_path / "passphrase"
    secret.write_text(PASSPHRASE)
    context = EngineContext(
        hook=registry.pm.hook,
        passphrase=PassphraseSource(file=secret, env_var=None),
        state_dir=tmp_path / "engine-state",
        progress=Progress(enabled=False),
    )
    return NativeEngine(context)


def open_store(archive: Path) -> Store:
    return load_registry().open_store(str(archive))


def only_volume(result: dict[str, Any]) -> dict[str, Any]:
    assert len(result["volumes"]) == 1, result
    return result["volumes"][0]


# -- metadata proportional to the change ----------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(lambda p, k, s: sparse_volume(p, 8 * GiB * k, s), id="sparse-8GiB-vs-32GiB"),
        pytest.param(lambda p, k, s: counter_volume(p, 2048 * k, s), id="dense-2k-vs-8k-chunks"),
    ],
)
def test_one_chunk_incremental_metadata_does_not_grow_with_the_volume(
    tmp_path: Path, qbhub: Qbhub, archive: Path, shape: Callable[[Path, int, int], Path]
) -> None:
    stored: dict[int, int] = {}
    for factor in (1, 4):
        image = shape(tmp_path / f"x{factor}.img", factor, factor)
        name = f"x{factor}"
        backup(qbhub, archive, image, name)
        rewrite_blocks(image, [5], seed=100 + factor)
        result = backup(qbhub, archive, image, name)
        stats = only_volume(result)
        assert stats["chunks_new"] == 1
        assert result["bytes_stored"] < CHUNK + PATH_METADATA, result
        stored[factor] = result["bytes_stored"]
    # A 4x larger volume (4x the chunks, 4x the leaf pages) adds the same few pages.
    assert stored[4] <= stored[1] + 8 * 1024, stored


def test_sparse_volume_incremental_reads_only_the_data(
    tmp_path: Path, qbhub: Qbhub, archive: Path
) -> None:
    image = sparse_volume(tmp_path / "big.img", 8 * GiB, seed=3)
    backup(qbhub, archive, image, "big")
    rewrite_blocks(image, [5], seed=4)
    stats = only_volume(backup(qbhub, archive, image, "big"))
    assert stats["size"] == 8 * GiB
    assert stats["bytes_read"] <= 4 * MiB + 2 * CHUNK  # the data, never the 8 GiB of holes
    out = tmp_path / "big.out"
    qbhub.run("volume", "restore", "--dest", archive, "big", "--to", out)
    assert same_sparse_content(image, out)


# -- the changed-ranges seam, in process ---------------------------------------------------------


def test_changed_ranges_are_the_only_ranges_read(
    tmp_path: Path, qbhub: Qbhub, archive: Path
) -> None:
    """With trusted changed ranges only those chunks are read; rewrites, zeros and holes land."""
    image = random_volume(tmp_path / "disk.img", 600, seed=7, zero_every=10, tail=b"ragged tail")
    engine, store = engine_for(tmp_path), open_store(archive)
    first = engine.backup(store, [VolumeSource("disk", str(image))])
    assert only_volume(first)["provider"] == "full-scan"

    rewrite_blocks(image, [7, 130, 131], seed=8)
    with open(image, "r+b") as f:
        f.seek(20 * CHUNK)  # chunk 20 becomes written zeros
        f.write(bytes(CHUNK))
        f.seek(600 * CHUNK)  # the short tail chunk (11 bytes) changes
        f.write(b"a new tail!")
    punch_hole(image, 256 * CHUNK, 256 * CHUNK)  # the whole second leaf becomes a hole
    punch_hole(image, 530 * CHUNK, 5 * CHUNK)  # and part of the third leaf
    changed = [
        (7 * CHUNK + 100, 10),
        (130 * CHUNK + 1, CHUNK),
        (600 * CHUNK, 11),
        (20 * CHUNK, CHUNK),
        (256 * CHUNK, 256 * CHUNK),
        (530 * CHUNK, 5 * CHUNK),
    ]
    source = VolumeSource("disk", str(image), changed, "test-cbt", first["session"])
    second = engine.backup(store, [source])

    stats = only_volume(second)
    assert stats["provider"] == "test-cbt"
    assert stats["chunks_new"] == 4
    # Chunks 7, 130, 131 and the 11-byte tail chunk are data; chunk 20 is read and found zero;
    # the 256-chunk hole is skipped unread, while the 5-chunk one is too short to be worth probing
    # for holes (scan.data_chunk_ranges) and is read as zeros.
    assert stats["bytes_read"] == (4 + 5) * CHUNK + 11
    out = tmp_path / "restored.img"
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", out)
    assert out.read_bytes() == image.read_bytes()
    assert qbhub.json("verify", "--dest", archive)["mode"] == "full"


def test_changed_ranges_on_a_tall_sparse_tree(tmp_path: Path, qbhub: Qbhub, archive: Path) -> None:
    """8 GiB apparent (a three-level tree, mostly all-zero subtrees): data written into a former
    hole and over old data is picked up from the ranges alone, and nothing else is read."""
    image = sparse_volume(tmp_path / "big.img", 8 * GiB, seed=17)
    engine, store = engine_for(tmp_path), open_store(archive)
    first = engine.backup(store, [VolumeSource("big", str(image))])
    rng = random.Random(18)
    changed = [(5 * CHUNK, CHUNK), (5 * GiB + 7 * CHUNK, CHUNK)]  # old data; a former hole
    with open(image, "r+b") as f:
        for offset, length in changed:
            f.seek(offset)
            f.write(rng.randbytes(length))

    source = VolumeSource("big", str(image), changed, "cbt", first["session"])
    stats = only_volume(engine.backup(store, [source]))
    assert stats["provider"] == "cbt"
    assert stats["bytes_read"] == 2 * CHUNK
    assert stats["chunks_new"] == 2
    out = tmp_path / "big.out"
    qbhub.run("volume", "restore", "--dest", archive, "big", "--to", out)
    assert same_sparse_content(image, out)


def test_changed_ranges_without_a_previous_copy_fall_back_to_a_full_scan(
    tmp_path: Path, qbhub: Qbhub, archive: Path
) -> None:
    image = random_volume(tmp_path / "new.img", 48, seed=9)
    engine, store = engine_for(tmp_path), open_store(archive)
    source = VolumeSource("new", str(image), [(0, CHUNK)], "test-cbt", "20261126T000000Z")
    result = engine.backup(store, [source])
    stats = only_volume(result)
    assert stats["provider"] == "full-scan"
    assert stats["bytes_read"] == image.stat().st_size
    assert stats["chunks_new"] == 48
    out = tmp_path / "restored.img"
    qbhub.run("volume", "restore", "--dest", archive, "new", "--to", out)
    assert out.read_bytes() == image.read_bytes()


def test_changed_ranges_against_a_different_geometry_fall_back_to_a_full_scan(
    tmp_path: Path, qbhub: Qbhub, archive: Path
) -> None:
    """The previous copy has another size, so ranges relative to it can't be trusted."""
    image = random_volume(tmp_path / "disk.img", 48, seed=10)
    engine, store = engine_for(tmp_path), open_store(archive)
    first = engine.backup(store, [VolumeSource("disk", str(image))])
    rewrite_blocks(image, [3], seed=11)
    with open(image, "ab") as f:
        f.write(random.Random(12).randbytes(CHUNK))  # grown by one chunk
    ranges = [(48 * CHUNK, CHUNK)]  # claims only the new chunk changed (block 3 did too)

    source = VolumeSource("disk", str(image), ranges, "cbt", first["session"])
    stats = only_volume(engine.backup(store, [source]))
    assert stats["provider"] == "full-scan"
    assert stats["bytes_read"] == image.stat().st_size
    assert stats["chunks_new"] == 2
    out = tmp_path / "restored.img"
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", out)
    assert out.read_bytes() == image.read_bytes()


def test_changed_ranges_relative_to_a_pruned_session_are_not_trusted(
    tmp_path: Path, qbhub: Qbhub, archive: Path
) -> None:
    """The provider's ranges are relative to the session it last committed; once that session is
    pruned, the newest copy left is older, and applying the ranges to it would lose changes.

    S1 full; block 3 changes and S2 records it (ranges exact); S2 is pruned; block 9 changes and
    S3 is given the (exact) ranges since S2's view. The restore must still be the image.
    """
    image = random_volume(tmp_path / "disk.img", 24, seed=13)
    engine, store = engine_for(tmp_path), open_store(archive)
    first = engine.backup(store, [VolumeSource("disk", str(image))])
    rewrite_blocks(image, [3], seed=14)
    source = VolumeSource("disk", str(image), [(3 * CHUNK, CHUNK)], "cbt", first["session"])
    second = engine.backup(store, [source])
    assert only_volume(second)["provider"] == "cbt"
    qbhub.run("prune", "--dest", archive, "--session", second["session"])
    rewrite_blocks(image, [9], seed=15)

    source = VolumeSource("disk", str(image), [(9 * CHUNK, CHUNK)], "cbt", second["session"])
    third = engine.backup(store, [source])
    assert only_volume(third)["provider"] == "full-scan"
    out = tmp_path / "restored.img"
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", out)
    assert out.read_bytes() == image.read_bytes(), "changes recorded only by a pruned session lost"
