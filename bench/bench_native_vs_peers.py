#!/usr/bin/env python3
"""Benchmark qbhub's native engine against borg and restic on the same workload, in one run.

Builds a seeded image (40% random, 30% zero, 30% text-like 64 KiB blocks), then for every tool:
full backup, 1% of blocks rewritten, incremental backup (full scan: the image is a plain file),
restore to a new file checked bit-exact. Caches are dropped before every step. Each step prints
wall time, CPU, peak RSS and bytes stored; then the native/peer ratios and the issue's targets.
Finally the native engine alone repeats the steps on a sparse 64 GiB volume holding the same data.

Exit status: 0 when every tool ran and every restore was bit-exact, whether or not the targets were
met (this is a measurement); 1 when a tool failed or a restore differed; 2 on bad usage or a missing
required tool.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import report
import workload
from borg_engine import BorgEngineRunner
from measure import NOISE_SHARE, CacheDropper, StepResult, log_tail
from native import NativeRunner, qbhub_command
from peers import BorgRunner, ResticRunner
from runner import ToolRunner

PASSPHRASE = "qbhub-bench-passphrase"


@dataclass
class Outcome:
    """Everything one case (dense or sparse) produced: results, restore checks, failures."""

    results: dict[str, dict[str, StepResult]] = field(default_factory=dict)  # step -> tool -> r
    checks: list[dict[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--size", default="2GiB", help="image size, e.g. 2GiB, 256MiB (default 2GiB)")
    p.add_argument(
        "--sparse-volume",
        default="64GiB",
        help="size of the sparse volume for the native-only case (default 64GiB)",
    )
    p.add_argument(
        "--workdir",
        default="/var/tmp",
        help="parent of the fresh temporary directory used (default /var/tmp)",
    )
    p.add_argument("--seed", type=int, default=21, help="workload seed (default 21)")
    p.add_argument("--json", metavar="OUT", help="also write all results as JSON to OUT")
    p.add_argument(
        "--qbhub",
        metavar="CMD",
        help="qbhub command (default: qbhub next to this Python, else on PATH)",
    )
    p.add_argument("--skip-peers", action="store_true", help="run the native engine only")
    p.add_argument("--skip-native", action="store_true", help="run the peers only")
    p.add_argument("--skip-sparse", action="store_true", help="skip the sparse-volume case")
    p.add_argument(
        "--borg-engine",
        action="store_true",
        help="also run qbhub's Borg engine (plugins/borg_qrexec) beside native and plain borg",
    )
    p.add_argument(
        "--require-peers",
        action="store_true",
        help="fail (exit 2) instead of skipping a peer that is not installed",
    )
    p.add_argument(
        "--borg-chunker-params",
        metavar="PARAMS",
        help="borg --chunker-params, e.g. fixed,65536 (default: borg's own)",
    )
    p.add_argument(
        "--sparse-zeros",
        action="store_true",
        help="leave zero blocks as holes instead of writing zeros",
    )
    p.add_argument("--keep", action="store_true", help="keep the workdir (images, archives, logs)")
    args = p.parse_args(argv)
    args.nblocks = workload.parse_size(args.size) // workload.BLOCK
    if args.nblocks < 100:
        p.error("--size must be at least 100 blocks (6400 KiB) so that 1% is one block or more")
    return args


def select_runners(args: argparse.Namespace, root: Path) -> list[ToolRunner]:
    """The runners to use, in report order; exits 2 when a required tool is missing."""
    runners: list[ToolRunner] = []
    if not args.skip_native:
        runners.append(NativeRunner(root / "native", PASSPHRASE, qbhub_command(args.qbhub)))
    if args.borg_engine:
        runners.append(
            BorgEngineRunner(root / "borg-engine", PASSPHRASE, qbhub_command(args.qbhub))
        )
    if not args.skip_peers:
        runners += [
            BorgRunner(root / "borg", PASSPHRASE, args.borg_chunker_params),
            ResticRunner(root / "restic", PASSPHRASE),
        ]
    usable = []
    for r in runners:
        reason = r.missing()
        if reason is None:
            usable.append(r)
            continue
        if r.name == "native" or args.require_peers:
            print(f"ERROR: {reason}", file=sys.stderr)
            sys.exit(2)
        print(f"SKIPPING {r.name}: {reason}")
    return usable


def fail(outcome: Outcome, runner: ToolRunner, message: str) -> None:
    """Record a tool failure loudly."""
    outcome.failures.append(f"{runner.name}: {message}")
    print(f"\n!!! {runner.name} FAILED: {message}", file=sys.stderr)


def verify_restore(outcome: Outcome, runner: ToolRunner, restored: Path, expected: str) -> None:
    """Compare a restored image's content digest with the source's; record and print the result."""
    if not restored.exists():
        fail(outcome, runner, f"restore produced no file at {restored}")
        return
    actual = workload.content_digest(str(restored))
    exact = actual == expected
    outcome.checks.append(
        {
            "tool": runner.name,
            "expected": expected,
            "actual": actual,
            "status": "bit-exact" if exact else "MISMATCH",
        }
    )
    if exact:
        print(f"restore check {runner.name}: bit-exact (sha256 {actual[:16]})")
    else:
        message = f"restored image differs: sha256 {actual[:16]} != {expected[:16]}"
        print(f"\n!!! RESTORE MISMATCH {runner.name}: {message} !!!\n", file=sys.stderr)
        outcome.failures.append(f"{runner.name}: {message}")


def record(outcome: Outcome, runner: ToolRunner, result: StepResult) -> bool:
    """Store a step's result, with the bytes a backup added; False (and a failure) if it failed."""
    full = outcome.results.get("full backup", {}).get(runner.name)
    if result.step == "full backup":
        result.added = result.stored
    elif result.step == "incremental" and full is not None:
        result.added = result.stored - full.stored
    outcome.results.setdefault(result.step, {})[runner.name] = result
    print(f"  {runner.name:<7} {result.step:<12} {result.wall:7.2f} s  exit {result.returncode}")
    if not result.ok:
        tail = log_tail(result.log)
        fail(outcome, runner, f"{result.step} exited {result.returncode}; {result.log}:\n{tail}")
    return result.ok


def backup_step(
    outcome: Outcome, runner: ToolRunner, step: str, dropper: CacheDropper, image: Path
) -> bool:
    """A measured full or incremental backup; False when the tool failed."""
    command = runner.backup_command(image, "full" if step == "full backup" else "incr")
    return record(outcome, runner, runner.run_step(step, command, dropper))


def restore_step(
    outcome: Outcome,
    runner: ToolRunner,
    dropper: CacheDropper,
    image: Path,
    scratch: Path,
    expected: str,
) -> bool:
    """A measured restore of the latest backup into a fresh directory, then its bit-exact check."""
    target = scratch / f"restore-{runner.name}"
    target.mkdir(parents=True, exist_ok=True)
    command, restored = runner.restore_command(image, "incr", target)
    try:
        if not record(outcome, runner, runner.run_step("restore", command, dropper)):
            return False
        verify_restore(outcome, runner, restored, expected)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    return True


def run_case(
    runners: list[ToolRunner],
    image: Path,
    layout: workload.Layout,
    args: argparse.Namespace,
    dropper: CacheDropper,
    scratch: Path,
) -> Outcome:
    """Build the image, then full backup, mutate, incremental and restore for every runner."""
    outcome = Outcome()
    started = time.perf_counter()
    workload.write_image(str(image), args.seed, layout, args.sparse_zeros)
    print(
        f"built {image} ({layout.file_size / 2**30:.1f} GiB file, {layout.nblocks} data blocks)"
        f" in {time.perf_counter() - started:.1f} s"
    )
    active = []
    for r in runners:
        try:
            r.prepare()
            active.append(r)
        except RuntimeError as exc:
            fail(outcome, r, str(exc))
    active = [r for r in active if backup_step(outcome, r, "full backup", dropper, image)]
    rewritten = workload.mutate(str(image), args.seed, layout)
    print(f"mutated {rewritten // workload.BLOCK} blocks ({rewritten / 2**20:.1f} MiB)")
    active = [r for r in active if backup_step(outcome, r, "incremental", dropper, image)]
    expected = workload.content_digest(str(image))
    for r in active:
        restore_step(outcome, r, dropper, image, scratch, expected)
    return outcome


def print_results(title: str, outcome: Outcome) -> None:
    """One table per step."""
    print(f"\n##### {title}")
    for step in report.STEPS:
        if step in outcome.results:
            print(report.step_table(step, list(outcome.results[step].values())))


def ratio_rows(outcome: Outcome) -> list[dict[str, object]]:
    """native/peer ratios for every step where both ran; printed as they are computed."""
    rows: list[dict[str, object]] = []
    print()
    for step in report.STEPS:
        by_tool = outcome.results.get(step, {})
        native = by_tool.get("native")
        for peer in ("restic", "borg"):
            if native is None or peer not in by_tool:
                continue
            row = report.ratio_row(step, native, by_tool[peer])
            print(report.ratio_line(step, peer, row))
            rows.append({"step": step, "peer": peer, **row})
    return rows


def sparse_case(args: argparse.Namespace, dropper: CacheDropper, root: Path) -> Outcome | None:
    """The native engine alone on the same data spread over a large sparse volume."""
    if args.skip_sparse or args.skip_native:
        return None
    volume = workload.parse_size(args.sparse_volume)
    layout = workload.Layout.sparse(args.nblocks, volume)
    runner = NativeRunner(root / "native-sparse", PASSPHRASE, qbhub_command(args.qbhub))
    print(f"\n##### sparse case: native only, {volume / 2**30:.0f} GiB volume")
    outcome = run_case([runner], root / "sparse.img", layout, args, dropper, root)
    print_results(f"native on a {volume / 2**30:.0f} GiB sparse volume", outcome)
    return outcome


def write_json(
    path: str,
    args: argparse.Namespace,
    versions: dict[str, str],
    cases: dict[str, Outcome],
    ratios: list[dict[str, object]],
    found: list[report.Target],
) -> None:
    """All measurements and verdicts as one JSON document."""
    doc = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "versions": versions,
        "cases": {
            name: {
                "steps": [
                    {**asdict(r), "cpu": r.cpu, "peak_rss": r.peak_rss}
                    for tools in o.results.values()
                    for r in tools.values()
                ],
                "checks": o.checks,
                "failures": o.failures,
            }
            for name, o in cases.items()
        },
        "ratios": ratios,
        "targets": [asdict(t) for t in found],
    }
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def benchmark(args: argparse.Namespace, root: Path) -> int:
    """Both cases, the tables, ratios and targets; returns the exit status."""
    runners = select_runners(args, root)
    dropper = CacheDropper()
    versions = {r.name: r.version() for r in runners}
    print(
        f"workdir {root}; seed {args.seed}; image {args.nblocks * workload.BLOCK / 2**30:.2f} "
        f"GiB ({args.nblocks} blocks of 64 KiB: 40% random, 30% zero, 30% text)"
    )
    for name, version in versions.items():
        print(f"  {name}: {version}")
    image = root / "image.img"
    dense = run_case(runners, image, workload.Layout.dense(args.nblocks), args, dropper, root)
    print_results("dense image (incremental = full scan)", dense)
    ratios = ratio_rows(dense)
    if not args.keep:
        image.unlink(missing_ok=True)
        for r in runners:
            r.remove_archive()
    sparse = sparse_case(args, dropper, root)
    cases = {"dense": dense} | ({"sparse": sparse} if sparse else {})
    sparse_native = {s: t["native"] for s, t in sparse.results.items()} if sparse else {}
    found = report.targets(dense.results, sparse_native, args.nblocks * workload.BLOCK)
    print()
    for target in found:
        print(target.line())
    if args.json:
        write_json(args.json, args, versions, cases, ratios, found)
    noisy = [r for o in cases.values() for t in o.results.values() for r in t.values() if r.noisy]
    if noisy:
        print(
            f"WARNING: {len(noisy)} steps ran while other processes used more than "
            f"{NOISE_SHARE:.0%} of a CPU on average (column 'other s'): their times and ratios "
            "are not reliable"
        )
    failures = [f for o in cases.values() for f in o.failures]
    for failure in failures:
        print(f"FAILURE {failure.splitlines()[0]}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark in a fresh workdir; see the module docstring for the exit status."""
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="qbhub-bench-", dir=args.workdir))
    try:
        return benchmark(args, root)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
