"""Loop-mounted btrfs and xfs filesystems for tests (root only; skipped with a reason elsewhere)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

MKFS = {"btrfs": ["mkfs.btrfs", "-q"], "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"]}


def skip_reason(fs: str) -> str | None:
    """Why a loop-mounted `fs` cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to create loop devices and mount filesystems"
    for tool in (MKFS[fs][0], "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no loop device support (/dev/loop-control missing)"
    return None


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@contextmanager
def loop_filesystem(fs: str, size: str = "2G", base: str | None = None) -> Iterator[Path]:
    """Make, mount, yield and always tear down a loop-mounted `fs` (btrfs or xfs)."""
    reason = skip_reason(fs)
    if reason:
        pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix=f"qbhub-{fs}-", dir=base))
    image, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    device = None
    mounted = False
    try:
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        _run(*MKFS[fs], str(image))
        device = _run("losetup", "-f", "--show", str(image))
        _run("mount", device, str(mnt))
        mounted = True
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        if device:
            subprocess.run(["losetup", "-d", device], check=False)
        shutil.rmtree(work, ignore_errors=True)
