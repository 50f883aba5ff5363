"""Reflink snapshots on real loop-mounted btrfs and xfs: incremental chains, tampering, live writes.

Needs root (loop devices, mounts), mkfs.btrfs and mkfs.xfs; skipped with the reason elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CHUNK, Qbhub, Result, rewrite_blocks, write_image
from loopfs import loop_filesystem

from qubes_backup_hub.platform.local.pools import Pools
from qubes_backup_hub.snapshots.fiemap import fiemap
from qubes_backup_hub.snapshots.reflink import VIEWS_DIR

pytestmark = pytest.mark.root
BLOCKS = 256  # 16 MiB volumes: big enough for real extents, small enough to keep tests fast


@pytest.fixture(scope="module", params=["btrfs", "xfs"])
def fs(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    with loop_filesystem(request.param, "1G") as mnt:
        yield request.param, mnt


class UnencryptedQbhub(Qbhub):
    """The CLI runner, opting in to the unencrypted archives these tests make (fast: no KDF)."""

    def run(self, *args: str | Path, **kwargs: Any) -> Result:
        if "--dest" in args and args[0] != "init":
            args = (*args, "--allow-unencrypted")
        return super().run(*args, **kwargs)


@pytest.fixture
def qbhub(qbhub: Qbhub) -> Qbhub:
    return UnencryptedQbhub(qbhub.home, qbhub.env)


@pytest.fixture
def workdir(fs: tuple[str, Path], request: pytest.FixtureRequest) -> Iterator[Path]:
    d = fs[1] / request.node.name.replace("[", "_").replace("]", "")
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def init(qbhub: Qbhub, archive: Path, *, encrypted: bool = False) -> Path:
    """A new archive; unencrypted unless asked (scrypt on every command would slow tests down)."""
    qbhub.run("init", "--dest", archive, "--encryption", "on" if encrypted else "off")
    return archive


def backup(qbhub: Qbhub, archive: Path, image: Path, *extra: str) -> dict[str, Any]:
    result = qbhub.json("volume", "backup", "--dest", archive, *extra, f"{image}=disk")
    (volume,) = result["volumes"]
    return {"session": result["session"], **volume}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def restore_digest(qbhub: Qbhub, archive: Path, session: str, target: Path) -> str:
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--session", session,
              "--to", target, "--overwrite")  # fmt: skip
    return digest(target)


def kept_views(image: Path) -> list[Path]:
    return sorted((image.parent / VIEWS_DIR).glob("*.img"))


def test_chain_of_incrementals_is_bit_exact(
    fs: tuple[str, Path], workdir: Path, qbhub: Qbhub, tmp_path: Path
) -> None:
    fs_type, _ = fs
    archive = init(qbhub, tmp_path / "archive", encrypted=True)
    image = write_image(workdir / "vol.img", BLOCKS, seed=3, holes=True)
    first = backup(qbhub, archive, image)
    assert first["provider"] == "full-scan"  # nothing kept yet
    assert first["snapshot_note"].startswith("kept view unusable: no view is kept")
    expected = {first["session"]: digest(image)}
    rng = random.Random(7)
    for step in range(6):
        blocks = sorted(set(rng.sample(range(BLOCKS), 3 + step)))
        rewrite_blocks(image, blocks, seed=100 + step)
        result = backup(qbhub, archive, image)
        assert result["provider"] == f"reflink-{fs_type}"
        assert result["bytes_read"] == len(blocks) * CHUNK, "reads exactly the rewritten blocks"
        expected[result["session"]] = digest(image)
        assert len(kept_views(image)) == 1, "one kept view per archive and volume"
    for k, (session, want) in enumerate(expected.items()):
        assert restore_digest(qbhub, archive, session, tmp_path / f"r{k}.img") == want
    assert qbhub.json("diff", "--dest", archive, "disk", image)["identical"]
    rewrite_blocks(image, [5, 6, 200], seed=5)
    report = qbhub.json("diff", "--dest", archive, "disk", image)
    assert report["differing_ranges"] == [[5 * CHUNK, 2 * CHUNK], [200 * CHUNK, CHUNK]]


def test_scattered_small_writes_are_all_found_and_restore_bit_exact(
    fs: tuple[str, Path], workdir: Path, qbhub: Qbhub, tmp_path: Path
) -> None:
    """4 KiB writes a few chunks apart (as a guest filesystem scatters them), some straddling
    two chunks: the engine reads nearby ones together, and still backs up every touched chunk
    and nothing else, bit-exact."""
    fs_type, _ = fs
    archive = init(qbhub, tmp_path / "archive")
    image = write_image(workdir / "vol.img", BLOCKS, seed=21, holes=True)
    backup(qbhub, archive, image)
    rng = random.Random(22)
    touched: set[int] = set()
    with open(image, "r+b") as f:
        pos = 0
        while True:
            pos += rng.randrange(1, 7) * CHUNK + rng.randrange(0, CHUNK // 512) * 512
            if pos + 4096 > BLOCKS * CHUNK:
                break
            f.seek(pos)
            f.write(rng.randbytes(4096))
            touched.update({pos // CHUNK, (pos + 4095) // CHUNK})
        f.flush()
        os.fsync(f.fileno())
    result = backup(qbhub, archive, image)
    assert result["provider"] == f"reflink-{fs_type}"
    assert result["bytes_read"] == len(touched) * CHUNK, "every touched chunk, nothing else"
    assert result["chunks_new"] == len(touched)
    assert restore_digest(qbhub, archive, result["session"], tmp_path / "r.img") == digest(image)
    assert qbhub.json("diff", "--dest", archive, "disk", image)["identical"]


def _tamper(kind: str, image: Path, qbhub: Qbhub, archive: Path, tmp_path: Path) -> None:
    views = image.parent / VIEWS_DIR
    (sidecar,) = views.glob("*.json")
    if kind == "view-missing":
        for view in views.glob("*.img"):
            view.unlink()
    elif kind == "sidecar-missing":
        sidecar.unlink()
    elif kind == "sidecar-damaged":
        data = bytearray(sidecar.read_bytes())
        data[data.index(b'"size": ') + 8] ^= 1  # still JSON, wrong size: the checksum catches it
        sidecar.write_bytes(bytes(data))
    elif kind == "other-archive":
        other = init(qbhub, tmp_path / "other-archive")
        backup(qbhub, other, image)
        (theirs,) = [p for p in views.glob("*.json") if p != sidecar]
        shutil.copy(theirs, sidecar)  # a valid sidecar, but another archive's
    elif kind == "size-changed":
        with open(image, "r+b") as f:
            f.truncate(os.path.getsize(image) + CHUNK)
    elif kind == "base-pruned":
        sessions = qbhub.json("list", "--dest", archive)["sessions"]
        qbhub.run("prune", "--dest", archive, "--session", sessions[-1]["session"])
    elif kind == "view-written":  # the kept view itself modified: false positives, never misses
        (view,) = views.glob("*.img")
        with open(view, "r+b") as f:
            f.seek(9 * CHUNK)
            f.write(os.urandom(CHUNK))
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["view-missing", "sidecar-missing", "sidecar-damaged", "other-archive", "size-changed",
     "base-pruned", "view-written"],
)  # fmt: skip
def test_tampered_view_falls_back_and_stays_exact(
    fs: tuple[str, Path], workdir: Path, qbhub: Qbhub, tmp_path: Path, kind: str
) -> None:
    fs_type, _ = fs
    archive = init(qbhub, tmp_path / "archive")
    image = write_image(workdir / "vol.img", BLOCKS, seed=11)
    backup(qbhub, archive, image)
    if kind == "base-pruned":
        backup(qbhub, archive, image)  # pruning the newest must leave an older one behind
    rewrite_blocks(image, [1, 2, 100], seed=12)
    _tamper(kind, image, qbhub, archive, tmp_path)
    result = backup(qbhub, archive, image)
    if kind == "view-written":
        assert result["provider"] == f"reflink-{fs_type}"
        assert result["bytes_read"] == 4 * CHUNK  # the 3 rewritten blocks and the tampered one
    else:
        assert result["provider"] == "full-scan", result
        assert result["bytes_read"] >= os.path.getsize(image) * 0.6
    assert restore_digest(qbhub, archive, result["session"], tmp_path / "r.img") == digest(image)
    rewrite_blocks(image, [7], seed=13)
    again = backup(qbhub, archive, image)
    assert again["provider"] == f"reflink-{fs_type}", "the next backup is incremental again"
    assert restore_digest(qbhub, archive, again["session"], tmp_path / "r2.img") == digest(image)


class Writer(threading.Thread):
    """Rewrites every block in turn with (generation, index) markers until stopped."""

    def __init__(self, path: Path, blocks: int) -> None:
        super().__init__(daemon=True)
        self.path, self.blocks = path, blocks
        self.generation = 0
        self.stop = threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            while not self.stop.is_set():
                self.generation += 1
                for i in range(self.blocks):
                    os.pwrite(fd, marker(self.generation, i), i * CHUNK)
        finally:
            os.close(fd)


def marker(generation: int, index: int) -> bytes:
    return struct.pack("<QQ", generation, index) * (CHUNK // 16)


def generations(path: Path, blocks: int) -> list[int]:
    """The generation of each block; fails if a block is torn or holds another index."""
    data = path.read_bytes()
    assert len(data) == blocks * CHUNK
    gens = []
    for i in range(blocks):
        g, index = struct.unpack_from("<QQ", data, i * CHUNK)
        assert index == i and data[i * CHUNK : (i + 1) * CHUNK] == marker(g, i), f"block {i} torn"
        gens.append(g)
    return gens


def test_continuous_writer_gives_a_consistent_snapshot(
    fs: tuple[str, Path], workdir: Path, qbhub: Qbhub, tmp_path: Path
) -> None:
    blocks = 512
    archive = init(qbhub, tmp_path / "archive")
    image = workdir / "live.img"
    image.write_bytes(b"".join(marker(0, i) for i in range(blocks)))
    writer = Writer(image, blocks)
    writer.start()
    try:
        for _ in range(3):
            before = writer.generation
            result = backup(qbhub, archive, image)
            assert writer.generation > before, "the writer ran during the backup"
            (view,) = kept_views(image)
            restored = tmp_path / "restored.img"
            assert restore_digest(qbhub, archive, result["session"], restored) == digest(view)
            gens = generations(restored, blocks)
            top = gens[0]
            # One state of a sequential writer: a prefix at generation G, the rest at G - 1.
            assert all(g in (top, top - 1) for g in gens) and gens == sorted(gens, reverse=True)
    finally:
        writer.stop.set()
        writer.join()


def test_backup_json_reports_provider_and_bytes(
    fs: tuple[str, Path], workdir: Path, qbhub: Qbhub, tmp_path: Path
) -> None:
    archive = init(qbhub, tmp_path / "archive")
    image = write_image(workdir / "vol.img", 64, seed=2)
    backup(qbhub, archive, image)
    rewrite_blocks(image, [3], seed=4)
    plain = backup(qbhub, archive, image, "--no-snapshot")
    assert plain["provider"] == "full-scan" and plain["bytes_read"] > 32 * CHUNK
    assert (
        not kept_views(image)
        or json.loads(next((image.parent / VIEWS_DIR).glob("*.json")).read_text())["base_session"]
        != plain["session"]
    )
    text = qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk").stdout
    assert "full-scan" in text and "kept view" not in text  # base was not the newest: full scan
    rewrite_blocks(image, [4], seed=5)
    text = qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk").stdout
    assert f"read 64.0 KiB (reflink-{fs[0]})" in text


def test_wrong_passphrase_keeps_the_old_view_and_drops_the_new(
    fs: tuple[str, Path], workdir: Path, qbhub: Qbhub, tmp_path: Path
) -> None:
    """The key is unlocked on a thread while the clone is taken; its failure aborts the clone."""
    archive = init(qbhub, tmp_path / "archive", encrypted=True)
    image = write_image(workdir / "vol.img", 64, seed=6)
    backup(qbhub, archive, image)
    views = kept_views(image)
    sidecar = next((image.parent / VIEWS_DIR).glob("*.json")).read_bytes()
    rewrite_blocks(image, [5], seed=7)
    result = qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk", check=False,
                       env={"QBHUB_PASSPHRASE": "wrong"})  # fmt: skip
    assert result.returncode == 5 and "Traceback" not in result.stderr, result.stderr
    assert kept_views(image) == views and len(views) == 1
    assert next((image.parent / VIEWS_DIR).glob("*.json")).read_bytes() == sidecar
    again = backup(qbhub, archive, image)
    assert again["provider"] == f"reflink-{fs[0]}" and again["bytes_read"] == CHUNK


def test_local_pool_clone_shares_extents(fs: tuple[str, Path], workdir: Path) -> None:
    """LocalPlatform's clone_volume (used to hold VMs that --replace removes) is a reflink here."""
    pools = Pools(workdir / "pools")
    source = pools.volume_path("default", "work", "private")
    source.parent.mkdir(parents=True)
    write_image(source, 32, seed=9)
    pools.clone_volume("default", "work", "default", "qbk-work", "private")
    clone = pools.volume_path("default", "qbk-work", "private")
    assert digest(clone) == digest(source)
    with open(source, "rb") as a, open(clone, "rb") as b:
        shared = [e.physical for e in fiemap(a.fileno()) if e.comparable]
        assert shared and shared == [e.physical for e in fiemap(b.fileno()) if e.comparable]
