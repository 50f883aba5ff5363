"""`qbhub demo`: the main job on the embedded default, for a newcomer, in about a minute.

Makes sample volumes in a scratch directory, creates a local encrypted archive, runs a full and
an incremental backup, restores the newest and the older version, checks both bit-exact against
what was backed up, verifies the archive, and prints what it did with sizes and times.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import click

from ..engine import Engine, VolumeSource
from ..errors import QbhubError
from ..progress import human_bytes
from ..state import default_home
from .context import cli_state

BLOCK = 64 * 1024
DEMO_PASSPHRASE = "qbhub demo passphrase"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def make_private_volume(path: Path, blocks: int, rng: random.Random) -> None:
    """A dense image: random, zero and text-like 64 KiB blocks, like a VM's private volume."""
    words = [f"w{i}".encode() for i in range(500)]
    with open(path, "wb") as f:
        for _ in range(blocks):
            kind = rng.random()
            if kind < 0.4:
                f.write(rng.randbytes(BLOCK))
            elif kind < 0.7:
                f.write(bytes(BLOCK))
            else:
                f.write(b" ".join(rng.choices(words, k=BLOCK // 3))[:BLOCK].ljust(BLOCK, b"."))


def make_sparse_volume(path: Path, size: int, data_blocks: int, rng: random.Random) -> None:
    """A mostly empty image with data scattered through it, like a fresh VM's root volume."""
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(data_blocks):
            f.seek(rng.randrange(size // BLOCK) * BLOCK)
            f.write(rng.randbytes(BLOCK))


def change_blocks(path: Path, count: int, rng: random.Random) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(count):
            f.seek(rng.randrange(size // BLOCK) * BLOCK)
            f.write(rng.randbytes(BLOCK))
        f.flush()
        os.fsync(f.fileno())


def timed(step: list[dict[str, Any]], name: str, func: Any, *args: Any, **kwargs: Any) -> Any:
    start = time.monotonic()
    result = func(*args, **kwargs)
    step.append({"step": name, "seconds": round(time.monotonic() - start, 2), "result": result})
    return result


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Scratch directory (default: $QBHUB_HOME/demo); emptied first.",
)
@click.option(
    "--size-mib",
    type=click.IntRange(4, 65536),
    default=256,
    show_default=True,
    help="Size of the dense sample volume.",
)
@click.option("--json", "json_output", is_flag=True, help="Print machine-readable JSON.")
def demo(workdir: Path | None, size_mib: int, json_output: bool) -> None:
    """Run the main job end to end on local files and check every restore bit-exact."""
    state = cli_state(json_output)
    workdir = workdir or default_home() / "demo"
    if workdir.exists():
        shutil.rmtree(workdir)
    volumes_dir, restore_dir = workdir / "volumes", workdir / "restored"
    volumes_dir.mkdir(parents=True)
    restore_dir.mkdir()
    passfile = workdir / "passphrase"
    passfile.write_text(DEMO_PASSPHRASE + "\n")
    rng = random.Random(858)
    private, root = volumes_dir / "work-private.img", volumes_dir / "work-root.img"
    make_private_volume(private, size_mib * 1024 * 1024 // BLOCK, rng)
    make_sparse_volume(root, 4 << 30, 256, rng)

    engine: Engine = state.engine("native", passfile)
    store = state.store(str(workdir / "archive"))
    sources = [VolumeSource("work-private", str(private)), VolumeSource("work-root", str(root))]
    steps: list[dict[str, Any]] = []
    timed(steps, "init", engine.init_archive, store, encryption=True)
    original = {"work-private": sha256_file(private), "work-root": sha256_file(root)}
    full = timed(steps, "full backup", engine.backup, store, sources)
    change_blocks(private, max(1, size_mib * 16 // 100), rng)  # about 1% of the blocks
    change_blocks(root, 8, rng)
    changed = {"work-private": sha256_file(private), "work-root": sha256_file(root)}
    timed(steps, "incremental backup", engine.backup, store, sources)
    checks = []
    for name, expected in changed.items():
        out = restore_dir / f"{name}.latest.img"
        timed(
            steps,
            f"restore {name}",
            engine.restore_volume,
            store,
            name,
            out,
            session=None,
            overwrite=False,
        )
        checks.append({"restore": f"{name} (newest)", "bit_exact": sha256_file(out) == expected})
    out = restore_dir / "work-private.first.img"
    timed(
        steps,
        "restore work-private (first session)",
        engine.restore_volume,
        store,
        "work-private",
        out,
        session=full["session"],
        overwrite=False,
    )
    checks.append(
        {
            "restore": "work-private (first session)",
            "bit_exact": sha256_file(out) == original["work-private"],
        }
    )
    timed(steps, "verify", engine.verify, store, quick=False)
    report = {"workdir": str(workdir), "steps": steps, "checks": checks}
    state.emit(report, demo_text)
    if not all(c["bit_exact"] for c in checks):
        raise QbhubError("a restore was not bit-exact (see above)")


def demo_text(report: dict[str, Any]) -> str:
    lines = [f"qbhub demo in {report['workdir']}", ""]
    for step in report["steps"]:
        result = step["result"]
        detail = ""
        if "volumes" in result:
            detail = ", ".join(
                f"{v['name']}: read {human_bytes(v['bytes_read'])}, "
                f"stored {human_bytes(v['bytes_stored'])}"
                for v in result["volumes"]
            )
        elif "bytes_written" in result:
            size, data = human_bytes(result["size"]), human_bytes(result["bytes_written"])
            detail = f"{size} volume, {data} of data"
        elif "blobs_verified" in result:
            detail = f"{result['blobs_verified']} blobs authenticated and re-hashed"
        lines.append(f"  {step['step']:<38} {step['seconds']:6.2f} s  {detail}")
    lines.append("")
    for check in report["checks"]:
        verdict = "bit-exact" if check["bit_exact"] else "MISMATCH"
        lines.append(f"  restore {check['restore']:<32} {verdict}")
    return "\n".join(lines)
