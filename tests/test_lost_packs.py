"""Backups never build on what storage lost or damaged.

Storage may drop or cut a pack the index lists, or hand back an orphan pack (left by an
interrupted backup) with a damaged blob behind a valid trailer. A backup must not deduplicate
against either: it re-stores what is gone, adopts only blobs that authenticate, and the session
it commits restores bit-exact.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import Qbhub, rewrite_blocks, write_image

BLOCKS = 160  # ~10 MiB, 30% zeros: two or three 4 MiB packs
FIRST_BLOB_BYTE = 64  # inside the first sealed blob of a pack


def packs(archive: Path) -> dict[str, Path]:
    return {p.name: p for p in (archive / "objects").glob("*/p*") if p.is_file()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def backup(qbhub: Qbhub, archive: Path, image: Path) -> dict[str, Any]:
    result: dict[str, Any] = qbhub.json("volume", "backup", "--dest", archive, f"{image}=disk")
    return result


def restore_digest(qbhub: Qbhub, archive: Path, target: Path, session: str) -> str:
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", target, "--session", session)
    digest = sha256(target)
    target.unlink()
    return digest


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("loss", ["deleted", "truncated", "extended-by-a-byte"])
@pytest.mark.parametrize("changed", [False, True], ids=["same-image", "changed-image"])
def test_backup_restores_chunks_whose_pack_is_lost(
    tmp_path: Path, qbhub: Qbhub, loss: str, changed: bool
) -> None:
    """A pack of session 1 is lost or resized; session 2 stores its chunks again, restores whole."""
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "disk.img", BLOCKS, seed=5)
    qbhub.run("init", "--dest", archive)
    backup(qbhub, archive, image)
    victim = max(packs(archive).values(), key=lambda p: p.stat().st_size)
    if loss == "deleted":
        victim.unlink()
    elif loss == "truncated":
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
    else:
        with open(victim, "ab") as f:
            f.write(b"\0")
    if changed:
        rewrite_blocks(image, [3, 70, 150])
    result = backup(qbhub, archive, image)
    stats = result["volumes"][0]
    assert stats["chunks_new"] >= 10, result  # the lost pack's chunks were stored again
    if "chunks_restored" in result:  # the engine reports it (see writer.BlobWriter)
        assert result["chunks_restored"] >= 10, result
    digest = restore_digest(qbhub, archive, tmp_path / "out.img", result["session"])
    assert digest == sha256(image)
    # A third backup of the same image now dedups fully again.
    again = backup(qbhub, archive, image)
    assert again["volumes"][0]["chunks_new"] == 0, again
    assert restore_digest(qbhub, archive, tmp_path / "out.img", again["session"]) == digest


def test_lost_pack_is_stored_again_even_when_changes_are_known(
    tmp_path: Path, qbhub: Qbhub
) -> None:
    """A backup that would only read changed ranges falls back to a full scan after a loss."""
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "disk.img", BLOCKS, seed=6)
    qbhub.run("init", "--dest", archive)
    backup(qbhub, archive, image)
    for pack in packs(archive).values():
        pack.unlink()
    result = backup(qbhub, archive, image)
    assert restore_digest(qbhub, archive, tmp_path / "o.img", result["session"]) == sha256(image)


def test_orphan_pack_with_a_damaged_blob_is_not_reused_blindly(
    tmp_path: Path, qbhub: Qbhub
) -> None:
    """An interrupted backup's pack has one flipped byte in a blob: that blob is stored again.

    The interruption is made exact: session 2 is committed, then the root and this machine's
    memory of it are put back as they were before it (what a crash just before the root write
    leaves), so session 2's packs become orphans that the next backup adopts.
    """
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "disk.img", BLOCKS, seed=7)
    qbhub.run("init", "--dest", archive)
    backup(qbhub, archive, image)
    before = set(packs(archive))
    root_before = (archive / "root").read_bytes()
    home_before = tmp_path / "home-before"
    shutil.copytree(qbhub.home, home_before)

    rewrite_blocks(image, list(range(0, BLOCKS, 4)))  # new random chunks: the orphans' content
    backup(qbhub, archive, image)
    (archive / "root").write_bytes(root_before)
    shutil.rmtree(qbhub.home)
    shutil.copytree(home_before, qbhub.home)
    orphans = sorted(set(packs(archive)) - before)
    assert orphans
    flip(packs(archive)[orphans[0]], FIRST_BLOB_BYTE)

    result = backup(qbhub, archive, image)
    # The damaged pack no longer hashes to its name: its good blobs are copied, not adopted.
    assert result["packs_reused"] == len(orphans) - 1, result
    assert result["volumes"][0]["chunks_new"] >= 1, result  # the damaged chunk, stored again
    assert result["volumes"][0]["chunks_new"] < BLOCKS // 4, result  # the rest was adopted
    digest = restore_digest(qbhub, archive, tmp_path / "out.img", result["session"])
    assert digest == sha256(image)
    verify = qbhub.json("verify", "--dest", archive, check=False)
    assert not verify.get("damaged"), verify  # the damaged orphan is not part of the archive
