"""The progress line: no stale characters, no line wider than the terminal, skipped bytes (holes)
move the bar but not the rate, and VM-level restores show a bar per volume."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Qbhub

from qubes_backup_hub import progress as progress_module
from qubes_backup_hub.progress import Progress, clock

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The progress module's clock, moved by hand (the line depends on elapsed time)."""
    clock_ = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock_)
    return clock_


def drawn(stream: io.StringIO) -> list[str]:
    return [part for part in stream.getvalue().split("\r") if part]


def test_every_redraw_clears_the_rest_of_the_line(fake_time: Clock) -> None:
    out = io.StringIO()
    bar = Progress(out, enabled=True)
    bar.start("work:private", 100 * MiB)
    for _ in range(5):
        fake_time.now += 1
        bar.advance(10 * MiB)
    bar.finish()
    lines = drawn(out)
    assert len(lines) == 7
    assert all(line.rstrip("\n").endswith("\x1b[K") for line in lines)
    assert "100.0%" in lines[-1] and "in 5s" in lines[-1]


def test_holes_move_the_bar_not_the_rate(fake_time: Clock) -> None:
    out = io.StringIO()
    bar = Progress(out, enabled=True)
    bar.start("sparse", 1024 * MiB)
    fake_time.now += 2
    bar.advance(20 * MiB)  # 10 MiB/s of real reading...
    bar.skip(900 * MiB)  # ...and a hole passed over in no time
    line = bar.line(fake_time.now)
    assert "89.8%" in line  # 920 of 1024 MiB
    assert "10.0 MiB/s" in line
    assert "ETA 10s" in line  # 104 MiB left at the reading rate


def test_no_rate_before_a_second_and_line_fits_the_terminal(
    fake_time: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    out = io.StringIO()
    bar = Progress(out, enabled=True)
    bar.start("a-very-long-vm-name:private-volume", 10 * MiB)
    fake_time.now += 0.3
    bar.advance(10 * MiB)
    assert "/s" not in bar.line(fake_time.now)  # 0.3 s is no basis for a rate
    assert all(len(line.replace("\x1b[K", "")) <= 39 for line in drawn(out))


def test_clock() -> None:
    assert [clock(s) for s in (0, 59.9, 61, 3599, 3600 * 2 + 180)] == [
        "0s", "59s", "1m01s", "59m59s", "2h03m",
    ]  # fmt: skip


def test_silent_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = Progress(out)
    bar.start("x", 10)
    bar.advance(10)
    bar.finish()
    assert out.getvalue() == ""


def test_vm_restore_draws_a_bar_per_volume(qbhub: Qbhub, tmp_path: Path) -> None:
    """On a terminal (a pty), a VM-level restore shows each volume's bar."""
    qbhub.run("local", "vm-create", "work", "--class", "StandaloneVM", "--label", "red",
              "--size", "1M")  # fmt: skip
    archive = tmp_path / "archive"
    qbhub.run("init", "--dest", archive)
    qbhub.run("backup", "work", "--dest", archive)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qubes_backup_hub", "restore", "work", "--dest", str(archive),
         "--rename", "work:copy"],
        env=qbhub.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower,
    )  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(leader)
    shown = b"".join(chunks).decode(errors="replace")
    assert "copy:private" in shown and "100.0%" in shown


class Recording(Progress):
    """A Progress that keeps every (done, worked) step instead of drawing."""

    def __init__(self) -> None:
        super().__init__(io.StringIO(), enabled=False)
        self.steps: list[tuple[str, int, int, int]] = []

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        self.steps.append((self.label, self.total, self.done, self.worked))

    def skip(self, nbytes: int) -> None:
        super().skip(nbytes)
        self.steps.append((self.label, self.total, self.done, self.worked))


def test_native_backup_and_restore_of_a_sparse_volume_skip_its_holes(tmp_path: Path) -> None:
    """A volume of data, a 6 MiB hole, data, a hole: the bar passes each hole as it comes (no
    jump from the data's share to 100% at the end), and only data counts toward the rate."""
    from types import SimpleNamespace

    from test_prune import InProcess

    from qubes_backup_hub.engine import VolumeSource
    from qubes_backup_hub.stream.file import FileVolumeStream

    arch = InProcess(tmp_path)
    chunk = 4096  # InProcess's chunk size
    data = os.urandom(256 * chunk)
    volume = data + bytes(1536 * chunk) + data + bytes(512 * chunk)
    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:  # the zeros as holes (SEEK_DATA finds them)
        f.write(data)
        f.seek(1536 * chunk, os.SEEK_CUR)
        f.write(data)
        f.truncate(len(volume))
    recording = Recording()
    arch.context.progress = recording
    arch.context.hook = SimpleNamespace(  # type: ignore[assignment]
        qbhub_open_stream=lambda path: FileVolumeStream(path),
        qbhub_validate_restore=lambda header: None,
    )
    engine = arch.fresh_engine()
    session = str(engine.backup(arch.store, [VolumeSource("disk", str(image))])["session"])
    steps = [s for s in recording.steps if s[0] == "disk"]
    # Up to the last data, every byte was passed (finish() passes the trailing hole).
    assert steps and steps[-1][2] == len(volume) - 512 * chunk
    assert steps[-1][3] == 2 * len(data)  # only the data was worked
    # When the second data part is first counted, the hole before it has been passed already.
    second = next(s for s in steps if s[3] > len(data))
    assert second[2] >= len(data) + 1536 * chunk
    assert [s[2] for s in steps] == sorted(s[2] for s in steps)

    recording.steps.clear()
    restored = tmp_path / "out.img"
    arch.fresh_engine().restore_volume(arch.store, "disk", restored, session=session,
                                       overwrite=True)  # fmt: skip
    assert restored.read_bytes() == volume
    steps = [s for s in recording.steps if s[0] == "disk"]
    assert steps[-1][2] == len(volume) and steps[-1][3] == 2 * len(data)
