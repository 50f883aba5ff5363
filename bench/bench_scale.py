"""Scale benchmark of the native engine: memory and start-up against the number of chunks stored.

How the archives are built (cheaply, and honestly for what is measured): a generator stream
hands the engine a volume of unique chunks of the archive's chunk size (4 KiB by default, the
smallest the format allows): chunk ``i`` is its 8-byte number, a tag naming the bulk volume, and
zeros. Every chunk is distinct, so the engine hashes, seals, packs and indexes each one exactly as
it would real data, and the archive's index holds one entry per chunk; but each compresses to a
few dozen bytes, so 1M chunks cost seconds of CPU and a few tens of MB of disk instead of 64 GiB.
What that makes unlike real data: packs hold tens of thousands of chunks instead of ~130, so the
archive has fewer packs (per-pack costs are understated; per-chunk costs, the index, are not).
The engine reads the generator in-process (``--_build``); every measured command is the ``qbhub``
command line in a fresh process, as a user runs it.

Measured at each size (the archive grows by adding bulk volumes, so every size reuses the last):
- ``backup``: an incremental of an unchanged small volume (4 MiB of random data, backed up once
  before the first size), the plain provider: the whole volume is read and every chunk is looked
  up in the index;
- ``list``, ``restore`` (of that small volume), ``diff`` (of it against its file);
- ``vmrestore``: ``qbhub restore`` of a small VM (4 MiB of random data, backed up once before the
  first size) on the LocalPlatform: dom0 authenticates and relays, the restore worker parses the
  archive in its bubblewrap sandbox, reading dom0's index cache read-only (peak RSS is the
  whole process tree: dom0's qbhub, bwrap and the worker);
- ``build``: the bulk backup that grew the archive (a full backup of new data);
- ``first``: the first command after it (``list``): since a bulk backup folds its own entries
  into the local index cache at its commit, this is a plain ``list``.
The steps are also measured once on the archive before any bulk data (``0`` chunks: the
empty-archive reference for start-up). ``--attach`` measures the steps (not ``build``) on the
archive an earlier run kept in ``--workdir`` (adding the small VM if it lacks it), e.g. after a
large run was stopped; the smallest of ``--sizes`` is what it holds, the archive then grows to
the others.
Each step reports wall time and peak RSS (``os.wait4`` of the child, and the PSS of its process
tree, see measure.py); then a least-squares line per step and metric is extrapolated to 64M
chunks (4 TiB of 64 KiB chunks). ``--drop-caches`` drops the page cache before each step (root).

Usage: bench/bench_scale.py [--sizes 1M,4M] [--quick] [--workdir DIR] [--json FILE]
       bench/bench_scale.py --attach --workdir DIR --sizes 4M
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import CacheDropper, StepResult, qbhub_argv, require_ok, run_measured

PASSPHRASE = "bench-scale passphrase"
CHUNK = 4096
SMALL_BYTES = 4 * 1024 * 1024
TARGET = 64 * 1024 * 1024  # extrapolate to 64M chunks: 4 TiB of 64 KiB chunks
QUICK_SIZES = [16_384, 65_536]
DEFAULT_SIZES = [1 << 20]
LARGE_SIZES = [1 << 20, 4 << 20, 16 << 20]
ROOT = Path(__file__).resolve().parent.parent
STEPS = ("build", "first", "backup", "list", "restore", "diff", "vmrestore")
SMALL_VM = "smallvm"


class GeneratedStream:
    """A VolumeStream of `chunks` unique, well-compressing chunks (see the module docstring)."""

    def __init__(self, chunks: int, tag: int, chunk_size: int = CHUNK) -> None:
        self.size = chunks * chunk_size
        self.chunk_size = chunk_size
        self.tag = struct.pack("<Q", tag)

    def data_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        stop = self.size if end is None else min(end, self.size)
        if start < stop:
            yield start, stop - start

    def read_into(self, buf: bytearray | memoryview, offset: int) -> int:
        c = self.chunk_size
        n = min(len(buf), self.size - offset)
        view = memoryview(buf)
        view[:n] = bytes(n)
        for pos in range(0, n, c):
            head = struct.pack("<Q", (offset + pos) // c) + self.tag
            view[pos : pos + min(16, n - pos)] = head[: min(16, n - pos)]
        return n

    def close(self) -> None:
        pass

    def __enter__(self) -> GeneratedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build(archive: Path, home: Path, chunks: int, tag: int) -> None:
    """In this process: back up a generated volume of `chunks` chunks as volume bulk-TAG."""
    from qbhub_native.engine import NativeEngine

    from qubes_backup_hub.engine import EngineContext, VolumeSource
    from qubes_backup_hub.passphrase import PassphraseSource
    from qubes_backup_hub.progress import Progress
    from qubes_backup_hub.store.local import LocalDirStore

    hook = SimpleNamespace(
        qbhub_open_stream=lambda path: GeneratedStream(chunks, tag),
        qbhub_validate_restore=lambda header: None,
    )
    context = EngineContext(
        hook=hook,  # type: ignore[arg-type]
        passphrase=PassphraseSource(value=PASSPHRASE.encode()),
        state_dir=home,
        progress=Progress(enabled=False),
    )
    engine = NativeEngine(context)
    store = LocalDirStore(archive)
    engine.backup(store, [VolumeSource(name=f"bulk-{tag}", path=f"generated:{tag}")])


class Bench:
    """One archive grown through the sizes, with every step measured at each."""

    def __init__(self, workdir: Path, drop: bool) -> None:
        self.workdir = workdir
        self.archive = workdir / "archive"
        self.home = workdir / "home"
        self.small = workdir / "small.img"
        self.out = workdir / "restored.img"
        self.log = workdir / "steps.log"
        self.dropper = CacheDropper(enabled=drop)
        self.env = {
            **os.environ,
            "QBHUB_HOME": str(self.home),
            "QBHUB_PASSPHRASE": PASSPHRASE,
            # This checkout's code first (a copy of the tree benchmarks its own code).
            "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("", "plugins/native")),
        }
        self.chunks = 0
        self.tag = 0
        self.vm_session = ""

    def step(self, name: str, argv: list[str]) -> StepResult:
        self.dropper.drop()
        result = run_measured("native", name, argv, self.env, self.log)
        if not result.ok and name != "build":  # once more: a checkout being edited meanwhile?
            print(f"# step {name} failed ({result.returncode}), once more in 20 s", flush=True)
            time.sleep(20)
            self.dropper.drop()
            result = run_measured("native", name, argv, self.env, self.log)
        return require_ok(name, result, self.log)

    def setup(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.small.write_bytes(os.urandom(SMALL_BYTES))
        q = qbhub_argv()
        self.step("init", [*q, "init", "--dest", str(self.archive), "--chunk-size", str(CHUNK)])
        self.step(
            "first",
            [*q, "volume", "backup", "--dest", str(self.archive), f"{self.small}=small", "--json"],
        )
        self.add_small_vm()

    def add_small_vm(self) -> None:
        """A small VM on the LocalPlatform, its private volume random, backed up once."""
        q = qbhub_argv()
        record = self.workdir / "vm-session"
        if record.exists():
            self.vm_session = record.read_text().strip()
            return
        self.step("setup", [*q, "local", "vm-create", SMALL_VM, "--class", "StandaloneVM",
                            "--label", "red", "--size", "4M"])  # fmt: skip
        listed = subprocess.run(
            [*q, "local", "list", "--json"], env=self.env, capture_output=True, check=True
        )
        for vm in json.loads(listed.stdout)["vms"]:
            for volume in vm["volumes"] if vm["name"] == SMALL_VM else []:
                with open(volume["path"], "r+b") as f:
                    f.write(os.urandom(SMALL_BYTES if volume["name"] == "private" else 4096))
        log = self.workdir / "vm-backup.json"
        with open(log, "wb") as out:
            subprocess.run([*q, "backup", SMALL_VM, "--dest", str(self.archive), "--json"],
                           env=self.env, stdout=out, check=True)  # fmt: skip
        self.vm_session = json.loads(log.read_text())["session"]
        record.write_text(self.vm_session + "\n")

    def grow_to(self, chunks: int) -> StepResult:
        self.tag += 1
        argv = [
            sys.executable,
            __file__,
            "--_build",
            str(self.archive),
            str(self.home),
            str(chunks - self.chunks),
            str(self.tag),
        ]
        result = self.step("build", argv)
        self.chunks = chunks
        return result

    def measure(self) -> dict[str, StepResult]:
        q, dest = qbhub_argv(), ["--dest", str(self.archive)]
        self.out.unlink(missing_ok=True)
        return {
            # The first command after a bulk backup folds its index objects into the local
            # index cache (a one-time cost); the steps after it show the steady state.
            "first": self.step("first", [*q, "list", *dest, "--json"]),
            "backup": self.step(
                "backup", [*q, "volume", "backup", *dest, f"{self.small}=small", "--json"]
            ),
            "list": self.step("list", [*q, "list", *dest, "--json"]),
            "restore": self.step(
                "restore", [*q, "volume", "restore", *dest, "small", "--to", str(self.out)]
            ),
            "diff": self.step("diff", [*q, "diff", *dest, "small", str(self.small)]),
            "vmrestore": self.vm_restore(),
        }

    def vm_restore(self) -> StepResult:
        """`qbhub restore` of the small VM as a new VM through the worker; the copy removed."""
        q, copy = qbhub_argv(), f"{SMALL_VM}-copy"
        argv = [*q, "restore", SMALL_VM, "--rename", f"{SMALL_VM}:{copy}", "--session",
                self.vm_session, "--dest", str(self.archive), "--json"]  # fmt: skip
        result = self.step("vmrestore", argv)
        subprocess.run([*q, "local", "vm-remove", copy], env=self.env, check=True,
                       capture_output=True)  # fmt: skip
        return result


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y over x; slope 0 from a single point."""
    if len(points) < 2:
        return (points[0][1] if points else 0.0), 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def mib(n: float) -> float:
    return n / (1024 * 1024)


def report(rows: list[dict[str, Any]], cache_bytes: dict[int, int]) -> list[str]:
    """The table of measured numbers and the extrapolation to TARGET chunks."""
    lines = [f"{'chunks':>10} {'step':<9} {'wall s':>8} {'peak MiB':>9}"]
    for row in rows:
        lines.append(
            f"{row['chunks']:>10} {row['step']:<9} {row['wall']:>8.2f} {mib(row['peak_rss']):>9.1f}"
        )
    empty = {r["step"]: r["wall"] for r in rows if r["chunks"] == 0}
    largest = max((r["chunks"] for r in rows), default=0)
    if empty and largest:
        lines.append(f"start-up at {largest} chunks over the empty archive (wall):")
        for row in rows:
            if row["chunks"] == largest and row["step"] in empty:
                lines.append(f"  {row['step']:<9} {row['wall'] - empty[row['step']]:+8.2f} s")
    for chunks, size in sorted(cache_bytes.items()):
        lines.append(
            f"{chunks:>10} local state {mib(size):.1f} MiB "
            f"({size / max(chunks, 1):.1f} bytes/chunk)"
        )
    lines.append(f"extrapolated to {TARGET} chunks (least squares over the sizes measured):")
    for step in STEPS:
        mine = [r for r in rows if r["step"] == step]
        if not mine:
            continue
        a_t, b_t = fit([(r["chunks"], r["wall"]) for r in mine])
        a_m, b_m = fit([(r["chunks"], r["peak_rss"]) for r in mine])
        per_chunk = b_m
        if step == "build":  # a build adds chunks: per added chunk, not per chunk held
            lines.append(f"  build: {per_chunk:.1f} bytes of peak RSS per chunk held")
            continue
        wall, peak = a_t + b_t * TARGET, mib(a_m + b_m * TARGET)
        lines.append(
            f"  {step:<8} wall {wall:8.2f} s   peak {peak:9.1f} MiB   ({per_chunk:.2f} bytes/chunk)"
        )
    return lines


def rows_of(size: int, steps: dict[str, StepResult]) -> list[dict[str, Any]]:
    rows = []
    for name, result in steps.items():
        row = {"chunks": size, "step": name, "wall": result.wall,
               "peak_rss": result.peak_rss, "maxrss": result.maxrss}  # fmt: skip
        rows.append(row)
        print(f"{size:>10} {name:<9} {result.wall:>8.2f} {mib(result.peak_rss):>9.1f}", flush=True)
    return rows


def local_state_bytes(home: Path) -> int:
    """dom0's local state (rollback memory, index cache), the LocalPlatform's VMs left out."""
    files = (p for p in home.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files if p.relative_to(home).parts[0] != "local")


def run(sizes: list[int], workdir: Path, drop: bool, attach: bool = False) -> dict[str, Any]:
    bench = Bench(workdir, drop)
    rows: list[dict[str, Any]] = []
    cache_bytes: dict[int, int] = {}
    if attach:  # an archive an earlier run kept, holding min(sizes) chunks: measure, grow on
        bench.add_small_vm()
        bench.chunks = min(sizes)
        bench.tag = 1000 + len(list(bench.archive.rglob("i*")))  # bulk volumes named anew
        rows += rows_of(bench.chunks, bench.measure())
        cache_bytes[bench.chunks] = local_state_bytes(bench.home)
        sizes = [n for n in sizes if n > bench.chunks]
    else:
        bench.setup()
        rows += rows_of(0, bench.measure())  # the empty-archive reference
    for size in sorted(sizes):
        started = time.perf_counter()
        built = bench.grow_to(size)
        rows += rows_of(size, {"build": built, **bench.measure()})
        cache_bytes[size] = local_state_bytes(bench.home)
        print(f"# {size} chunks measured in {time.perf_counter() - started:.0f} s", flush=True)
    lines = report(rows, cache_bytes)
    print("\n".join(lines), flush=True)
    return {"rows": rows, "local_state_bytes": cache_bytes, "report": lines}


def restic_index(workdir: Path, blobs: int, drop: bool) -> list[dict[str, Any]]:
    """restic's index cost on comparable data: `blobs` unique data blobs, measured.

    restic cuts content-defined chunks of 512 KiB to 8 MiB, so a million of its chunks would be
    half a TiB; but a file smaller than the minimum is one blob, so `blobs` tiny unique files
    (1,024 per directory) give a repository whose index holds one entry per file, as ours holds
    one per chunk. Measured: the first backup of them, `restic snapshots`, and a backup of an
    unchanged 4 MiB file (restic loads its whole index to deduplicate), as peak RSS of the tree.
    """
    data, repo = workdir / "restic-data", workdir / "restic-repo"
    small = workdir / "restic-small.img"
    log = workdir / "restic.log"
    env = {**os.environ, "RESTIC_PASSWORD": PASSPHRASE, "RESTIC_REPOSITORY": str(repo),
           "RESTIC_CACHE_DIR": str(workdir / "restic-cache"), "GOMAXPROCS": "2"}  # fmt: skip
    if not data.exists():
        for k in range(blobs):
            folder = data / f"{k >> 10:05d}"
            if k & 1023 == 0:
                folder.mkdir(parents=True)
            (folder / f"{k & 1023:04d}").write_bytes(struct.pack("<QQ", k, 0x51B) * 2)
    small.write_bytes(os.urandom(SMALL_BYTES))
    dropper = CacheDropper(enabled=drop)
    rows = []
    steps = [
        ("init", ["restic", "init"]),
        ("build", ["restic", "backup", "--host", "bench", str(data)]),
        ("rfirst", ["restic", "backup", "--host", "bench", str(small)]),
        ("snapshots", ["restic", "snapshots"]),
        ("backup", ["restic", "backup", "--host", "bench", str(small)]),
    ]
    for name, argv in steps:
        dropper.drop()
        result = run_measured("restic", name, argv, env, log)
        if not result.ok:
            raise SystemExit(f"restic {name} failed: see {log}")
        if name != "init":
            rows.append({"chunks": blobs, "step": f"restic-{name}", "wall": result.wall,
                         "peak_rss": result.peak_rss, "maxrss": result.maxrss})  # fmt: skip
            print(f"{blobs:>10} restic {name:<9} {result.wall:>8.2f} "
                  f"{mib(result.peak_rss):>9.1f}", flush=True)  # fmt: skip
    return rows


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
    return int(text.rstrip("KM")) * scale


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--_build":
        archive, home, chunks, tag = args[1:5]
        build(Path(archive), Path(home), int(chunks), int(tag))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", help="comma-separated chunk counts (e.g. 1M,4M,16M)")
    parser.add_argument("--large", action="store_true", help="1M, 4M and 16M chunks (slow)")
    parser.add_argument("--quick", action="store_true", help="16K and 64K chunks (< 2 minutes)")
    parser.add_argument("--workdir", type=Path, help="keep the archive here (default: a temp dir)")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache per step")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    parser.add_argument("--attach", action="store_true", help="continue the archive in --workdir")
    parser.add_argument("--restic-blobs", help="measure restic with this many blobs instead")
    opts = parser.parse_args(args)
    if opts.attach and not (opts.workdir and opts.sizes):
        parser.error("--attach needs --workdir and --sizes")
    if opts.restic_blobs:
        workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="qbhub-bench-restic-"))
        workdir.mkdir(parents=True, exist_ok=True)
        rows = restic_index(workdir, parse_size(opts.restic_blobs), opts.drop_caches)
        if opts.json:
            opts.json.write_text(json.dumps({"rows": rows}, indent=1))
        return 0
    if opts.sizes:
        sizes = [parse_size(s) for s in opts.sizes.split(",")]
    else:
        sizes = QUICK_SIZES if opts.quick else LARGE_SIZES if opts.large else DEFAULT_SIZES
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="qbhub-bench-scale-"))
    try:
        result = run(sizes, workdir, opts.drop_caches, opts.attach)
    finally:
        if opts.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
