"""Crash-safe commit: a backup SIGKILLed at random moments never harms the archive.

DESIGN §3: "objects first, root last; an interrupted backup leaves at most unreferenced objects
and a later run resumes from them." The real CLI is started as a subprocess and killed with
SIGKILL at a seeded random moment, over and over. After every kill the archive verifies, the
committed sessions restore bit-exact, and a run allowed to finish adopts every pack the killed
runs uploaded (packs_reused) instead of uploading their chunks again.

To make a run last long enough to be killed in the middle while keeping images (and restores)
small, the archive compresses at zstd level 19: the random data doesn't compress, so every chunk
costs a slower compression attempt and is then stored raw, which keeps restores fast. Kills are
aimed at the working part of a run (from the moment it opens the image), whose length is
re-estimated from every run that finishes, so a loaded machine doesn't turn kills into no-ops.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import CHUNK, Qbhub

pytestmark = pytest.mark.slow

BLOCKS = 384  # a 24 MiB volume
CHURN = 0.5  # half of it rewritten before every run: ~12 MiB, about three 4 MiB packs
KILLS = 20
SEED = 20261126


# -- helpers ------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mutate(image: Path, rng: random.Random) -> set[int]:
    """Rewrite a random CHURN fraction of the image's blocks; return their indices."""
    blocks = set(rng.sample(range(BLOCKS), int(BLOCKS * CHURN)))
    with open(image, "r+b") as f:
        for i in sorted(blocks):
            f.seek(i * CHUNK)
            f.write(rng.randbytes(CHUNK))
    return blocks


def pack_files(archive: Path) -> int:
    """How many pack objects the store holds (committed or not; temporary files excluded)."""
    return sum(1 for p in (archive / "objects").glob("*/p*") if p.is_file())


@dataclass
class Run:
    """A `qbhub volume backup` started as a subprocess."""

    proc: subprocess.Popen[str]
    reading_at: float | None = None  # when it was first seen holding the image open

    def wait_until_reading(self, image: Path, timeout: float = 60) -> bool:
        """Poll /proc until the process has the image open (its startup is over).

        Returns False if it exited first. Startup (imports, the passphrase KDF, loading the
        index) writes nothing, so the kills are aimed at the part of a run that does.
        """
        target = str(image)
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                for fd in fd_dir.iterdir():
                    try:
                        if os.readlink(fd) == target:
                            self.reading_at = time.monotonic()
                            return True
                    except OSError:
                        continue
            except OSError:
                pass
            time.sleep(0.002)
        return False


@dataclass
class Tracker:
    """What the archive must hold: committed sessions in order, each with its image's SHA-256.

    Also keeps an estimate of how long the working part of a run (image open to exit) takes.
    """

    qbhub: Qbhub
    archive: Path
    image: Path
    scratch: Path
    work_seconds: float = 1.0
    sessions: dict[str, str] = field(default_factory=dict)
    restores: int = 0

    def start(self) -> Run:
        """Start a real `qbhub volume backup` (the CLI, as a user runs it)."""
        args = ["volume", "backup", "--dest", str(self.archive), f"{self.image}=disk", "--json"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "qubes_backup_hub", *args],
            env=self.qbhub.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return Run(proc)

    def finished(self, run: Run, out: str, digest: str) -> dict[str, Any]:
        """Record the session of a run that exited normally; refine the work estimate."""
        if run.reading_at is not None:
            observed = time.monotonic() - run.reading_at
            self.work_seconds = 0.5 * self.work_seconds + 0.5 * observed
        result: dict[str, Any] = json.loads(out)
        self.sessions[result["session"]] = digest
        return result

    def complete(self) -> dict[str, Any]:
        """Run a backup to completion and record its session."""
        digest = sha256(self.image)
        run = self.start()
        run.wait_until_reading(self.image)
        out, err = run.proc.communicate(timeout=120)
        assert run.proc.returncode == 0, err
        return self.finished(run, out, digest)

    def adopt_new_session(self, digest: str) -> None:
        """Record the session a killed run committed just before it died (kill after the root)."""
        listed = [s["session"] for s in self.qbhub.json("list", "--dest", self.archive)["sessions"]]
        assert listed[:-1] == list(self.sessions), "a committed session vanished or moved"
        self.sessions[listed[-1]] = digest

    def verify(self, *, full: bool) -> dict[str, Any]:
        args: list[str | Path] = ["verify", "--dest", self.archive]
        args += [] if full else ["--quick"]
        result = self.qbhub.json(*args)
        assert result["sessions"] == len(self.sessions)
        return result

    def check_restore(self, session: str) -> None:
        target = self.scratch / f"restore-{self.restores}.img"
        self.restores += 1
        self.qbhub.run(
            "volume",
            "restore",
            "--dest",
            self.archive,
            "disk",
            "--to",
            target,
            "--session",
            session,
        )
        assert sha256(target) == self.sessions[session], f"session {session} restored wrong"
        target.unlink()

    def check_sessions(self, which: list[str]) -> None:
        for session in which:
            self.check_restore(session)


# -- the test ------------------------------------------------------------------------------------


def test_sigkill_at_random_moments_never_harms_the_archive(tmp_path: Path, qbhub: Qbhub) -> None:
    """Kill >= 20 backups at random moments of their work; check the archive after every kill.

    After every kill: `verify --quick`, and the newest session plus one older one (in rotation)
    restore bit-exact; every fifth kill and at the end: a full verify and every session restored.
    Every fifth kill, and whenever a killed run left packs behind and no reuse was checked yet,
    a run is allowed to finish: it must adopt every orphan pack and upload less than the change.
    """
    rng = random.Random(SEED)
    archive = tmp_path / "archive"
    qbhub.run("init", "--dest", archive, "--compression-level", "19")
    image = tmp_path / "disk.img"
    image.write_bytes(rng.randbytes(BLOCKS * CHUNK))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tracker = Tracker(qbhub, archive, image, scratch)
    tracker.complete()
    mutate(image, rng)
    tracker.complete()  # an incremental like the ones to be killed: calibrates work_seconds

    dirty: set[int] = set()  # blocks changed since the newest committed session
    kills = reuse_checked = iteration = 0
    while kills < KILLS:
        iteration += 1
        assert iteration <= KILLS + 10, f"only {kills} of {iteration} runs were killed mid-way"
        dirty |= mutate(image, rng)
        digest = sha256(image)
        packs_before = pack_files(archive)

        run = tracker.start()
        if run.wait_until_reading(image):
            time.sleep(rng.uniform(0.0, 1.0) * tracker.work_seconds)
        run.proc.kill()
        out, err = run.proc.communicate(timeout=60)
        if run.proc.returncode == 0:  # it finished before the kill came
            tracker.finished(run, out, digest)
            dirty = set()
            continue
        assert run.proc.returncode == -9, err
        kills += 1
        uploaded = pack_files(archive) - packs_before

        quick = tracker.qbhub.json("verify", "--dest", archive, "--quick")
        if quick["sessions"] == len(tracker.sessions) + 1:  # killed after its root was written
            tracker.adopt_new_session(digest)
            dirty = set()
        assert quick["sessions"] == len(tracker.sessions)
        ids = list(tracker.sessions)
        if kills % 5 == 0:
            tracker.verify(full=True)
            tracker.check_sessions(ids)
        else:
            tracker.check_sessions([ids[-1], ids[kills % len(ids)]])

        orphans = pack_files(archive) - quick["packs"]
        if kills % 5 == 0 or (uploaded > 0 and orphans > 0 and not reuse_checked):
            result = tracker.complete()
            assert result["packs_reused"] == orphans, (result, orphans)
            if uploaded > 0 and orphans > 0 and dirty:
                # The packs of the run just killed hold chunks of this very image: not again.
                assert result["volumes"][0]["chunks_new"] < len(dirty)
                assert result["bytes_stored"] < len(dirty) * CHUNK, (result, len(dirty))
                reuse_checked += 1
            dirty = set()
            assert tracker.verify(full=False)["packs"] == pack_files(archive), "a pack left out"
            tracker.check_restore(list(tracker.sessions)[-1])

    assert reuse_checked >= 1, "no finishing run ever followed a killed run that uploaded packs"
    assert tracker.verify(full=True)["blobs_verified"] > 0
    tracker.check_sessions(list(tracker.sessions))
