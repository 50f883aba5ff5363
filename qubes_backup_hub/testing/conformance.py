"""The engine conformance kit: what every qbhub engine must do, as a pytest test class.

An engine distribution subclasses `EngineConformance` in one of its test modules and says how
to reach its engine and how to damage its storage:

    from qubes_backup_hub.testing.conformance import EngineConformance, EngineUnderTest

    class TestMyEngine(EngineConformance):
        engine = EngineUnderTest(name="mine", corrupt=my_corruption_helper)

pytest then runs every `test_*` below against it, through the real command line (`python -m
qubes_backup_hub`, a fresh `$QBHUB_HOME` per test), so it checks the engine as users meet it:
round trips bit-exact for zero, sparse, random and text-like volumes; several sessions and the
restore of an older one; prune; verify; a backup killed while it writes leaving earlier
sessions whole and the archive usable; damage in storage (made by the engine's own `corrupt`
helper) never going unnoticed; and VMs (on the LocalPlatform) restored with their settings
under another name and onto an empty platform. `EngineUnderTest.skip` names a reason to skip (a
missing tool).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .volumes import KINDS, MiB, change_some

PASSPHRASE = "conformance kit passphrase"


@dataclass(frozen=True)
class EngineUnderTest:
    """The engine to check: its name, extra `init` arguments, and its corruption helper.

    `corrupt(archive_dir)` damages stored data in place so that reading it back must fail
    (flip a byte inside stored chunk data, say); it is called on a directory archive.
    """

    name: str
    corrupt: Callable[[Path], None]
    init_args: tuple[str, ...] = ()
    skip: str | None = None
    volume_size: int = 3 * MiB
    extra_env: dict[str, str] = field(default_factory=dict)
    # called with $QBHUB_HOME after the command following a killed backup: check that what the
    # killed command left behind (scratch directories, say) has been cleaned up
    after_kill: Callable[[Path], None] = lambda home: None


def _tree_bytes(path: Path) -> int:
    """Bytes of every regular file below `path` (files vanishing meanwhile are skipped)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


class Qbhub:
    """Runs the real command line with its own home and the kit's passphrase."""

    def __init__(self, home: Path, extra_env: dict[str, str]) -> None:
        self.home = home
        self.env = {
            **os.environ,
            "QBHUB_HOME": str(home),
            "QBHUB_PASSPHRASE": PASSPHRASE,
            **extra_env,
        }

    def run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "qubes_backup_hub", *map(str, args)]
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=600)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv[2:])} failed ({done.returncode}): {done.stderr}")
        return done

    def start(self, *args: str | Path) -> subprocess.Popen[bytes]:
        """Start a command without waiting (its own process group, output discarded)."""
        argv = [sys.executable, "-m", "qubes_backup_hub", *map(str, args)]
        return subprocess.Popen(
            argv,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def json(self, *args: str | Path) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.run(*args, "--json").stdout)
        return result


class EngineConformance:
    """Subclass with `engine = EngineUnderTest(...)`; every test runs against that engine."""

    engine: EngineUnderTest

    @pytest.fixture
    def qbhub(self, tmp_path: Path) -> Qbhub:
        if self.engine.skip:
            pytest.skip(self.engine.skip)
        return Qbhub(tmp_path / "home", self.engine.extra_env)

    @pytest.fixture
    def archive(self, qbhub: Qbhub, tmp_path: Path) -> Path:
        dest = tmp_path / "archive"
        qbhub.run("init", "--engine", self.engine.name, "--dest", dest, *self.engine.init_args)
        return dest

    def backup(self, qbhub: Qbhub, archive: Path, *volumes: Path) -> str:
        """Back up `volumes` (named by file name) with no --engine; return the session."""
        result = qbhub.json("volume", "backup", "--dest", archive, *volumes)
        session: str = result["session"]
        return session

    def restore(
        self, qbhub: Qbhub, archive: Path, name: str, target: Path, session: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        extra = ("--session", session) if session else ()
        return qbhub.run(
            "volume", "restore", "--dest", archive, name, "--to", target, *extra, check=False
        )

    # -- the checks ------------------------------------------------------------------------------

    def test_engine_is_recorded_in_the_archive(self, qbhub: Qbhub, archive: Path) -> None:
        listing = qbhub.json("list", "--dest", archive)
        assert listing["sessions"] == []

    def test_round_trip_is_bit_exact(self, qbhub: Qbhub, archive: Path, tmp_path: Path) -> None:
        volumes = []
        for seed, (kind, make) in enumerate(KINDS.items()):
            path = tmp_path / f"{kind}.img"
            make(path, self.engine.volume_size, seed)
            volumes.append(path)
        session = self.backup(qbhub, archive, *volumes)
        for path in volumes:
            out = tmp_path / f"{path.name}.out"
            done = self.restore(qbhub, archive, path.name, out)
            assert done.returncode == 0, done.stderr
            assert out.read_bytes() == path.read_bytes(), f"{path.name} differs"
        listed = qbhub.json("list", "--dest", archive)
        assert [s["session"] for s in listed["sessions"]] == [session]
        sizes = {v["name"]: v["size"] for v in listed["sessions"][0]["volumes"]}
        assert sizes == {p.name: p.stat().st_size for p in volumes}

    def test_older_sessions_stay_restorable(
        self, qbhub: Qbhub, archive: Path, tmp_path: Path
    ) -> None:
        disk = tmp_path / "disk.img"
        KINDS["random"](disk, self.engine.volume_size, 1)
        versions = []
        for round_ in range(3):
            if round_:
                change_some(disk, round_)
            versions.append((self.backup(qbhub, archive, disk), disk.read_bytes()))
        sessions = [s["session"] for s in qbhub.json("list", "--dest", archive)["sessions"]]
        assert sessions == [s for s, _ in versions]
        for session, data in (versions[0], versions[-1]):
            out = tmp_path / f"{session}.out"
            assert self.restore(qbhub, archive, "disk.img", out, session).returncode == 0
            assert out.read_bytes() == data
        newest = tmp_path / "newest.out"
        assert self.restore(qbhub, archive, "disk.img", newest).returncode == 0
        assert newest.read_bytes() == versions[-1][1]

    def test_prune_keeps_the_rest_whole(self, qbhub: Qbhub, archive: Path, tmp_path: Path) -> None:
        disk = tmp_path / "disk.img"
        KINDS["text"](disk, self.engine.volume_size, 2)
        first = self.backup(qbhub, archive, disk)
        change_some(disk, 7)
        kept = self.backup(qbhub, archive, disk)
        result = qbhub.json("prune", "--dest", archive, "--keep-last", "1")
        assert result["sessions_removed"] == [first]
        listed = qbhub.json("list", "--dest", archive)
        assert [s["session"] for s in listed["sessions"]] == [kept]
        out = tmp_path / "kept.out"
        assert self.restore(qbhub, archive, "disk.img", out).returncode == 0
        assert out.read_bytes() == disk.read_bytes()
        gone = self.restore(qbhub, archive, "disk.img", tmp_path / "gone.out", first)
        assert gone.returncode != 0 and not (tmp_path / "gone.out").exists()
        qbhub.run("verify", "--dest", archive)

    def test_damaged_storage_is_detected(self, qbhub: Qbhub, archive: Path, tmp_path: Path) -> None:
        disk = tmp_path / "disk.img"
        KINDS["random"](disk, self.engine.volume_size, 3)
        self.backup(qbhub, archive, disk)
        qbhub.run("verify", "--dest", archive)
        self.engine.corrupt(archive)
        verify = qbhub.run("verify", "--dest", archive, check=False)
        assert verify.returncode == 3, verify.stderr
        out = tmp_path / "out.img"
        restored = self.restore(qbhub, archive, "disk.img", out)
        assert restored.returncode != 0 or out.read_bytes() == disk.read_bytes()
        if restored.returncode != 0:
            assert not out.exists()

    def test_killed_backup_leaves_earlier_sessions_whole(
        self, qbhub: Qbhub, archive: Path, tmp_path: Path
    ) -> None:
        disk = tmp_path / "disk.img"
        KINDS["text"](disk, self.engine.volume_size, 4)
        first = self.backup(qbhub, archive, disk)
        kept = disk.read_bytes()
        big = tmp_path / "big.img"
        KINDS["random"](big, 16 * self.engine.volume_size, 5)
        change_some(disk, 9)
        before = _tree_bytes(archive)
        running = qbhub.start("volume", "backup", "--dest", archive, disk, big)
        deadline = time.monotonic() + 120
        # kill once the backup is writing to storage (or has ended)
        while running.poll() is None and time.monotonic() < deadline:
            if _tree_bytes(archive) > before + self.engine.volume_size:
                break
            time.sleep(0.05)
        os.killpg(running.pid, signal.SIGKILL)  # the command and everything it started
        running.wait()
        out = tmp_path / "first.out"
        done = self.restore(qbhub, archive, "disk.img", out, first)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == kept
        sessions = [s["session"] for s in qbhub.json("list", "--dest", archive)["sessions"]]
        assert sessions[0] == first and len(sessions) <= 2
        again = self.backup(qbhub, archive, disk)  # the archive is usable after the kill
        assert again != first
        self.engine.after_kill(qbhub.home)

    def test_vms_restore_under_another_name_and_onto_an_empty_platform(
        self, qbhub: Qbhub, archive: Path, tmp_path: Path
    ) -> None:
        """VM level on the LocalPlatform: two VMs backed up with their settings; one restored
        beside itself under another name, then both onto an empty platform (a new $QBHUB_HOME
        with only the archive and the passphrase, as in an emergency); volumes bit-exact,
        settings as they were."""
        local = {"QBHUB_PLATFORM": "local"}
        qbhub.env.update(local)
        for vm, *how in (
            ("base", "--class", "TemplateVM", "--label", "black"),
            ("work", "--class", "AppVM", "--template", "base", "--label", "blue"),
        ):
            qbhub.run("local", "vm-create", vm, *how, "--size", "4M")
        listed = {vm["name"]: vm for vm in qbhub.json("local", "list")["vms"]}
        paths = {
            (vm, v["name"]): Path(v["path"])
            for vm in ("base", "work")
            for v in listed[vm]["volumes"]
        }
        for k, path in enumerate(paths.values()):
            KINDS["text" if k % 2 else "random"](path, path.stat().st_size, 20 + k)
        qbhub.run("backup", "--dest", archive, "base", "work")

        renamed = qbhub.json("restore", "--dest", archive, "work", "--rename", "work:work-old")
        assert renamed["vms"] == ["work-old"]
        now = {vm["name"]: vm for vm in qbhub.json("local", "list")["vms"]}
        assert now["work-old"]["properties"] == now["work"]["properties"]
        for v in now["work-old"]["volumes"]:
            assert Path(v["path"]).read_bytes() == paths[("work", v["name"])].read_bytes()

        fresh = Qbhub(tmp_path / "empty-home", {**self.engine.extra_env, **local})
        fresh.run("restore", "--dest", archive, "base", "work")
        again = {vm["name"]: vm for vm in fresh.json("local", "list")["vms"]}
        assert set(again) == {"dom0", "base", "work"}
        for vm in ("base", "work"):
            assert again[vm]["class"] == listed[vm]["class"]
            assert again[vm]["properties"] == listed[vm]["properties"]
            for v in again[vm]["volumes"]:
                assert Path(v["path"]).read_bytes() == paths[(vm, v["name"])].read_bytes()
