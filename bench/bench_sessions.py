"""Session-count benchmark of the native engine: years of nightly backups of a small VM set.

How the archive is built (cheaply, and honestly for what is measured): each "night" is one backup
session of the same VM set, `VMS` VMs of `VOLUMES` volumes each, plus one small real file volume
(`small`, random bytes, never changed). A VM volume is a generated stream of unique chunks of
4 KiB (chunk ``i`` of version ``v`` is its number, its version, a tag naming the volume, and
zeros); every night `CHURN` chunks of every VM volume get a new version, and the session is told
which (``changed_ranges``, as an LVM-thin or reflink snapshot provider does), so the engine reads,
hashes and stores exactly those chunks, their new tree pages and a session record, and writes one
index object, as a real nightly incremental does. Sessions are made in-process (``--_build``),
one engine for many nights (one KDF); every measured command is the ``qbhub`` command line in a
fresh process, as a user runs it (measure.py: wall time, peak RSS of the process tree).

Measured at each session count (10, 100, 1000 by default; the archive grows, so each reuses the
last): ``list`` (time, RSS), an unchanged incremental of ``small`` (start-up: the volume is read
whole and found unchanged), the root object's size and the number of index objects it lists.
Then ``prune --keep-last 30`` (time, RSS, bytes reclaimed), and ``list`` and the incremental
again after it.

Usage: bench/bench_sessions.py [--sessions 10,100,1000] [--quick] [--workdir DIR] [--json FILE]
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
from measure import StepResult, dir_usage, qbhub_argv, require_ok, run_measured

PASSPHRASE = "bench-sessions passphrase"
CHUNK = 4096
VMS, VOLUMES = 4, 2  # the VM set: 4 VMs of 2 volumes (root and private)
VOLUME_CHUNKS = 1024  # 4 MiB per generated volume: a tree of two levels
CHURN = 4  # chunks changed per volume per night
SMALL_BYTES = 1024 * 1024
KEEP = 30
DEFAULT_COUNTS = [10, 100, 1000]
QUICK_COUNTS = [5, 40]
QUICK_KEEP = 10
ROOT = Path(__file__).resolve().parent.parent


def changed_chunks(volume: int, night: int) -> list[int]:
    """The chunks of generated volume `volume` that night `night` changes (night 0: all)."""
    if night == 0:
        return list(range(VOLUME_CHUNKS))
    step = VOLUME_CHUNKS // CHURN
    return sorted({(night * 37 + volume * 11 + k * step) % VOLUME_CHUNKS for k in range(CHURN)})


class ChurnStream:
    """A VolumeStream of generated volume `volume` as it is on night `night` (see the docstring).

    `versions` holds, per chunk, the night it last changed: the content depends only on it.
    """

    def __init__(self, volume: int, versions: list[int]) -> None:
        self.size = VOLUME_CHUNKS * CHUNK
        self.volume = volume
        self.versions = versions

    def data_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        stop = self.size if end is None else min(end, self.size)
        if start < stop:
            yield start, stop - start

    def read_into(self, buf: bytearray | memoryview, offset: int) -> int:
        n = min(len(buf), self.size - offset)
        view = memoryview(buf)
        view[:n] = bytes(n)
        for pos in range(0, n, CHUNK):
            i = (offset + pos) // CHUNK
            head = struct.pack("<QQQ", i, self.versions[i], self.volume)
            view[pos : pos + min(len(head), n - pos)] = head[: min(len(head), n - pos)]
        return n

    def close(self) -> None:
        pass

    def __enter__(self) -> ChurnStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def versions_at(volume: int, night: int) -> list[int]:
    """Per chunk of `volume`, the last night up to `night` that changed it."""
    versions = [0] * VOLUME_CHUNKS
    for n in range(1, night + 1):
        for i in changed_chunks(volume, n):
            versions[i] = n
    return versions


def build(archive: Path, home: Path, small: Path, first: int, last: int) -> None:
    """In this process: back up nights `first` .. `last - 1` of the VM set, one session each."""
    from qbhub_native.engine import NativeEngine

    from qubes_backup_hub.engine import EngineContext, VolumeSource
    from qubes_backup_hub.passphrase import PassphraseSource
    from qubes_backup_hub.progress import Progress
    from qubes_backup_hub.store.local import LocalDirStore
    from qubes_backup_hub.stream.file import FileVolumeStream

    volumes = VMS * VOLUMES
    versions = [versions_at(v, first - 1) if first else [0] * VOLUME_CHUNKS for v in range(volumes)]

    def open_stream(path: str) -> Any:
        if path.startswith("churn:"):
            v = int(path.split(":")[1])
            return ChurnStream(v, versions[v])
        return FileVolumeStream(path)

    hook = SimpleNamespace(
        qbhub_open_stream=open_stream, qbhub_validate_restore=lambda header: None
    )
    context = EngineContext(
        hook=hook,  # type: ignore[arg-type]
        passphrase=PassphraseSource(value=PASSPHRASE.encode()),
        state_dir=home,
        progress=Progress(enabled=False),
    )
    engine = NativeEngine(context)
    store = LocalDirStore(archive)
    previous: str | None = None
    for night in range(first, last):
        sources = [VolumeSource(name="small", path=str(small))]
        for v in range(volumes):
            changed = changed_chunks(v, night)
            for i in changed:
                versions[v][i] = night
            ranges = [(i * CHUNK, CHUNK) for i in changed]
            sources.append(
                VolumeSource(
                    name=f"vm{v // VOLUMES}-{('root', 'private')[v % VOLUMES]}",
                    path=f"churn:{v}",
                    changed_ranges=ranges if night and previous else None,
                    provider="bench-churn",
                    base_session=previous,
                )
            )
        result = engine.backup(store, sources)
        previous = str(result["session"])


def root_facts(archive: Path) -> tuple[int, int]:
    """(root object bytes, index objects in the archive directory)."""
    root = archive / "root"
    objects = sum(1 for p in archive.rglob("i*") if p.is_file() and len(p.name) == 65)
    return root.stat().st_size, objects


class Bench:
    """One archive grown through the session counts, measured at each, then pruned."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.archive = workdir / "archive"
        self.home = workdir / "home"
        self.small = workdir / "small.img"
        self.log = workdir / "steps.log"
        self.env = {
            **os.environ,
            "QBHUB_HOME": str(self.home),
            "QBHUB_PASSPHRASE": PASSPHRASE,
            "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("", "plugins/native")),
        }
        self.nights = 0

    def step(self, name: str, argv: list[str]) -> StepResult:
        result = run_measured("native", name, argv, self.env, self.log)
        return require_ok(name, result, self.log)

    def setup(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.small.write_bytes(os.urandom(SMALL_BYTES))
        q = qbhub_argv()
        self.step("init", [*q, "init", "--dest", str(self.archive), "--chunk-size", str(CHUNK)])

    def sessions(self) -> int:
        out = self.workdir / "list.json"
        with open(out, "wb") as f:
            subprocess.run(
                [*qbhub_argv(), "list", "--dest", str(self.archive), "--json"],
                stdout=f,
                env=self.env,
                check=True,
            )
        return len(json.loads(out.read_text())["sessions"])

    def grow_to(self, sessions: int) -> StepResult:
        """Build nights until the archive holds `sessions` sessions (measured ones count)."""
        have = self.sessions() if self.nights else 0
        target = self.nights + max(0, sessions - have)
        argv = [sys.executable, __file__, "--_build", str(self.archive), str(self.home),
                str(self.small), str(self.nights), str(target)]  # fmt: skip
        result = self.step("build", argv)
        self.nights = target
        return result

    def measure(self, tag: str) -> dict[str, Any]:
        q, dest = qbhub_argv(), ["--dest", str(self.archive)]
        root_bytes, index_objects = root_facts(self.archive)
        listed = self.step(f"list{tag}", [*q, "list", *dest, "--json"])
        backup = self.step(
            f"backup{tag}", [*q, "volume", "backup", *dest, f"{self.small}=small", "--json"]
        )
        return {
            "root_bytes": root_bytes,
            "index_objects": index_objects,
            "list": listed,
            "backup": backup,
        }

    def prune(self, keep: int) -> tuple[StepResult, int]:
        before = dir_usage(self.archive)[1]
        result = self.step(
            "prune",
            [*qbhub_argv(), "prune", "--dest", str(self.archive), "--keep-last", str(keep),
             "--json"],
        )  # fmt: skip
        return result, before - dir_usage(self.archive)[1]


def mib(n: float) -> float:
    return n / (1024 * 1024)


def line(label: str, r: StepResult) -> str:
    """Wall time, CPU time (user + system: what a shared machine's load does not inflate) and
    peak RSS of one step."""
    return f"{label:<26} {r.wall:7.2f} s {r.cpu:6.2f} s cpu {mib(r.peak_rss):8.1f} MiB"


def run(counts: list[int], keep: int, workdir: Path) -> dict[str, Any]:
    bench = Bench(workdir)
    bench.setup()
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    for count in sorted(counts):
        started = time.perf_counter()
        built = bench.grow_to(count)
        have = bench.sessions()  # the measured incremental then adds one
        m = bench.measure("")
        lines += [
            f"# {have} sessions (built in {built.wall:.0f} s)",
            line("  list", m["list"]),
            line("  unchanged incremental", m["backup"]),
            f"  root object              {m['root_bytes']} bytes, "
            f"{m['index_objects']} index objects",
        ]
        print("\n".join(lines[-4:]), flush=True)
        rows.append(
            {
                "sessions": have,
                "list_wall": m["list"].wall,
                "list_cpu": m["list"].cpu,
                "list_rss": m["list"].peak_rss,
                "backup_wall": m["backup"].wall,
                "backup_cpu": m["backup"].cpu,
                "backup_rss": m["backup"].peak_rss,
                "root_bytes": m["root_bytes"],
                "index_objects": m["index_objects"],
                "seconds": time.perf_counter() - started,
            }
        )
    have = bench.sessions()
    pruned, reclaimed = bench.prune(keep)
    after = bench.measure("-after")
    lines += [
        f"# prune keeping the newest {keep} of {have} sessions",
        line("  prune", pruned) + f"   reclaimed {mib(reclaimed):.1f} MiB",
        line("  list after", after["list"]),
        line("  unchanged incr. after", after["backup"]),
        f"  root object after        {after['root_bytes']} bytes, "
        f"{after['index_objects']} index objects",
    ]
    print("\n".join(lines[-5:]), flush=True)
    return {
        "rows": rows,
        "prune": {
            "sessions_before": have,
            "kept": keep,
            "wall": pruned.wall,
            "cpu": pruned.cpu,
            "peak_rss": pruned.peak_rss,
            "reclaimed": reclaimed,
            "list_wall_after": after["list"].wall,
            "list_rss_after": after["list"].peak_rss,
            "backup_wall_after": after["backup"].wall,
            "backup_rss_after": after["backup"].peak_rss,
            "root_bytes_after": after["root_bytes"],
            "index_objects_after": after["index_objects"],
        },
        "report": lines,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--_build":
        archive, home, small, first, last = args[1:6]
        build(Path(archive), Path(home), Path(small), int(first), int(last))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", help="comma-separated session counts (default 10,100,1000)")
    parser.add_argument("--keep", type=int, help=f"sessions prune keeps (default {KEEP})")
    parser.add_argument("--quick", action="store_true", help="5 and 40 sessions, keep 10")
    parser.add_argument("--workdir", type=Path, help="keep the archive here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    opts = parser.parse_args(args)
    if opts.sessions:
        counts = [int(s) for s in opts.sessions.split(",")]
    else:
        counts = QUICK_COUNTS if opts.quick else DEFAULT_COUNTS
    keep = opts.keep if opts.keep is not None else QUICK_KEEP if opts.quick else KEEP
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="qbhub-bench-sessions-"))
    try:
        result = run(counts, keep, workdir)
    finally:
        if opts.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
