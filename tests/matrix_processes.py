"""Running one command of the hostile-storage matrix: in its own process group, killed with
its group after TIMEOUT seconds, with its output, exit code, time and peak RSS kept (`Run`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import PASSPHRASE

EXTRACT = Path(__file__).resolve().parent.parent / "tools" / "qbhub-extract"
TIMEOUT = 30.0  # seconds per process; a normal command here takes 1-3 s


@dataclass
class Run:
    """One finished (or killed) process."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    elapsed: float
    peak_rss: int
    timed_out: bool

    def describe(self) -> str:
        return (
            f"`{' '.join(self.argv)}` exit {self.returncode} after {self.elapsed:.1f} s, "
            f"stderr: {self.stderr!r}"
        )


def run_process(argv: list[str], env: dict[str, str], cwd: Path) -> Run:
    """Run `argv` in its own process group; kill the group after TIMEOUT seconds."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        killer = threading.Timer(TIMEOUT, kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if fired.is_set():  # leftovers of the group, if any
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        elapsed = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return Run(
            [Path(a).name if i == 0 else a for i, a in enumerate(map(str, argv))],
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            elapsed,
            usage.ru_maxrss * 1024,
            fired.is_set(),
        )


def qbhub_env(home: Path, passphrase: str = PASSPHRASE) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBHUB_")}
    env.update({"QBHUB_HOME": str(home), "QBHUB_PASSPHRASE": passphrase})
    return env


def qbhub_run(home: Path, cwd: Path, *args: str | Path, passphrase: str = PASSPHRASE) -> Run:
    argv = [sys.executable, "-m", "qubes_backup_hub", *map(str, args)]
    return run_process(argv, qbhub_env(home, passphrase), cwd)


def qbhub_ok(home: Path, cwd: Path, *args: str | Path, passphrase: str = PASSPHRASE) -> Run:
    """Run qbhub while building the fixtures: it has to succeed."""
    run = qbhub_run(home, cwd, *args, passphrase=passphrase)
    assert run.returncode == 0 and not run.timed_out, run.describe()
    return run


def extract_run(cwd: Path, *args: str | Path) -> Run:
    """The stand-alone extractor, isolated from qbhub like tests/test_extract.py runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QBHUB_", "PYTHON"))}
    env.update({"PYTHONPATH": "", "QBHUB_PASSPHRASE": PASSPHRASE})
    return run_process([sys.executable, "-I", str(EXTRACT), *map(str, args)], env, cwd)
