"""`qbhub demo`: the main job, VM by VM, on a throw-away LocalPlatform, for a newcomer.

Everything happens under --workdir (default `$QBHUB_HOME/demo`, emptied first), never on the
user's own platform: a LocalPlatform there gets a few sample VMs (a template, a net VM, a work
AppVM with a dense private volume, a DispVM, and a backup VM whose storage agent holds the
archive, `qubes://backup/demo`). The demo backs up `--all` (the backup VM excluded, DispVMs
skipped), changes some data, backs up again (incremental), restores the work VM under a new name
on the same platform, then carries the archive directory to a second, empty platform and
restores everything there from it, given only the passphrase. Every restored volume is compared
bit for bit (SHA-256) and every VM's settings exactly; it prints what it did with sizes and
times and fails (exit 1) if anything differs. It uses the functions `qbhub backup` and
`qbhub restore` use: `hub_backup.choose_vms` / `backup_vms` and `hub_restore.restore_vms`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click

from ..engine import Engine, EngineContext
from ..errors import QbhubError
from ..jobs.backup import backup_vms, choose_vms
from ..jobs.restore import RestoreRequest, restore_vms
from ..passphrase import PassphraseSource
from ..platform.base import VMSettings
from ..platform.local.platform import LocalPlatform
from ..progress import Progress, human_bytes
from ..registry import Registry
from ..safety.rollback import default_home
from ..store.base import Store
from ..store.local import LocalDirStore
from ..store.qrexec import QrexecStore
from .context import cli_state

BLOCK = 64 * 1024
MIB = 1 << 20
DEMO_PASSPHRASE = b"qbhub demo passphrase"
BACKUP_VM, ARCHIVE = "backup", "demo"
T = TypeVar("T")


def sha256_file(path: Path | str) -> str:
    """The SHA-256 of a file's content, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def make_private_volume(path: Path | str, rng: random.Random) -> None:
    """Fill the volume densely: random, zero and text-like 64 KiB blocks, like a used /home."""
    words = [f"w{i}".encode() for i in range(500)]
    blocks = os.path.getsize(path) // BLOCK
    with open(path, "r+b") as f:
        for _ in range(blocks):
            kind = rng.random()
            if kind < 0.4:
                f.write(rng.randbytes(BLOCK))
            elif kind < 0.7:
                f.seek(BLOCK, os.SEEK_CUR)
            else:
                f.write(b" ".join(rng.choices(words, k=BLOCK // 3))[:BLOCK].ljust(BLOCK, b"."))


def change_blocks(path: Path | str, count: int, rng: random.Random) -> None:
    """Overwrite `count` random 64 KiB blocks of the volume with fresh random data."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for _ in range(count):
            f.seek(rng.randrange(size // BLOCK) * BLOCK)
            f.write(rng.randbytes(BLOCK))
        f.flush()
        os.fsync(f.fileno())


def volume_path(platform: LocalPlatform, vm: str, volume: str) -> str:
    """The file behind `vm`'s volume `volume`."""
    return next(v.path for v in platform.vm_volumes(vm) if v.name == volume)


def make_sample_vms(platform: LocalPlatform, size_mib: int, rng: random.Random) -> None:
    """Create the sample VMs (if the platform has none) and write data into their volumes."""
    if len(platform.list_vms()) > 1:
        return
    small = max(4, size_mib // 8) * MIB

    def create(name: str, klass: str, size: int, **properties: str) -> None:
        platform.create_vm(VMSettings(name, klass, properties=properties), size=size)

    create("fedora", "TemplateVM", 2 * size_mib * MIB, label="black")
    create("sys-net", "AppVM", small, label="red", template="fedora")
    create("work", "AppVM", size_mib * MIB, label="blue", template="fedora")
    create("work-dvm", "DispVM", small, label="red", template="work")
    create(BACKUP_VM, "AppVM", small, label="gray", template="fedora")
    platform.update_vm("sys-net", properties={"provides_network": True})
    platform.update_vm(
        "work",
        properties={"netvm": "sys-net", "memory": 800, "vcpus": 2},
        features={"service.cups": "1"},
        tags=["demo", "important"],
    )
    make_private_volume(volume_path(platform, "work", "private"), rng)
    change_blocks(volume_path(platform, "fedora", "root"), max(16, size_mib // 4), rng)
    change_blocks(volume_path(platform, "sys-net", "private"), 4, rng)


def fingerprint(platform: LocalPlatform, names: list[str]) -> dict[str, Any]:
    """Settings and volume hashes of the VMs `names`: what a restore must reproduce."""
    return {
        name: {
            "settings": {
                k: v for k, v in asdict(platform.vm_settings(name)).items() if k != "name"
            },
            "volumes": {v.name: (v.size, sha256_file(v.path)) for v in platform.vm_volumes(name)},
        }
        for name in names
    }


def compare(
    kind: str, expected: dict[str, Any], got: dict[str, Any], renames: dict[str, str]
) -> list[dict[str, Any]]:
    """One check per volume (bit-exact) and per VM (same settings), `renames` applied to `got`."""
    checks: list[dict[str, Any]] = []
    for name, want in expected.items():
        new = renames.get(name, name)
        have = got.get(new, {"settings": None, "volumes": {}})
        for volume, (size, digest) in want["volumes"].items():
            same = have["volumes"].get(volume) == (size, digest)
            checks.append(
                {"kind": kind, "vm": new, "volume": volume, "size": size, "bit_exact": same}
            )
        settings = dict(want["settings"])
        settings["properties"] = {k: renames.get(v, v) for k, v in settings["properties"].items()}
        checks.append(
            {
                "kind": kind,
                "vm": new,
                "volume": None,
                "size": 0,
                "bit_exact": have["settings"] == settings,
            }
        )
    return checks


@contextmanager
def opened(store: Store) -> Iterator[Store]:
    """`store`, closed afterwards (a qubes:// store stops its storage agent)."""
    try:
        yield store
    finally:
        store.close()


class Steps:
    """The demo's timed steps, for the report; each is announced as it starts (`say`)."""

    def __init__(self, say: Callable[[str], None] = lambda line: None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.say = say

    def run(self, step: str, func: Callable[[], T], detail: Callable[[T], str]) -> T:
        """Run `func`, record how long it took and a one-line `detail` of its result."""
        self.say(f"qbhub demo: {step} ...")
        start = time.monotonic()
        result = func()
        seconds = round(time.monotonic() - start, 2)
        self.rows.append({"step": step, "seconds": seconds, "detail": detail(result)})
        return result


def disk_usage(path: Path) -> int:
    """Bytes `path` really occupies on disk (sparse files count what they hold)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def backup_detail(result: dict[str, Any]) -> str:
    read = sum(v["bytes_read"] for v in result["volumes"])
    size = sum(v["size"] for v in result["volumes"])
    return (
        f"{len(result['vms'])} VMs, {len(result['volumes'])} volumes ({human_bytes(size)}): "
        f"read {human_bytes(read)}, stored {human_bytes(result['bytes_stored'])}"
    )


def restore_detail(result: dict[str, Any]) -> str:
    return f"{', '.join(result['vms'])}: {human_bytes(result['bytes_imported'])} imported" + (
        f", {len(result['settings_failed'])} settings not applied"
        if result["settings_failed"]
        else ""
    )


def demo_engine(registry: Registry, state_dir: Path, progress: Progress | None = None) -> Engine:
    """The native engine with the demo passphrase and its own local state (not the user's)."""
    context = EngineContext(
        hook=registry.pm.hook,
        passphrase=PassphraseSource(env_var=None, value=DEMO_PASSPHRASE),
        state_dir=state_dir,
        progress=progress or Progress(enabled=False),
    )
    return registry.engine("native").create(context)


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
    help="Size of the work VM's dense private volume (the template's root is twice that).",
)
@click.option("--json", "json_output", is_flag=True, help="Print machine-readable JSON.")
@click.option("--clean", is_flag=True, help="Remove the scratch directory of an earlier demo.")
def demo(workdir: Path | None, size_mib: int, json_output: bool, clean: bool) -> None:
    """Back up sample VMs, change them, back up again, restore, and check it all bit-exact.

    Everything happens in a scratch directory (--workdir, default $QBHUB_HOME/demo: about
    three times --size-mib MiB per platform, plus the archive), never on your own VMs; the
    next demo empties it, and `qbhub demo --clean` removes it.
    """
    state = cli_state(json_output)
    workdir = (workdir or default_home() / "demo").absolute()
    if clean:
        freed = disk_usage(workdir) if workdir.exists() else 0
        if workdir.exists():
            shutil.rmtree(workdir)
        click.echo(f"removed {workdir} ({human_bytes(freed)})")
        return
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    terminal = not json_output

    def say(line: str) -> None:
        if terminal:
            click.echo(line, err=True)

    say(f"qbhub demo: working in {workdir} (removed by `qbhub demo --clean`)")
    registry, hook = state.registry, state.registry.pm.hook
    source = LocalPlatform(workdir / "platform")
    empty = LocalPlatform(workdir / "empty-platform")
    bars = Progress(enabled=None if terminal else False)
    engine = demo_engine(registry, workdir / "state", bars)
    rng = random.Random(858)
    steps = Steps(say)

    def agent_store() -> Store:
        return QrexecStore(BACKUP_VM, ARCHIVE, lambda: source)

    def backup() -> dict[str, Any]:
        names = choose_vms(source, [], True, [BACKUP_VM])
        with opened(agent_store()) as store:
            return backup_vms(source, engine, store, hook, names)

    def restore(platform: LocalPlatform, store: Store, request: RestoreRequest) -> dict[str, Any]:
        with opened(store):
            engine = demo_engine(registry, platform.home)
            request = dataclasses.replace(request, progress=bars)
            return restore_vms(platform, store, hook, engine, request)

    steps.run(
        "create sample VMs",
        lambda: make_sample_vms(source, size_mib, rng),
        lambda _: ", ".join(vm.name for vm in source.list_vms()[1:]),
    )
    with opened(agent_store()) as store:
        steps.run(
            "init archive",
            lambda: engine.init_archive(store, encryption=True),
            lambda r: f"qubes://{BACKUP_VM}/{ARCHIVE}, encryption {r['encryption']}",
        )
    full = steps.run("full backup --all", backup, backup_detail)
    skipped = [vm.name for vm in source.list_vms()[1:] if vm.name not in full["vms"]]
    steps.run("change data", lambda: change_some_data(source, size_mib, rng), lambda d: d)
    incremental = steps.run("incremental backup --all", backup, backup_detail)
    expected = fingerprint(source, incremental["vms"])

    renamed = RestoreRequest(vms=["work"], renames={"work": "work-restored"})
    steps.run(
        "restore work as work-restored",
        lambda: restore(source, agent_store(), renamed),
        restore_detail,
    )
    archive_dir = source.vm_home(BACKUP_VM) / "qbhub-archives" / ARCHIVE
    steps.run(
        "restore all onto an empty platform",
        lambda: restore(empty, LocalDirStore(archive_dir), RestoreRequest(vms=[], all_vms=True)),
        restore_detail,
    )
    checks = compare(
        "restore-renamed",
        {"work": expected["work"]},
        fingerprint(source, ["work-restored"]),
        renamed.renames,
    )
    names = [vm.name for vm in empty.list_vms()[1:]]
    checks += compare("restore-all", expected, fingerprint(empty, names), {})
    if sorted(names) != sorted(expected):
        checks.append(
            {
                "kind": "restore-all",
                "vm": "(set of VMs)",
                "volume": None,
                "size": 0,
                "bit_exact": False,
            }
        )
    with opened(LocalDirStore(archive_dir)) as store:
        steps.run(
            "verify archive",
            lambda: engine.verify(store, quick=False),
            lambda r: f"{r['blobs_verified']} blobs authenticated and re-hashed",
        )
    report = {
        "workdir": str(workdir),
        "workdir_bytes": disk_usage(workdir),
        "archive": f"qubes://{BACKUP_VM}/{ARCHIVE} ({archive_dir})",
        "sessions": [full["session"], incremental["session"]],
        "skipped": skipped,
        "steps": steps.rows,
        "checks": checks,
    }
    state.emit(report, demo_text)
    if not all(c["bit_exact"] for c in checks):
        raise QbhubError("a restore did not reproduce the original exactly (see above)")


def change_some_data(platform: LocalPlatform, size_mib: int, rng: random.Random) -> str:
    """Overwrite about 1% of the work VM's private volume and a few template blocks."""
    work_blocks = max(1, size_mib * 16 // 100)
    change_blocks(volume_path(platform, "work", "private"), work_blocks, rng)
    change_blocks(volume_path(platform, "fedora", "root"), 8, rng)
    return f"{human_bytes((work_blocks + 8) * BLOCK)} rewritten in work:private, fedora:root"


def demo_text(report: dict[str, Any]) -> str:
    """The report as a table: steps with times, then one line per check."""
    lines = [
        f"qbhub demo in {report['workdir']} ({human_bytes(report['workdir_bytes'])} on disk; "
        "`qbhub demo --clean` removes it)",
        f"  archive {report['archive']}; sessions {', '.join(report['sessions'])}; "
        f"not backed up: {', '.join(report['skipped'])} (the backup VM itself, DispVMs)",
        "",
        f"  {'step':<36} {'time':>8}  what",
    ]
    for step in report["steps"]:
        lines.append(f"  {step['step']:<36} {step['seconds']:6.2f} s  {step['detail']}")
    lines += ["", f"  {'check':<16} {'VM':<16} {'what':<10} {'size':>10}  result"]
    for check in report["checks"]:
        what = check["volume"] or "settings"
        verdict = "MISMATCH"
        if check["bit_exact"]:
            verdict = "bit-exact" if check["volume"] else "identical"
        size = human_bytes(check["size"]) if check["volume"] else ""
        lines.append(f"  {check['kind']:<16} {check['vm']:<16} {what:<10} {size:>10}  {verdict}")
    return "\n".join(lines)
