"""Smoke test of bench/bench_native_vs_peers.py: a tiny run of every tool, end to end."""

from __future__ import annotations

import hashlib
import importlib.util
import json
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
