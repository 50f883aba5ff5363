"""Benchmark: LVM thin incrementals in the test VM (tests/testvm/): thin_delta, full scan, restic.

In a VM with device-mapper (KVM when available), on a pool laid out as Qubes lays it out
(qubes_dom0/vm-pool, 64 KiB chunks), an 8 GiB thin volume holding the `workload.py` blocks
(zero blocks left unmapped: 5.6 GiB of data). Full backups first (native, restic; not compared),
then per step a fresh 1% of the 64 KiB blocks rewritten at random (`workload.mutate`), caches
dropped in the VM (its disk is opened with cache=none, so the host caches nothing either), and:

    - native incremental, lvm-thin change detection (`qbhub volume backup`, the real CLI)
    - native incremental, full scan (`qbhub volume backup --no-snapshot`)
    - restic incremental of the same device (`restic backup --stdin`)

Then the cost of thin_delta itself (metadata snapshot reserve, thin_delta, release, parse) for
that 8 GiB pair, and again, with the whole lvm-thin incremental, after the pool got --volumes
more thin volumes (8 MiB written in each): what a Qubes pool with many VMs costs.

    sudo .venv/bin/python bench/bench_lvm.py [--size 8GiB] [--volumes 200]

LVM runs with the test VM's lvmlocal.conf (`testvm.fixture.LVM_LOCAL_CONF`: no udev sync, no
metadata backups, no dmeventd), so an LVM command costs what LVM itself does rather than udev's
rules under emulation; new archives use the tests' cheap KDF (`vm.GUEST_ENV`), so a command's
time is its work, not scrypt. Without usable KVM the VM runs under TCG (QBHUB_TESTVM_ACCEL=tcg):
every figure is then that of an emulated CPU, several times slower than the hardware; the ratios
are what carries over.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from testvm import vm as testvm
from testvm.fixture import LVM_LOCAL_CONF
from workload import parse_size

VG, POOL, LV = "qubes_dom0", "vm-pool", "vm-bench-private"
DEV = f"/dev/{VG}/{LV}"
PY = "python3 -c"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8GiB")
    ap.add_argument("--volumes", type=int, default=200)
    ap.add_argument(
        "--delta-only", action="store_true", help="only thin_delta (no restic, no full scan)"
    )
    args = ap.parse_args()
    size = parse_size(args.size)
    reason = testvm.unavailable_reason()
    if reason:
        sys.exit(f"bench_lvm: {reason}")
    disk_gib = 2 * size // (1 << 30) + 24
    vm = testvm.TestVM(testvm.image_dir(), memory_mib=3072, cpus=2, disks_gib=(disk_gib,),
                       disk_cache="none")  # fmt: skip
    vm.start()
    print(f"VM: {vm.accel}, 2 vCPUs, 3 GiB; volume {size / (1 << 30):g} GiB", flush=True)
    try:
        run(vm, size, args.volumes, args.delta_only)
    finally:
        vm.stop()


def timed(vm: testvm.TestVM, label: str, cmd: str, results: dict[str, float]) -> str:
    vm.run("sync; echo 3 > /proc/sys/vm/drop_caches")
    r = vm.run(cmd, timeout=3600)
    results[label] = r.secs
    print(f"  {label:<52} {r.secs:8.2f} s", flush=True)
    return r.stdout


def run(vm: testvm.TestVM, size: int, volumes: int, delta_only: bool = False) -> None:
    pool_size = size // (1 << 20) + 4096 + volumes * 16
    vm.run(f"cat > /etc/lvm/lvmlocal.conf <<'EOF'\n{LVM_LOCAL_CONF}EOF")
    vm.run(f"python3 /mnt/qbhub/tests/testvm/qubes_lvm.py setup-pool {VG} {POOL} /dev/vdb "
           f"{pool_size}M\n"
           f"lvcreate --quiet --size {2 * size // (1 << 20) + 2048}M --name archive {VG}\n"
           f"mkfs.ext4 -q /dev/{VG}/archive && mount /dev/{VG}/archive /srv\n"
           f"python3 /mnt/qbhub/tests/testvm/qubes_lvm.py create {VG}/{LV} {size}")  # fmt: skip
    nblocks = size // (64 * 1024)
    t = time.monotonic()
    vm.run(f"""cd /mnt/qbhub/bench && python3 - <<'PY'
import os, workload
fd = os.open("{DEV}", os.O_WRONLY)
for index, kind, data in workload.iter_blocks(1, {nblocks}):
    if kind != workload.ZERO:
        os.pwrite(fd, data, index * workload.BLOCK)
os.fsync(fd)
PY""", timeout=3600)  # fmt: skip
    print(f"  workload written in {time.monotonic() - t:.1f} s")
    layout = f"workload.Layout.dense({nblocks})"
    mutate = "cd /mnt/qbhub/bench && python3 -c 'import workload; workload.mutate("
    mutate += f'"{DEV}", {{seed}}, {layout})\''
    restic = f"restic backup --quiet --stdin --stdin-filename bench.img < {DEV}"
    qb = "python3 -m qubes_backup_hub"
    env = "export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=/srv/restic; "
    res: dict[str, float] = {}
    vm.run(f"{qb} init --dest /srv/native && {env} restic init --quiet")
    timed(vm, "native full backup (lvm-thin, first view)",
          f"{qb} volume backup --dest /srv/native {DEV}=bench", res)  # fmt: skip
    if not delta_only:
        compare(vm, qb, env, restic, mutate, res)
    delta(vm, qb, mutate, volumes, res, delta_only)


def compare(
    vm: testvm.TestVM, qb: str, env: str, restic: str, mutate: str, res: dict[str, float]
) -> None:
    timed(vm, "restic full backup",
          f"{env} {restic}", res)  # fmt: skip
    print("incrementals, 1% of the 64 KiB blocks rewritten before each:")
    vm.run(mutate.format(seed=11))
    out = timed(vm, "native incremental, lvm-thin (thin_delta)",
                f"{qb} volume backup --json --dest /srv/native {DEV}=bench", res)  # fmt: skip
    entry = json.loads(out)["volumes"][0]
    print(f"    provider {entry['provider']}, read {entry['bytes_read'] / (1 << 20):.1f} MiB")
    vm.run(mutate.format(seed=12))
    timed(vm, "native incremental, full scan (--no-snapshot)",
          f"{qb} volume backup --no-snapshot --dest /srv/native {DEV}=bench", res)  # fmt: skip
    vm.run(mutate.format(seed=13))
    timed(vm, "restic incremental",
          f"{env} {restic}", res)  # fmt: skip
    # The full scan moved the archive past the kept view: one lvm-thin backup re-bases it.
    vm.run(f"{qb} volume backup --dest /srv/native {DEV}=bench")


def delta(
    vm: testvm.TestVM, qb: str, mutate: str, volumes: int, res: dict[str, float], only: bool
) -> None:
    delta_cmd = f"""python3 - <<'PY'
import json, time
from qubes_backup_hub.snapshot import VolumeRef
from qubes_backup_hub.snapshots.thin import LvmThinProvider
from qubes_backup_hub.snapshots.qubeslvm import parse_lvs, lvs_argv
p = LvmThinProvider(VolumeRef("bench", "{DEV}"), "/root/qbhub-home/thin-views")
t = parse_lvs(p.runner.run(lvs_argv("{VG}")))
kept = [n for n in t if n.startswith("{LV}-qbk")][0]
p.runner.run(["lvcreate", "--quiet", "--snapshot", "--name", "bench-new", "{VG}/{LV}"])
t0 = time.monotonic()
new = parse_lvs(p.runner.run(lvs_argv("{VG}/bench-new")))["bench-new"]
ranges = p.thin_delta("{POOL}", t[kept].thin_id, new.thin_id)
secs = time.monotonic() - t0
p.runner.run(["lvremove", "--force", "{VG}/bench-new"])
print(json.dumps({{"secs": secs, "ranges": len(ranges), "bytes": sum(n for _, n in ranges)}}))
PY"""
    vm.run(mutate.format(seed=14))
    d = json.loads(vm.run(delta_cmd).stdout)
    print(f"  thin_delta (reserve, thin_delta, release, parse), few volumes: {d['secs']:.3f} s"
          f" ({d['ranges']} ranges, {d['bytes'] / (1 << 20):.1f} MiB)")  # fmt: skip
    t = time.monotonic()
    vm.run(f"""for i in $(seq 1 {volumes}); do
  lvcreate --quiet --thin --name vm-many$i-private --virtualsize 256M {VG}/{POOL} >/dev/null
  head -c 8M /dev/zero > /dev/{VG}/vm-many$i-private
done""", timeout=3600)  # fmt: skip
    print(f"  {volumes} more thin volumes made in {time.monotonic() - t:.1f} s")
    d2 = json.loads(vm.run(delta_cmd).stdout)
    print(f"  thin_delta, {volumes} more volumes in the pool: {d2['secs']:.3f} s")
    lvs_secs = vm.run(f"lvs {VG} >/dev/null").secs
    print(f"  one lvs of the VG ({volumes + 3} LVs): {lvs_secs:.2f} s")
    vm.run(mutate.format(seed=15))
    timed(vm, f"native incremental, lvm-thin, {volumes} more volumes",
          f"{qb} volume backup --dest /srv/native {DEV}=bench", res)  # fmt: skip
    if only:
        return
    inc = res["native incremental, lvm-thin (thin_delta)"]
    print("ratios:")
    print(f"  lvm-thin / restic incremental:    {inc / res['restic incremental']:.3f}")
    print(f"  lvm-thin / native full scan:      "
          f"{inc / res['native incremental, full scan (--no-snapshot)']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
