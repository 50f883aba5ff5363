"""Benchmark: incrementals with reflink change detection vs full scans and restic; thin_delta parse.

On a loop-mounted btrfs and then xfs (root needed), with an 8 GiB volume from `workload.py`
(zero blocks left as holes, i.e. 5.6 GiB of data written densely at their offsets), and the same
blocks spread over a 64 GiB sparse volume:

    full backups (native, restic; not timed against targets), then per round a fresh 1% of the
    64 KiB blocks rewritten at random (`workload.mutate` with a new seed), then:
    - native incremental, reflink change detection (`qbhub volume backup`)
    - native incremental, full scan (`qbhub volume backup --no-snapshot`)
    - restic incremental of the same file
    - native incremental of the 64 GiB sparse volume, reflink change detection
Caches are dropped before every timed step. Then a synthetic thin_delta document for a 1 TiB
thin pair (64 KiB blocks, 1% changed at random) is parsed and timed.

    sudo .venv/bin/python bench/bench_snapshots.py [--size 8GiB] [--sparse-size 64GiB]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import workload
from loopfs import loop_filesystem
from measure import CacheDropper, StepResult, run_measured
from peers import ResticRunner

from qubes_backup_hub.snapshots.thindelta import parse_thin_delta

PASSPHRASE = "bench passphrase"
SEED = 21


class Bench:
    """One benchmark run: work directory, logs, cache dropper, collected results."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.dropper = CacheDropper()
        self.env = {**os.environ, "QBHUB_PASSPHRASE": PASSPHRASE, "QBHUB_HOME": str(root / "h")}
        self.qbhub = [sys.executable, "-m", "qubes_backup_hub"]

    def step(self, tool: str, step: str, argv: list[str], env: dict[str, str] | None = None,
             drop: bool = True) -> StepResult:  # fmt: skip
        if drop:
            self.dropper.drop()
        result = run_measured(tool, step, argv, env or self.env, self.logs / f"{tool}.log")
        if result.returncode != 0:
            raise SystemExit(f"{tool} {step} failed; see {result.log}")
        flag = f" (kernel threads {result.kernel_cpu:.1f} s)" if result.kernel_cpu >= 0.05 else ""
        flag += " NOISY" if result.noisy else ""
        print(f"  {tool:8} {step:34} wall {result.wall:7.2f} s  cpu {result.cpu:7.2f} s{flag}",
              flush=True)  # fmt: skip
        return result

    def native_backup(self, archive: Path, image: Path, step: str, *extra: str) -> StepResult:
        argv = [*self.qbhub, "volume", "backup", "--dest", str(archive), *extra, f"{image}=disk"]
        return self.step("native", step, argv)


def make_images(work: Path, size: int, sparse_size: int) -> tuple[Path, Path, int]:
    """The dense image and the same blocks spread over a sparse volume (built once per run)."""
    nblocks = size // workload.BLOCK
    dense, sparse = work / "dense.img", work / "sparse.img"
    t = time.perf_counter()
    workload.write_image(str(dense), SEED, workload.Layout.dense(nblocks), sparse_zeros=True)
    layout = workload.Layout.sparse(nblocks, sparse_size)
    with open(dense, "rb") as src, open(sparse, "wb") as dst:
        dst.truncate(layout.file_size)
        for i, kind in enumerate(workload.block_kinds(SEED, nblocks)):
            if kind != workload.ZERO:
                dst.seek(layout.offset(i))
                dst.write(os.pread(src.fileno(), workload.BLOCK, i * workload.BLOCK))
        dst.flush()
        os.fsync(dst.fileno())
    print(f"images built in {time.perf_counter() - t:.0f} s", flush=True)
    return dense, sparse, nblocks


def run_filesystem(bench: Bench, fs: str, dense: Path, sparse: Path, nblocks: int,
                   sparse_size: int) -> dict[str, float]:  # fmt: skip
    """All steps on one filesystem; returns the timed walls."""
    print(f"\n== {fs} (loop-mounted), {nblocks * workload.BLOCK >> 30} GiB volume ==", flush=True)
    walls: dict[str, float] = {}
    with loop_filesystem(fs, "96G", base=str(bench.root)) as mnt:
        vol, big = mnt / "vol.img", mnt / "big.img"
        subprocess.run(["cp", "--sparse=always", str(dense), str(vol)], check=True)
        subprocess.run(["cp", "--sparse=always", str(sparse), str(big)], check=True)
        archives = bench.root / f"archives-{fs}"
        a, c = archives / "native", archives / "native-sparse"
        for archive in (a, c):
            subprocess.run([*bench.qbhub, "init", "--dest", str(archive)], env=bench.env,
                           check=True, capture_output=True)  # fmt: skip
        restic = ResticRunner(archives / "restic", PASSPHRASE)
        restic.home.mkdir(parents=True, exist_ok=True)
        subprocess.run(restic.init_commands()[0].argv, env=restic.env(), check=True,
                       capture_output=True)  # fmt: skip
        bench.native_backup(a, vol, "full")
        bench.step("restic", "full", restic.backup_command(vol, "full").argv, restic.env())
        bench.native_backup(c, big, "full, sparse volume")
        dense_layout = workload.Layout.dense(nblocks)
        sparse_layout = workload.Layout.sparse(nblocks, sparse_size)
        workload.mutate(str(vol), SEED + 1, dense_layout)
        walls["reflink"] = bench.native_backup(a, vol, "incremental, reflink").wall
        workload.mutate(str(vol), SEED + 2, dense_layout)
        walls["fullscan"] = bench.native_backup(a, vol, "incremental, full scan",
                                                "--no-snapshot").wall  # fmt: skip
        walls["restic"] = bench.step("restic", "incremental",
                                     restic.backup_command(vol, "incr").argv, restic.env()).wall
        workload.mutate(str(big), SEED + 1, sparse_layout)
        walls["sparse"] = bench.native_backup(c, big, "incremental sparse vol, reflink").wall
        shutil.rmtree(archives)
    return walls


def thin_delta_document(total: int, block: int, fraction: float, seed: int) -> bytes:
    """A thin_delta-like document for a `total`-byte pair with `fraction` of blocks different."""
    nblocks = total // block
    changed = sorted(random.Random(seed).sample(range(nblocks), int(nblocks * fraction)))
    out = io.StringIO()
    out.write(f'<superblock uuid="" time="1" transaction="2" data_block_size="{block // 512}" '
              f'nr_data_blocks="{nblocks}">\n  <diff left="1" right="2">\n')  # fmt: skip
    pos = 0
    for b in changed:
        if b > pos:
            out.write(f'    <same begin="{pos}" length="{b - pos}"/>\n')
        out.write(f'    <different begin="{b}" length="1"/>\n')
        pos = b + 1
    if pos < nblocks:
        out.write(f'    <same begin="{pos}" length="{nblocks - pos}"/>\n')
    out.write("  </diff>\n</superblock>\n")
    return out.getvalue().encode()


def thin_parse(root: Path) -> float:
    doc = thin_delta_document(1 << 40, 64 * 1024, 0.01, 7)
    path = root / "thin_delta-1TiB.xml"
    path.write_bytes(doc)
    with open(path, "rb") as f:
        t = time.perf_counter()
        delta = parse_thin_delta(f)
        elapsed = time.perf_counter() - t
    print(f"\n== thin_delta, 1 TiB pair, 64 KiB blocks, 1% changed ==\n"
          f"  document {len(doc) / 1e6:.1f} MB, {len(delta.changed)} changed ranges, "
          f"{delta.blocks_compared} blocks: parsed in {elapsed:.2f} s", flush=True)  # fmt: skip
    return elapsed


def verdict(label: str, value: float, limit: float) -> bool:
    ok = value <= limit
    print(f"  {label:58} {value:6.3f} (target <= {limit}) {'PASS' if ok else 'FAIL'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8GiB")
    parser.add_argument("--sparse-size", default="64GiB")
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--fs", default="btrfs,xfs")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (loop-mounted filesystems)", file=sys.stderr)
        return 2
    root = Path(args.workdir) / f"qbhub-bench-snapshots-{os.getpid()}"
    root.mkdir(parents=True)
    try:
        bench = Bench(root)
        sparse_size = workload.parse_size(args.sparse_size)
        dense, sparse, nblocks = make_images(root, workload.parse_size(args.size), sparse_size)
        results = {fs: run_filesystem(bench, fs, dense, sparse, nblocks, sparse_size)
                   for fs in args.fs.split(",")}  # fmt: skip
        parse_time = thin_parse(root)
        print("\n== targets ==")
        ok = True
        for fs, w in results.items():
            ok &= verdict(f"{fs}: reflink incremental / restic incremental", w["reflink"] /
                          w["restic"], 0.1)  # fmt: skip
            ok &= verdict(f"{fs}: reflink incremental / native full-scan incremental",
                          w["reflink"] / w["fullscan"], 0.2)  # fmt: skip
            ok &= verdict(f"{fs}: 64 GiB sparse incremental / 8 GiB incremental",
                          w["sparse"] / w["reflink"], 1.5)  # fmt: skip
        ok &= verdict("thin_delta 1 TiB parse, seconds", parse_time, 2.0)
        print("ALL PASS" if ok else "SOME TARGETS FAILED")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
