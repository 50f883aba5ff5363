"""A hostile restore worker (a compromised DispVM) can't make dom0 import anything it shouldn't.

Runs the real LocalPlatform with its bubblewrap DispVM, but with `qbhub.RestoreWorker` mapped to
tests/hostile_worker.py, and drives dom0's restore (`hub_restore.restore_vms`) against it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from qubes_backup_hub.errors import QbhubError
from qubes_backup_hub.jobs.restore import RestoreRequest, restore_vms
from qubes_backup_hub.platform.base import VMSettings
from qubes_backup_hub.platform.local.platform import LocalPlatform
from qubes_backup_hub.registry import load_registry
from qubes_backup_hub.safety.rollback import LocalState
from qubes_backup_hub.store.local import LocalDirStore

TESTS = Path(__file__).resolve().parent


def snapshot_of(root: Path) -> dict[str, str]:
    """Every file under the platform's directory with a hash of its content."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "logs" not in p.parts and not p.name.endswith(".lock")
    }


@pytest.fixture
def platform(tmp_path: Path) -> LocalPlatform:
    platform = LocalPlatform(tmp_path / "home")
    platform.services.register("qbhub.RestoreWorker", "hostile_worker", [TESTS])
    platform.create_vm(
        VMSettings("fedora", "TemplateVM", properties={"label": "black"}), size=1 << 20
    )
    return platform


def run(platform: LocalPlatform, tmp_path: Path, scenario: str) -> None:
    restore_vms(
        platform,
        LocalDirStore(tmp_path / "no-archive-needed"),
        load_registry().pm.hook,
        LocalState(tmp_path / "state"),
        b"passphrase",
        RestoreRequest(vms=[scenario]),
    )


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ("badname", "invalid VM name"),
        ("dom0", "invalid VM name"),
        ("unknownprop", "unknown property"),
        ("nonascii", "property 'label'"),
        ("hugesettings", "frame"),
        ("toolong", "more bytes than"),
        ("short", "shorter than"),
        ("trailing", "more bytes than"),
    ],
)
def test_hostile_stream_is_refused_and_nothing_changes(
    platform: LocalPlatform, tmp_path: Path, scenario: str, message: str
) -> None:
    before = snapshot_of(platform.root)
    with pytest.raises(QbhubError, match=message):
        run(platform, tmp_path, scenario)
    assert snapshot_of(platform.root) == before
    assert [vm.name for vm in platform.list_vms()] == ["dom0", "fedora"]


def test_an_honest_stream_from_the_same_worker_is_imported(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    """The control case: the refusals above are about the lies, not about the harness."""
    run(platform, tmp_path, "good")
    assert "victim" in [vm.name for vm in platform.list_vms()]
    (volume,) = platform.vm_volumes("victim")
    assert Path(volume.path).read_bytes() == b"\x5a" * (1 << 20)
