"""A volume restore never leaves decrypted data lying beside its target.

SIGTERM, SIGHUP and kill -9 during `qbhub volume restore` used to leave `.NAME.qbhub-partial-*`
files. Now SIGTERM and SIGHUP unwind the command (its cleanup removes the file; exit 128+signum,
one line), and the next restore into the directory removes partial files whose process is gone
(their name carries the PID). Real signals, to a real CLI process, with bounded waits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Qbhub
from qbhub_native.restore import remove_stale_partials
from test_hostile_storage import make_qbhub

BLOCKS = 1024  # 64 MiB of random data: a restore takes long enough to be caught part-way
VOLUME = "big"


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Qbhub, Path]:
    top = tmp_path_factory.mktemp("partial")
    image = top / "big.img"
    with open(image, "wb") as f:
        for _ in range(BLOCKS):
            f.write(os.urandom(64 * 1024))
    q = make_qbhub(top / "home")
    archive = top / "archive"
    q.run("init", "--dest", archive, env={"QBHUB_TEST_KDF_LOG2_N": "12"})
    q.run("volume", "backup", "--dest", archive, f"{image}={VOLUME}")
    return q, archive


def partials(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if "qbhub-partial" in p.name]


def start_restore(q: Qbhub, archive: Path, target: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "qubes_backup_hub", "volume", "restore", "--dest", str(archive),
         VOLUME, "--to", str(target)],
        env=q.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def catch_mid_restore(proc: subprocess.Popen[bytes], directory: Path) -> str:
    """Wait (bounded) for the partial file to appear, then stop the process there (SIGSTOP)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = partials(directory)
        if found:
            os.kill(proc.pid, signal.SIGSTOP)
            assert proc.poll() is None, "the restore finished before it could be caught"
            assert partials(directory), "the restore finished before it could be caught"
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"restore ended early: {proc.stderr.read() if proc.stderr else ''!r}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail("no partial file appeared within 60 s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_removes_the_partial_file(
    big: tuple[Qbhub, Path], tmp_path: Path, sig: signal.Signals
) -> None:
    q, archive = big
    out = tmp_path / "out"
    out.mkdir()
    proc = start_restore(q, archive, out / "restored.img")
    name = catch_mid_restore(proc, out)
    assert f"-{proc.pid}-" in name, name
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    lines = stderr.decode().strip().splitlines()
    assert lines == [f"qbhub: terminated by {sig.name}"], stderr
    assert list(out.iterdir()) == [], "decrypted data left behind"


def test_kill_9_leftovers_are_removed_by_the_next_restore(
    big: tuple[Qbhub, Path], tmp_path: Path
) -> None:
    q, archive = big
    out = tmp_path / "out"
    out.mkdir()
    proc = start_restore(q, archive, out / "first.img")
    name = catch_mid_restore(proc, out)
    proc.kill()
    proc.communicate(timeout=60)
    assert partials(out) == [name], "kill -9 can't be cleaned up by the process itself"
    # Partial files of a live process (this one) and things that are not such files stay.
    live = out / f".other.img.qbhub-partial-{os.getpid()}-0123abcd"
    live.write_bytes(b"a restore in progress")
    (out / ".x.qbhub-partial-notapid").write_bytes(b"not ours")
    q.run("volume", "restore", "--dest", archive, VOLUME, "--to", out / "second.img")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [live.name, ".x.qbhub-partial-notapid", "second.img"]
    )


def test_stale_partials_symlinks_are_not_followed(tmp_path: Path) -> None:
    """Only regular files are removed: a symlink named like a stale partial file is kept, and
    so is its target."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    victim = tmp_path / "precious"
    victim.write_bytes(b"keep")
    link = tmp_path / f".v.qbhub-partial-{dead.pid}-00000000"
    link.symlink_to(victim)
    stale = tmp_path / f".w.qbhub-partial-{dead.pid}-11111111"
    stale.write_bytes(b"decrypted")
    assert remove_stale_partials(tmp_path) == [stale.name]
    assert link.is_symlink() and victim.read_bytes() == b"keep"
