"""A reader racing a writer never raises the rollback alarm; a real rollback still does.

`qbhub list` run while a backup commits used to report "archive rollback detected": it read the
root (generation g), the backup then committed g+1 and remembered it, and the reader compared its
g with the memory it recalled afterwards. Now the memory is recalled before the root that is
judged is read (the root is read again if the first read looks older than the memory).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Qbhub, rewrite_blocks, write_image
from test_downgrade import make_engine, open_store

from qubes_backup_hub.engine import VolumeSource
from qubes_backup_hub.errors import RollbackError

CHEAP_KDF = {"QBHUB_TEST_KDF_LOG2_N": "14"}  # ~50 ms: many opens, each a real race window
RACE_SECONDS = 4.0


@pytest.fixture
def busy(tmp_path: Path, qbhub: Qbhub) -> tuple[Path, Path]:
    """An archive (cheap KDF) with one session of volume `disk`, and the volume's image."""
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "disk.img", 8, seed=8)
    qbhub.run("init", "--dest", archive, env=CHEAP_KDF)
    qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk")
    return archive, image


def test_commit_between_read_and_recall_is_not_a_rollback(
    tmp_path: Path, qbhub: Qbhub, busy: tuple[Path, Path]
) -> None:
    """Deterministic: the writer commits right after the reader read the root."""
    archive, image = busy
    writer = make_engine(qbhub.home)
    reader = make_engine(qbhub.home)
    store = open_store(archive)
    real_get_root = store.get_root
    reads: list[int] = []

    def get_root_then_commit(max_size: int) -> bytes | None:
        data = real_get_root(max_size)
        reads.append(1)
        if len(reads) == 1:
            rewrite_blocks(image, [2])
            writer.backup(open_store(archive), [VolumeSource("disk", str(image))])
        return data

    store.get_root = get_root_then_commit  # type: ignore[method-assign]
    result = reader.list_sessions(store, session=None)
    assert len(result["sessions"]) == 2, "the reader judged the root it read before the commit"
    assert len(reads) == 2


def test_real_rollback_is_still_detected(
    tmp_path: Path, qbhub: Qbhub, busy: tuple[Path, Path]
) -> None:
    archive, image = busy
    old_root = (archive / "root").read_bytes()
    rewrite_blocks(image, [1])
    qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk")
    (archive / "root").write_bytes(old_root)
    with pytest.raises(RollbackError):
        make_engine(qbhub.home).list_sessions(open_store(archive), session=None)
    result = qbhub.run("list", "--dest", archive, check=False)
    assert result.returncode == 4, result.stderr


def test_readers_racing_backups_never_see_a_rollback(
    tmp_path: Path, qbhub: Qbhub, busy: tuple[Path, Path]
) -> None:
    """Backups commit in a loop (a real CLI process each) while this process lists and
    restores, each time as a new reader sharing the machine's memory; bounded in time."""
    archive, image = busy
    stop = time.monotonic() + RACE_SECONDS
    backups: list[int] = []
    failures: list[str] = []

    def racing() -> bool:
        """Until RACE_SECONDS passed and two backups committed (at most 60 s more)."""
        now = time.monotonic()
        return (now < stop or len(backups) < 2) and now < stop + 60 and not failures

    def write_loop() -> None:
        while racing():
            proc = subprocess.run(
                [sys.executable, "-m", "qubes_backup_hub", "volume", "backup", "--dest",
                 str(archive), f"{image}=disk"],
                env=qbhub.env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if proc.returncode != 0:
                failures.append(f"backup: {proc.stderr.strip()}")
                return
            backups.append(1)

    writer = threading.Thread(target=write_loop)
    writer.start()
    reads = 0
    try:
        while racing():
            engine = make_engine(qbhub.home)
            try:
                engine.list_sessions(open_store(archive), session=None)
                out = tmp_path / f"restored-{reads}.img"
                engine.restore_volume(open_store(archive), "disk", out, session=None,
                                      overwrite=False)  # fmt: skip
                out.unlink()
            except RollbackError as exc:
                failures.append(f"reader: {exc}")
            reads += 1
    finally:
        writer.join(timeout=180)
    assert not failures, failures[:3]
    assert len(backups) >= 2 and reads >= 4, (len(backups), reads)
    cli = subprocess.run(
        [sys.executable, "-m", "qubes_backup_hub", "list", "--dest", str(archive)],
        env=qbhub.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
