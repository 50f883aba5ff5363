"""`qbhub mount`: real ext4 and xfs volumes, backed up twice, browsed through the FUSE view.

Each session's image read through the view is compared with the image as it was backed up;
the newest is loop-mounted read-only and a file inside is compared; a one-volume mount that
reads one block fetches only a few chunks; writing is refused; a damaged chunk reads as an
I/O error, never as wrong bytes. Needs root, /dev/fuse, libfuse 3 (mfusepy) and loop devices:
elsewhere the module is skipped with the reason.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import Qbhub
from loopfs import skip_reason


def fuse_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount FUSE and loop filesystems"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"mfusepy or libfuse 3 is missing ({exc})"
    for tool in ("mkfs.ext4", "mkfs.xfs", "mountpoint"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return skip_reason("xfs")


REASON = fuse_skip_reason()
# CI sets QBHUB_FUSE_REQUIRED=1: there a machine without FUSE fails instead of skipping.
if REASON is not None and os.environ.get("QBHUB_FUSE_REQUIRED") == "1":
    pytest.fail(f"QBHUB_FUSE_REQUIRED=1 but FUSE can't run here: {REASON}", pytrace=False)
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))


def run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


@contextmanager
def loop_mounted(image: Path, where: Path) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    run("mount", "-o", "ro,loop", image, where)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@contextmanager
def qbhub_mount(qbhub: Qbhub, *args: str | Path) -> Iterator[tuple[Path, list[str]]]:
    """`qbhub mount ARGS` in the background until the block ends; yields (mountpoint, stderr
    lines printed once it is unmounted)."""
    mountpoint = Path(args[-1])
    mountpoint.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "qubes_backup_hub", "mount", *map(str, args)],
                            env=qbhub.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    said: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(["mountpoint", "-q", str(mountpoint)]).returncode != 0:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the view never appeared"
            time.sleep(0.2)
        yield mountpoint, said
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
        try:
            _out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        said.extend(err.splitlines())
        assert proc.returncode == 0, err


def ext4_image(path: Path, content: Path) -> Path:
    """A 64 MiB ext4 image holding `content` (mkfs.ext4 -d: no mount needed)."""
    subprocess.run(["truncate", "-s", "64M", str(path)], check=True)
    run("mkfs.ext4", "-q", "-F", "-d", content, path)
    return path


def xfs_image(path: Path, content: Path, work: Path) -> Path:
    """A 300 MiB xfs image holding `content` (made, loop-mounted, filled, unmounted)."""
    subprocess.run(["truncate", "-s", "300M", str(path)], check=True)
    run("mkfs.xfs", "-q", "-f", path)
    target = work / "fill"
    target.mkdir(exist_ok=True)
    run("mount", "-o", "loop", path, target)
    try:
        run("cp", "-a", f"{content}/.", target)
    finally:
        run("umount", target)
    return path


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_mount_sessions_and_files(qbhub: Qbhub, tmp_path: Path, fs: str) -> None:
    content = tmp_path / "content"
    (content / "etc").mkdir(parents=True)
    (content / "etc" / "hostname").write_text("work\n")
    (content / "big.bin").write_bytes(os.urandom(3 << 20))
    make = (lambda p: ext4_image(p, content)) if fs == "ext4" else (
        lambda p: xfs_image(p, content, tmp_path))  # fmt: skip
    image = make(tmp_path / "disk.img")
    archive = tmp_path / "archive"
    qbhub.run("init", "--dest", archive)
    first = qbhub.json("volume", "backup", "--dest", archive, f"{image}=work:private")["session"]
    old_image = tmp_path / "old.img"
    shutil.copyfile(image, old_image)
    (content / "etc" / "hostname").write_text("work, changed\n")
    image.unlink()
    image = make(tmp_path / "disk.img")
    second = qbhub.json("volume", "backup", "--dest", archive, f"{image}=work:private")["session"]

    with qbhub_mount(qbhub, "--dest", archive, tmp_path / "all") as (view, said):
        assert sorted(os.listdir(view)) == sorted([first, second])
        assert os.listdir(view / second) == ["work:private"]
        for session, expected in ((first, old_image), (second, image)):
            shown = view / session / "work:private"
            assert shown.stat().st_size == expected.stat().st_size
            assert run_cmp(shown, expected)
        with pytest.raises(OSError) as refused, open(view / second / "work:private", "r+b"):
            pass
        assert refused.value.errno in (errno.EROFS, errno.EACCES)
        with loop_mounted(view / second / "work:private", tmp_path / "inside") as inside:
            assert (inside / "etc" / "hostname").read_text() == "work, changed\n"
            assert (inside / "big.bin").read_bytes() == (content / "big.bin").read_bytes()
        with loop_mounted(view / first / "work:private", tmp_path / "older") as older:
            assert (older / "etc" / "hostname").read_text() == "work\n"
    assert any("unmounted;" in line for line in said)

    # One volume, one block read: only the chunks under it are fetched.
    data = image.read_bytes()
    chunk = 1 << 16
    at = next(o for o in range(1 << 20, len(data), chunk) if data[o : o + chunk].count(0) < chunk)
    with qbhub_mount(qbhub, "--dest", archive, "work:private", tmp_path / "one") as (view, said):
        assert os.listdir(view) == ["work:private"]
        with open(view / "work:private", "rb") as f:
            f.seek(at)
            assert f.read(4096) == data[at : at + 4096]
    summary = next(line for line in said if "unmounted;" in line)
    fetched = int(summary.split("read, ")[1].split(" chunks")[0])
    assert 1 <= fetched <= 4, summary  # of the 1,000+ chunks the volume has


def run_cmp(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", str(a), str(b)], capture_output=True).returncode == 0


def test_damaged_chunk_reads_as_io_error(qbhub: Qbhub, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    archive = tmp_path / "archive"
    qbhub.run("init", "--dest", archive)
    qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk")
    packs = sorted((archive / "objects").glob("*/p*"), key=lambda p: p.stat().st_size)
    with open(packs[-1], "r+b") as f:  # the largest pack holds the data chunks
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with qbhub_mount(qbhub, "--dest", archive, "disk", tmp_path / "view") as (view, _said):
        with pytest.raises(OSError) as failed, open(view / "disk", "rb") as f:
            f.read()
        assert failed.value.errno == errno.EIO


def test_mount_refuses_what_it_cannot_show(qbhub: Qbhub, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    qbhub.run("init", "--dest", archive)
    (tmp_path / "view").mkdir()
    empty = qbhub.run("mount", "--dest", archive, tmp_path / "view", check=False)
    assert empty.returncode == 7 and "no sessions" in empty.stderr
    missing = qbhub.run("mount", "--dest", archive, tmp_path / "nowhere", check=False)
    assert missing.returncode == 7 and "is not a directory" in missing.stderr
    dom0 = qbhub.run("mount", "--dest", archive, tmp_path / "view", check=False,
                     env={"QBHUB_PLATFORM": "qubes"})  # fmt: skip
    assert dom0.returncode == 2 and "dom0 never mounts" in dom0.stderr
