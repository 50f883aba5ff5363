"""Smoke tests of the benchmarks: tiny runs of bench_native_vs_peers.py and bench_scattered.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPT = BENCH / "bench_native_vs_peers.py"


def _load(name: str) -> ModuleType:
    """Import a module from bench/ (a directory of scripts, not a package)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_workload_is_deterministic_and_distinct() -> None:
    """Same seed, same bytes; the kinds have the right shares; no two data blocks are equal."""
    workload = _load("workload")
    first = [hashlib.sha256(d).hexdigest() for _, _, d in workload.iter_blocks(5, 200)]
    again = [hashlib.sha256(d).hexdigest() for _, _, d in workload.iter_blocks(5, 200)]
    assert first == again
    kinds = workload.block_kinds(5, 200)
    assert (kinds.count("random"), kinds.count("zero"), kinds.count("text")) == (80, 60, 60)
    data = [h for h, k in zip(first, kinds, strict=True) if k != "zero"]
    assert len(set(data)) == len(data) == 140


@pytest.mark.slow
def test_bench_runs_all_tools(tmp_path: Path) -> None:
    """A 64 MiB run: exit 0, every restore bit-exact, ratio and target lines printed."""
    for tool, package in (("borg", "borgbackup"), ("restic", "restic")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed: apt-get install {package}")
    if _load("native").default_qbhub() is None:
        pytest.skip("qbhub not installed: pip install -e . -e plugins/native")
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--size",
            "64MiB",
            "--skip-sparse",
            "--require-peers",
            "--workdir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for tool in ("native", "borg", "restic"):
        assert f"restore check {tool}: bit-exact" in output, output
    for peer in ("restic", "borg"):
        for step in ("full backup", "incremental", "restore"):
            assert f"ratio native/{peer:<6} {step:<12}: wall " in output, output
    assert output.count("TARGET ") == 6, output
    doc = json.loads(out.read_text())
    assert {c["status"] for c in doc["cases"]["dense"]["checks"]} == {"bit-exact"}
    assert not list(tmp_path.glob("qbhub-bench-*")), "the workdir was not cleaned up"


@pytest.mark.slow
@pytest.mark.root
def test_scattered_bench_quick_mode(tmp_path: Path) -> None:
    """bench_scattered.py --quick: a small ext4 image changed through a real mount, on xfs."""
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mounts)")
    for tool in ("restic", "mkfs.xfs", "mkfs.ext4", "losetup"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    done = subprocess.run(
        [sys.executable, str(BENCH / "bench_scattered.py"), "--quick", "--repeat", "2",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "restore check: bit-exact" in output, output
    changed = re.search(r"changed: ([0-9.]+) MiB in ([0-9]+) ranges", output)
    assert changed and float(changed[1]) > 1 and int(changed[2]) > 0, output
    for line in ("reflink incremental", "full-scan incremental", "restic incremental", "Wyng"):
        assert line in output, output
    assert "(median of 2:" in output, output
    assert "(reflink-xfs)" in output, output
    assert not list(tmp_path.glob("qbhub-bench-*")), "the workdir was not cleaned up"
