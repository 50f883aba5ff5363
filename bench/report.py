"""Tables, native/peer ratios and the issue's targets, computed from measured steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from measure import StepResult

MIB = 1 << 20
MB = 1_000_000
STEPS = ("full backup", "incremental", "restore")
RSS_LIMIT = 150 * MIB
SPARSE_RSS = "peak RSS <= 150 MiB on the sparse volume"


@dataclass(frozen=True)
class Target:
    """One target of the issue and whether this run met it."""

    name: str
    status: str  # PASS, FAIL or N/A
    detail: str

    def line(self) -> str:
        """``TARGET <name>: PASS (detail)``."""
        return f"TARGET {self.name}: {self.status} ({self.detail})"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:.1f}"


def step_table(title: str, results: Sequence[StepResult]) -> str:
    """A fixed-width table of every tool's cost for one step."""
    header = (
        f"{'tool':<8} {'wall s':>8} {'cpu s':>8} {'user s':>8} {'sys s':>7} "
        f"{'RSS MiB':>8} {'tree MiB':>8} {'stored MB':>10} {'added MB':>9} {'cache MB':>9} "
        f"{'other s':>7}"
    )
    lines = [f"== {title} ==", header, "-" * len(header)]
    for r in results:
        status = "" if r.ok else f"  FAILED (exit {r.returncode}, log {r.log})"
        lines.append(
            f"{r.tool:<8} {r.wall:8.2f} {r.cpu:8.2f} {r.user:8.2f} {r.sys:7.2f} "
            f"{r.maxrss / MIB:8.1f} {r.tree_pss / MIB:8.1f} {_mb(r.stored):>10} "
            f"{_mb(r.added):>9} {_mb(r.cache):>9} {r.other_cpu:7.2f}{' NOISY' * r.noisy}{status}"
        )
    lines += [f"  {r.tool}: {note}" for r in results for note in r.notes]
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratio_row(step: str, native: StepResult, peer: StepResult) -> dict[str, float | None]:
    """native/peer ratios of wall, CPU, peak RSS and (for backups) bytes added."""
    row = {
        "wall": _ratio(native.wall, peer.wall),
        "cpu": _ratio(native.cpu, peer.cpu),
        "peak_rss": _ratio(native.peak_rss, peer.peak_rss),
    }
    if step != "restore":
        row["added"] = _ratio(native.added, peer.added)
    return row


def ratio_line(step: str, peer: str, row: dict[str, float | None]) -> str:
    """``ratio native/restic full backup: wall 0.45  cpu 0.80 ...``."""
    cells = "  ".join(f"{key} {'n/a' if v is None else f'{v:.2f}'}" for key, v in row.items())
    return f"ratio native/{peer:<6} {step:<12}: {cells}"


def _wall_target(
    name: str, native: StepResult | None, restic: StepResult | None, limit: float
) -> Target:
    """native wall time at most ``limit`` × restic's."""
    if native is None or not native.ok:
        return Target(name, "N/A", "no successful native run")
    if restic is None or not restic.ok:
        return Target(name, "N/A", "no successful restic run to compare with")
    ratio = native.wall / restic.wall
    status = "PASS" if ratio <= limit else "FAIL"
    detail = f"native {native.wall:.2f} s / restic {restic.wall:.2f} s = {ratio:.2f}, limit {limit}"
    if native.noisy or restic.noisy:
        detail += "; NOISY: other load during these steps, rerun on a quiet machine"
    return Target(name, status, detail)


def _rss_target(name: str, steps: list[StepResult], baseline: StepResult | None = None) -> Target:
    """Peak RSS of every native step at most RSS_LIMIT; ``baseline`` is shown for comparison."""
    ran = [r for r in steps if r.ok]
    if not ran:
        return Target(name, "N/A", "no successful native run")
    worst = max(ran, key=lambda r: r.peak_rss)
    status = "PASS" if worst.peak_rss <= RSS_LIMIT else "FAIL"
    detail = f"peak {worst.peak_rss / MIB:.1f} MiB in {worst.step}"
    if baseline is not None:
        detail += f" vs {baseline.peak_rss / MIB:.1f} MiB on the dense image"
    return Target(name, status, f"{detail}, limit {RSS_LIMIT / MIB:.0f} MiB")


def targets(
    dense: dict[str, dict[str, StepResult]], sparse: dict[str, StepResult], image_size: int
) -> list[Target]:
    """Evaluate the issue's targets: ``dense[step][tool]``, ``sparse[step]`` (native only)."""

    def get(step: str, tool: str) -> StepResult | None:
        return dense.get(step, {}).get(tool)

    found = [
        _wall_target(
            f"{step} wall <= {limit} x restic", get(step, "native"), get(step, "restic"), limit
        )
        for step, limit in (("full backup", 0.5), ("incremental", 0.5), ("restore", 0.75))
    ]
    incr = get("incremental", "native")
    if incr is None or not incr.ok or incr.added is None:
        found.append(Target("incremental adds <= 1.5% of image", "N/A", "no native incremental"))
    else:
        share = incr.added / image_size
        found.append(
            Target(
                "incremental adds <= 1.5% of image",
                "PASS" if share <= 0.015 else "FAIL",
                f"{incr.added / MB:.1f} MB = {share:.2%} of {image_size / MB:.0f} MB",
            )
        )
    native_dense = [r for step in STEPS if (r := get(step, "native")) is not None]
    found.append(_rss_target("peak RSS <= 150 MiB", native_dense))
    if sparse:
        dense_peak = max((r for r in native_dense if r.ok), key=lambda r: r.peak_rss, default=None)
        found.append(_rss_target(SPARSE_RSS, list(sparse.values()), dense_peak))
    else:
        found.append(Target(SPARSE_RSS, "N/A", "sparse case skipped"))
    return found
