"""Measure one benchmark step: a tool run as a subprocess, timed, with its resource usage.

Wall time comes from a monotonic clock around the child; CPU (user + system) and peak RSS come from
``os.wait4`` on the child, which covers the child and every descendant it reaped. ``ru_maxrss`` is
the largest single process of that tree, so a sampler also sums the proportional set size (PSS) of
the whole live process tree every 100 milliseconds: an engine that splits its work across
worker processes cannot hide memory from the benchmark. And since the machine may be shared, each
step also records how much CPU everything else used meanwhile: a large value flags a noisy step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_INTERVAL = 0.1  # one sample costs about 1 ms of CPU
NOISE_SHARE = 0.25  # a step is noisy when other work used more than this many CPUs on average


@dataclass
class StepResult:
    """What one measured step cost."""

    tool: str
    step: str
    wall: float = 0.0
    user: float = 0.0
    sys: float = 0.0
    maxrss: int = 0  # bytes, largest single process (ru_maxrss)
    tree_pss: int = 0  # bytes, largest sampled PSS sum over the live process tree
    other_cpu: float = 0.0  # CPU seconds the rest of the machine used during the step
    kernel_cpu: float = 0.0  # ... of which kernel threads (loop devices, filesystem workers)
    returncode: int = 0
    stored: int = 0  # bytes allocated by the archive after the step (st_blocks * 512)
    stored_apparent: int = 0  # sum of st_size over the archive after the step
    cache: int = 0  # bytes allocated by the tool's local cache / state directory
    added: int | None = None  # bytes the step added to the archive, when meaningful
    log: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def cpu(self) -> float:
        """User plus system CPU seconds."""
        return self.user + self.sys

    @property
    def peak_rss(self) -> int:
        """The larger of ru_maxrss and the sampled process-tree PSS, in bytes."""
        return max(self.maxrss, self.tree_pss)

    @property
    def noisy(self) -> bool:
        """True when other processes used enough CPU during the step to distort its timing."""
        return self.other_cpu - self.kernel_cpu > NOISE_SHARE * self.wall

    @property
    def ok(self) -> bool:
        """True when the tool exited 0."""
        return self.returncode == 0


class CacheDropper:
    """Flush and drop the page cache before a step; warn once if that is not permitted."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.warned = False

    def drop(self) -> None:
        """``sync; echo 3 > /proc/sys/vm/drop_caches``, or a single warning when not root."""
        os.sync()
        if not self.enabled:
            return
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as exc:
            if not self.warned:
                print(
                    f"WARNING: cannot drop caches ({exc}); steps run with warm caches "
                    "and times are not comparable to cold runs",
                    file=sys.stderr,
                )
                self.warned = True


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    return children


def _pss(pid: int) -> int:
    """Proportional set size of one process in bytes, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pss(root: int) -> int:
    """Sum of PSS over ``root`` and all its live descendants."""
    children = _children_map()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += _pss(pid)
        todo.extend(children.get(pid, ()))
    return total


class TreeSampler(threading.Thread):
    """Background thread recording the peak PSS of a process tree until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Sample until ``stop`` is called."""
        while not self._stop_event.is_set():
            self.peak = max(self.peak, tree_pss(self.pid))
            self._stop_event.wait(SAMPLE_INTERVAL)

    def stop(self) -> int:
        """Stop sampling and return the peak in bytes."""
        self._stop_event.set()
        self.join()
        return self.peak


def machine_busy() -> float:
    """CPU seconds all CPUs have spent busy since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait; guest time is already counted in user
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def kernel_threads_cpu() -> float:
    """CPU seconds used so far by the kernel's threads (children of kthreadd, pid 2).

    A step on a loop-mounted filesystem makes the loop device's and the filesystem's kernel
    threads work for it; that CPU is the step's own cost, not noise from other programs.
    """
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == "2" or entry.name == "2":  # ppid is kthreadd
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """CPU seconds this benchmark process itself has used (the sampler thread included)."""
    t = os.times()
    return t.user + t.system


def run_measured(
    tool: str,
    step: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path | None = None,
) -> StepResult:
    """Run ``argv`` to completion with output to ``log_path``; return its measured cost."""
    result = StepResult(tool=tool, step=step, log=str(log_path))
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        busy_before, own_before, kernel_before = machine_busy(), own_cpu(), kernel_threads_cpu()
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
        )
        sampler = TreeSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        result.wall = time.perf_counter() - started
        result.tree_pss = sampler.stop()
        busy, own = machine_busy() - busy_before, own_cpu() - own_before
        kernel = kernel_threads_cpu() - kernel_before
    proc.returncode = result.returncode = os.waitstatus_to_exitcode(status)
    result.user, result.sys = usage.ru_utime, usage.ru_stime
    result.maxrss = usage.ru_maxrss * 1024  # Linux reports KiB
    result.other_cpu = max(0.0, busy - own - result.cpu)
    result.kernel_cpu = min(result.other_cpu, max(0.0, kernel))
    return result


def dir_usage(path: Path) -> tuple[int, int]:
    """(allocated bytes, apparent bytes) of every regular file under ``path``."""
    allocated = apparent = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            allocated += st.st_blocks * 512
            apparent += st.st_size
    return allocated, apparent


def log_tail(path: str, lines: int = 15) -> str:
    """The last lines of a log file, for error reports."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def qbhub_argv() -> list[str]:
    """The qbhub command of this interpreter's environment (the venv's script, else -m)."""
    beside = Path(sys.executable).parent / "qbhub"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "qubes_backup_hub"]


def require_ok(name: str, result: StepResult, log: Path) -> StepResult:
    """`result` if the step succeeded; else stop the benchmark with the log's last lines."""
    if not result.ok:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"step {name} failed ({result.returncode}):\n" + "\n".join(tail))
    return result
