"""Smoke test of bench/bench_scale.py: a tiny run prints a sane table and an extrapolation."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "bench_scale.py"
ROW = re.compile(
    r"^\s*(\d+) (build|first|backup|list|restore|diff|vmrestore)\s+([0-9.]+)\s+([0-9.]+)$"
)


@pytest.mark.slow
def test_bench_scale_tiny_run(tmp_path: Path) -> None:
    """Two small sizes: every step measured at each, times and RSS plausible, fit printed."""
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "2K,4K", "--workdir", str(tmp_path / "w"),
         "--json", str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [ROW.match(line) for line in run.stdout.splitlines()]
    found = [(int(m[1]), m[2], float(m[3]), float(m[4])) for m in rows if m]
    steps = ("build", "first", "backup", "list", "restore", "diff", "vmrestore")
    expected = {(n, s) for n in (2048, 4096) for s in steps} | {(0, s) for s in steps[1:]}
    assert {(n, s) for n, s, _, _ in found} == expected
    for _, _, wall, peak_mib in found:
        assert 0 < wall < 300 and 10 < peak_mib < 4096
    assert "extrapolated to 67108864 chunks" in run.stdout
    assert re.search(r"restore\s+wall\s+-?[0-9.]+ s\s+peak\s+-?[0-9.]+ MiB", run.stdout)
    assert (tmp_path / "out.json").stat().st_size > 0
    assert (tmp_path / "w" / "home" / "index-cache").is_dir(), "the commands built the cache"
    assert re.search(r"vmrestore\s+[+-][0-9.]+ s$", run.stdout, re.M), "start-up over empty"
