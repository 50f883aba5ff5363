"""Prune through the real CLI: sessions go, their space comes back, the rest stays whole.

DESIGN §3: "Prune removes sessions and reclaims space by repacking"; an interrupted backup leaves
at most unreferenced objects, which prune removes. After a prune the archive verifies, every
remaining session restores bit-exact, and later backups still dedup against surviving chunks.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path
from typing import Any

from conftest import CHUNK, Qbhub

from qubes_backup_hub.store.local import TMP_PREFIX

MiB = 1024 * 1024
BLOCKS = 128  # 8 MiB volumes: big enough for several 4 MiB packs per session
REPACK_BELOW = 0.75  # prune repacks a pack when less than this fraction of it is live
OBJECT_NAME = re.compile(r"[pi][0-9a-f]{64}")


# -- helpers ------------------------------------------------------------------------------------


def random_image(path: Path, seed: int, blocks: int = BLOCKS) -> Path:
    """`blocks` chunks of random (incompressible) data."""
    path.write_bytes(random.Random(seed).randbytes(blocks * CHUNK))
    return path


def churn(path: Path, fraction: float, seed: int) -> None:
    """Rewrite a random `fraction` of the image's chunks with fresh random data."""
    rng = random.Random(seed)
    blocks = path.stat().st_size // CHUNK
    with open(path, "r+b") as f:
        for i in rng.sample(range(blocks), int(blocks * fraction)):
            f.seek(i * CHUNK)
            f.write(rng.randbytes(CHUNK))


def backup(qbhub: Qbhub, archive: Path, image: Path, name: str = "disk") -> dict[str, Any]:
    return qbhub.json("volume", "backup", "--dest", archive, f"{image}={name}")


def sessions_with_churn(
    qbhub: Qbhub, archive: Path, image: Path, count: int
) -> list[tuple[str, bytes]]:
    """`count` sessions of `image`, rewriting half its chunks before each but the first."""
    versions = []
    for k in range(count):
        if k:
            churn(image, 0.5, seed=1000 + k)
        versions.append((backup(qbhub, archive, image)["session"], image.read_bytes()))
    return versions


def restored(qbhub: Qbhub, archive: Path, tmp_path: Path, session: str | None = None) -> bytes:
    """The bytes of volume "disk" restored from `session` (default: newest)."""
    target = tmp_path / f"restored-{session or 'newest'}-{time.monotonic_ns()}.img"
    extra = ["--session", session] if session else []
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", target, *extra)
    return target.read_bytes()


def session_ids(qbhub: Qbhub, archive: Path) -> list[str]:
    return [s["session"] for s in qbhub.json("list", "--dest", archive)["sessions"]]


def archive_bytes(archive: Path) -> int:
    """Bytes of every file under the archive directory (what the archive costs on disk)."""
    return sum(p.stat().st_size for p in archive.rglob("*") if p.is_file())


def object_files(archive: Path) -> list[Path]:
    return [p for p in (archive / "objects").glob("*/*") if p.is_file()]


def pack_count(archive: Path) -> int:
    return sum(1 for p in object_files(archive) if p.name.startswith("p"))


def verify_full(qbhub: Qbhub, archive: Path) -> dict[str, Any]:
    result = qbhub.json("verify", "--dest", archive)
    assert result["mode"] == "full"
    return result


def one_line_error(stderr: str) -> None:
    """Assert stderr is exactly one `qbhub: error: ...` line (no traceback)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbhub: error:"), stderr


def plant_object(archive: Path, name: str, data: bytes) -> Path:
    """Put a file where the local store keeps object `name` (DIR/objects/XY/NAME)."""
    path = archive / "objects" / name[-2:] / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


# -- tests --------------------------------------------------------------------------------------


def test_keep_last_reclaims_space_and_the_survivor_restores(
    tmp_path: Path, qbhub: Qbhub, archive: Path
) -> None:
    image = random_image(tmp_path / "disk.img", seed=1)
    versions = sessions_with_churn(qbhub, archive, image, 4)
    before = archive_bytes(archive)

    result = qbhub.json("prune", "--dest", archive, "--keep-last", "1")
    after = archive_bytes(archive)
    assert result["sessions_removed"] == [s for s, _ in versions[:-1]]
    assert session_ids(qbhub, archive) == [versions[-1][0]]
    # Four sessions held ~8 + 3 x 4 MiB; one 8 MiB session survives.
    assert after < 0.55 * before, (before, after)

    # Compare with an archive that only ever held the surviving version: prune must come within
    # the repack threshold of it.
    fresh = tmp_path / "fresh"
    qbhub.run("init", "--dest", fresh)
    backup(qbhub, fresh, image)
    assert after <= archive_bytes(fresh) / REPACK_BELOW + 64 * 1024, (after, archive_bytes(fresh))

    checked = verify_full(qbhub, archive)
    assert checked["sessions"] == 1 and checked["unreferenced_objects"] == 0
    assert restored(qbhub, archive, tmp_path) == versions[-1][1]
    gone = qbhub.run(
        "volume",
        "restore",
        "--dest",
        archive,
        "disk",
        "--to",
        tmp_path / "gone.img",
        "--session",
        versions[0][0],
        check=False,
    )
    assert gone.returncode == 7
    one_line_error(gone.stderr)

    # A new incremental after the prune dedups against the chunks that survived it.
    with open(image, "r+b") as f:
        for i in (3, 90):
            f.seek(i * CHUNK)
            f.write(random.Random(i).randbytes(CHUNK))
    next_session = backup(qbhub, archive, image)
    assert next_session["volumes"][0]["chunks_new"] == 2
    assert next_session["bytes_stored"] < 2 * CHUNK + 32 * 1024
    assert restored(qbhub, archive, tmp_path) == image.read_bytes()
    verify_full(qbhub, archive)


def test_prune_of_a_middle_session_keeps_the_others_whole(
    tmp_path: Path, qbhub: Qbhub, archive: Path
) -> None:
    image = random_image(tmp_path / "disk.img", seed=2)
    versions = sessions_with_churn(qbhub, archive, image, 3)
    (first, v1), (middle, _), (last, v3) = versions
    before = archive_bytes(archive)

    result = qbhub.json("prune", "--dest", archive, "--session", middle)
    assert result["sessions_removed"] == [middle]
    assert session_ids(qbhub, archive) == [first, last]
    # Chunks only the middle session held (written by it, overwritten by the last) are gone.
    assert archive_bytes(archive) < before - MiB
    verify_full(qbhub, archive)
    assert restored(qbhub, archive, tmp_path, first) == v1
    assert restored(qbhub, archive, tmp_path, last) == v3


def test_prune_of_an_unknown_session_fails_with_exit_7(
    qbhub: Qbhub, archive: Path, tmp_path: Path
) -> None:
    image = random_image(tmp_path / "disk.img", seed=3, blocks=8)
    session = backup(qbhub, archive, image)["session"]
    root = (archive / "root").read_bytes()

    result = qbhub.run("prune", "--dest", archive, "--session", "20000101T000000Z", check=False)
    assert result.returncode == 7
    one_line_error(result.stderr)
    assert "20000101T000000Z" in result.stderr
    assert (archive / "root").read_bytes() == root
    assert session_ids(qbhub, archive) == [session]


def test_prune_with_both_session_and_keep_last_is_a_usage_error(
    qbhub: Qbhub, archive: Path, tmp_path: Path
) -> None:
    image = random_image(tmp_path / "disk.img", seed=4, blocks=8)
    session = backup(qbhub, archive, image)["session"]
    result = qbhub.run(
        "prune", "--dest", archive, "--session", session, "--keep-last", "0", check=False
    )
    assert result.returncode == 2
    one_line_error(result.stderr)
    assert session_ids(qbhub, archive) == [session]


def test_prune_that_changes_no_pack_succeeds(tmp_path: Path, qbhub: Qbhub, archive: Path) -> None:
    """Pruning with nothing to repack (or nothing to drop at all) works, and so does a rerun.

    Here the consolidated index holds exactly what an existing index object holds, so it has the
    same content-derived name: prune must not trip over an identical object already stored.
    """
    image = random_image(tmp_path / "disk.img", seed=8, blocks=8)
    first = backup(qbhub, archive, image)["session"]
    random_image(image, seed=9, blocks=8)  # every chunk new: the first session's pack dies whole
    last = backup(qbhub, archive, image)["session"]

    result = qbhub.json("prune", "--dest", archive, "--session", first)
    assert result["sessions_removed"] == [first]
    again = qbhub.json("prune", "--dest", archive, "--keep-last", "1")
    assert again["sessions_removed"] == []
    assert session_ids(qbhub, archive) == [last]
    assert verify_full(qbhub, archive)["unreferenced_objects"] == 0
    assert restored(qbhub, archive, tmp_path) == image.read_bytes()


def two_sessions_with_churn(qbhub: Qbhub, archive: Path, image: Path) -> tuple[str, str]:
    """Two sessions, half the chunks rewritten in between: dropping the first forces a repack."""
    (first, _), (last, _) = sessions_with_churn(qbhub, archive, image, 2)
    return first, last


def test_prune_removes_objects_left_by_an_interrupted_backup(
    tmp_path: Path, qbhub: Qbhub, archive: Path
) -> None:
    image = random_image(tmp_path / "disk.img", seed=5, blocks=16)
    first, last = two_sessions_with_churn(qbhub, archive, image)
    committed = {p.name for p in object_files(archive)}

    # A backup that uploads two 4 MiB packs for its first volume, then dies on the second.
    other = random_image(tmp_path / "other.img", seed=6, blocks=160)
    failed = qbhub.run(
        "volume",
        "backup",
        "--dest",
        archive,
        f"{other}=other",
        f"{tmp_path / 'missing.img'}=missing",
        check=False,
    )
    assert failed.returncode == 7
    orphans = [p for p in object_files(archive) if p.name not in committed]
    assert len(orphans) >= 2, "the failed run left no packs behind"
    # And a stray object that looks like a pack but isn't one of ours.
    orphans.append(plant_object(archive, "p" + os.urandom(32).hex(), os.urandom(8192)))
    assert qbhub.json("verify", "--dest", archive, "--quick")["unreferenced_objects"] >= 3
    before = archive_bytes(archive)

    result = qbhub.json("prune", "--dest", archive, "--session", first)
    assert result["sessions_removed"] == [first]
    assert [p.name for p in orphans if p.exists()] == []
    assert archive_bytes(archive) < before - 8 * MiB
    checked = verify_full(qbhub, archive)
    assert checked["unreferenced_objects"] == 0
    assert checked["packs"] == pack_count(archive)
    assert session_ids(qbhub, archive) == [last]
    assert restored(qbhub, archive, tmp_path) == image.read_bytes()


def test_prune_removes_partial_uploads_of_a_killed_backup(
    tmp_path: Path, qbhub: Qbhub, archive: Path
) -> None:
    """A backup SIGKILLed while writing an object leaves the store's temporary file behind.

    The local store writes DIR/objects/XY/<TMP_PREFIX>NAME.RANDOM and renames it into place; a
    kill between the two leaves the temporary file, often a whole 4 MiB pack. No writer can own
    it any more (prune holds the archive lock, and this one is a day old), so prune must remove
    it with the rest of the garbage, or every crash leaks space for good.
    """
    image = random_image(tmp_path / "disk.img", seed=7, blocks=16)
    first, last = two_sessions_with_churn(qbhub, archive, image)
    name = "p" + os.urandom(32).hex()
    partial = archive / "objects" / name[-2:] / f"{TMP_PREFIX}{name}.{os.urandom(4).hex()}"
    partial.parent.mkdir(exist_ok=True)
    partial.write_bytes(os.urandom(2 * MiB))
    day_ago = time.time() - 86400
    os.utime(partial, (day_ago, day_ago))

    qbhub.json("prune", "--dest", archive, "--session", first)
    leftovers = [p.name for p in object_files(archive) if not OBJECT_NAME.fullmatch(p.name)]
    assert leftovers == [], "prune left partial uploads of a killed backup in the archive"
    assert session_ids(qbhub, archive) == [last]
    assert restored(qbhub, archive, tmp_path) == image.read_bytes()
