"""A VM backup tells the user which volumes it scans whole and why (jobs.backup: the view's note).

The LVM thin and reflink providers give a note whenever they cannot tell what changed (the
first backup, a kept view in doubt, a full pool: tests/test_lvm_vm.py, test_snapshot_reflink.py);
here fakes stand in for the platform, the engine and the providers.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from qubes_backup_hub.engine import VolumeSource
from qubes_backup_hub.jobs.backup import backup_vms
from qubes_backup_hub.platform.base import VMSettings, VolumeInfo
from qubes_backup_hub.snapshot import SnapshotProvider, SnapshotView, VolumeRef


class FakePlatform:
    def vm_settings(self, name: str) -> VMSettings:
        return VMSettings(name=name, klass="AppVM")

    def vm_volumes(self, name: str) -> list[VolumeInfo]:
        return [
            VolumeInfo(vm=name, name=vol, size=1 << 20, pool="vm-pool", path=f"/dev/qd/{vol}")
            for vol in ("private", "root")
        ]


class NotingProvider(SnapshotProvider):
    name = "fake"

    def __init__(self, volume: VolumeRef) -> None:
        self.volume = volume

    def take(self) -> SnapshotView:
        if self.volume.name.endswith(":private"):  # scanned whole, and says why
            return SnapshotView(self.volume.path, None, self.name, note="the pool is full")
        return SnapshotView(self.volume.path, [(0, 4096)], self.name, base_session="s0")


class FakeEngine:
    def archive_id(self, store: object) -> str:
        return "ab" * 8

    def prepare(self, store: object) -> None:
        pass

    def backup(self, store: object, sources: list[VolumeSource], **kw: Any) -> dict[str, Any]:
        return {"session": "s1", "volumes": [{"name": s.name} for s in sources]}


@pytest.mark.parametrize("to_stderr", [True, False])
def test_volumes_scanned_whole_are_announced_with_the_reason(
    to_stderr: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    hook = SimpleNamespace(qbhub_snapshot_provider=lambda volume: NotingProvider(volume))
    lines: list[str] = []
    result = backup_vms(
        FakePlatform(),  # type: ignore[arg-type]
        FakeEngine(),  # type: ignore[arg-type]
        SimpleNamespace(url="fake:///archive"),  # type: ignore[arg-type]  (only logged)
        hook,  # type: ignore[arg-type]
        ["work", "mail"],
        notice=None if to_stderr else lines.append,
    )
    expected = [
        "qbhub: work:private: full scan because the pool is full",
        "qbhub: mail:private: full scan because the pool is full",
    ]
    assert (capsys.readouterr().err.splitlines() if to_stderr else lines) == expected
    notes = {v["name"]: v.get("snapshot_note") for v in result["volumes"]}
    assert notes == {
        "work:private": "the pool is full",
        "work:root": None,
        "mail:private": "the pool is full",
        "mail:root": None,
    }
