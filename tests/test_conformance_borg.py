"""The Borg engine (plugins/borg_qrexec) against qbhub's engine conformance kit, real borg."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qubes_backup_hub.platform.local.sandbox import Sandbox
from qubes_backup_hub.testing.conformance import EngineConformance, EngineUnderTest

qbhub_borg = pytest.importorskip("qbhub_borg.testing", reason="qbhub-borg is not installed")


def _missing() -> str | None:
    if shutil.which("borg") is None:
        return "borg is not installed (apt install borgbackup)"
    if not Sandbox().sandboxed:
        return "bubblewrap is not usable here; the borg engine runs borg only in a sandbox"
    return None


def _no_worker_left(home: Path) -> None:
    """The killed command's worker scratch (Borg's cache) was swept by the next command."""
    assert list((home / "borg-workers").iterdir()) == []


@pytest.mark.slow
class TestBorgConformance(EngineConformance):
    engine = EngineUnderTest(
        name="borg",
        corrupt=qbhub_borg.corrupt_archive,
        skip=_missing(),
        after_kill=_no_worker_left,
    )
