"""Smoke test of bench/bench_sessions.py: a tiny run builds nights, measures, prunes, and the
pruned archive still restores the kept nights bit-exact."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPT = BENCH / "bench_sessions.py"


def _load() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_sessions", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_churn_is_small_and_versions_follow_it() -> None:
    """Night 0 writes every chunk; later nights change CHURN chunks, and versions track them."""
    bench = _load()
    assert bench.changed_chunks(0, 0) == list(range(bench.VOLUME_CHUNKS))
    assert len(bench.changed_chunks(3, 5)) == bench.CHURN
    versions = bench.versions_at(3, 5)
    assert max(versions) == 5
    assert {i for i, v in enumerate(versions) if v == 5} == set(bench.changed_chunks(3, 5))
    stream = bench.ChurnStream(3, versions)
    buf = bytearray(2 * bench.CHUNK)
    assert stream.read_into(buf, 0) == len(buf)
    assert buf[:8] == (0).to_bytes(8, "little") and buf[bench.CHUNK] == 1


@pytest.mark.slow
def test_bench_sessions_tiny_run(tmp_path: Path) -> None:
    """3 then 8 sessions, prune keeping 2: numbers printed, space reclaimed, root shrinks."""
    out = tmp_path / "out.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--sessions", "3,8", "--keep", "2",
         "--workdir", str(tmp_path / "w"), "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "prune keeping the newest 2" in run.stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["sessions"] for r in rows] == [3, 8]
    assert rows[1]["root_bytes"] > rows[0]["root_bytes"] > 0
    assert rows[1]["index_objects"] >= 7
    prune = result["prune"]
    assert prune["sessions_before"] == 9
    assert prune["reclaimed"] > 0
    assert prune["root_bytes_after"] < rows[1]["root_bytes"]
    for key in ("list_wall_after", "backup_wall_after", "wall"):
        assert 0 < prune[key] < 300
