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
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import workload
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
    ap.add_argument("--no-restic", action="store_true", help="skip restic (the longest steps)")
    ap.add_argument("--workdir", default="/var/tmp", help="where the workload image is cached")
    args = ap.parse_args()
    size = parse_size(args.size)
    reason = testvm.unavailable_reason()
    if reason:
        sys.exit(f"bench_lvm: {reason}")
    image = workload_image(Path(args.workdir), size)
    disk_gib = 2 * size // (1 << 30) + 24
    vm = testvm.TestVM(testvm.image_dir(), memory_mib=3072, cpus=2, disks_gib=(disk_gib,),
                       disk_cache="none", images=(image,))  # fmt: skip
    # SIGTERM (a background run stopped): stop the VM and remove its disks on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    vm.start()
    print(f"VM: {vm.accel}, 2 vCPUs, 3 GiB; volume {size / (1 << 30):g} GiB", flush=True)
    try:
        run(vm, size, args.volumes, args.delta_only, not args.no_restic)
    finally:
        vm.stop()


def workload_image(workdir: Path, size: int) -> Path:
    """The workload (seed 1, dense, zero blocks as holes) as a file on the host, made once: the
    host's CPU generates it in a minute where the emulated one took most of an hour. The VM
    gets it as a read-only disk (/dev/vdc) and copies it into the thin volume."""
    path = workdir / f"qbhub-bench-lvm-{size >> 20}MiB-seed1.img"
    done = path.with_suffix(".done")
    if not done.exists():
        t = time.monotonic()
        workload.write_image(str(path), 1, workload.Layout.dense(size // workload.BLOCK),
                             sparse_zeros=True)  # fmt: skip
        done.touch()
        print(f"  workload image {path} made in {time.monotonic() - t:.1f} s", flush=True)
    return path


def timed(vm: testvm.TestVM, label: str, cmd: str, results: dict[str, float]) -> str:
    vm.run("sync; echo 3 > /proc/sys/vm/drop_caches")
    r = vm.run(cmd, timeout=3 * 3600)
    results[label] = r.secs
    print(f"  {label:<52} {r.secs:8.2f} s", flush=True)
    return r.stdout


def run(
    vm: testvm.TestVM, size: int, volumes: int, delta_only: bool = False, restic: bool = True
) -> None:
    pool_size = size // (1 << 20) + 4096 + volumes * 16
    vm.run(f"cat > /etc/lvm/lvmlocal.conf <<'EOF'\n{LVM_LOCAL_CONF}EOF")
    vm.run(f"python3 /mnt/qbhub/tests/testvm/qubes_lvm.py setup-pool {VG} {POOL} /dev/vdb "
           f"{pool_size}M\n"
           f"lvcreate --quiet --size {2 * size // (1 << 20) + 2048}M --name archive {VG}\n"
           f"mkfs.ext4 -q /dev/{VG}/archive && mount /dev/{VG}/archive /srv\n"
           f"python3 /mnt/qbhub/tests/testvm/qubes_lvm.py create {VG}/{LV} {size}")  # fmt: skip
    # Written as a VM writes its volume: only the non-zero 64 KiB blocks (conv=sparse), so the
    # zero ones stay unmapped in the pool, as they would be on a Qubes volume.
    r = vm.run(f"dd if=/dev/vdc of={DEV} bs=64K conv=sparse,fsync status=none", timeout=3600)
    print(f"  workload copied into the thin volume in {r.secs:.1f} s", flush=True)
    nblocks = size // workload.BLOCK
    layout = f"workload.Layout.dense({nblocks})"
    mutate = "cd /mnt/qbhub/bench && python3 -c 'import workload; workload.mutate("
    mutate += f'"{DEV}", {{seed}}, {layout})\''
    qb = "python3 -m qubes_backup_hub"
    res: dict[str, float] = {}
    vm.run(f"{qb} init --dest /srv/native")
    timed(vm, "native full backup (lvm-thin, first view)",
          f"{qb} volume backup --dest /srv/native {DEV}=bench", res)  # fmt: skip
    if not delta_only:
        compare(vm, qb, mutate, res)
    delta(vm, qb, mutate, volumes, res, delta_only)
    if restic and not delta_only:
        restic_steps(vm, mutate, res)
    print("ratios:")
    inc = res.get("native incremental, lvm-thin (thin_delta)")
    scan = res.get("native incremental, full scan (--no-snapshot)")
    if inc and scan:
        print(f"  lvm-thin / native full scan:      {inc / scan:.3f}")
    if inc and res.get("restic incremental"):
        print(f"  lvm-thin / restic incremental:    {inc / res['restic incremental']:.3f}")
    print("results: " + json.dumps(res), flush=True)


def compare(vm: testvm.TestVM, qb: str, mutate: str, res: dict[str, float]) -> None:
    print("incrementals, 1% of the 64 KiB blocks rewritten before each:")
    vm.run(mutate.format(seed=11))
    out = timed(vm, "native incremental, lvm-thin (thin_delta)",
                f"{qb} volume backup --json --dest /srv/native {DEV}=bench", res)  # fmt: skip
    entry = json.loads(out)["volumes"][0]
    print(f"    provider {entry['provider']}, read {entry['bytes_read'] / (1 << 20):.1f} MiB")
    vm.run(mutate.format(seed=12))
    timed(vm, "native incremental, full scan (--no-snapshot)",
          f"{qb} volume backup --no-snapshot --dest /srv/native {DEV}=bench", res)  # fmt: skip
    # The full scan moved the archive past the kept view: one lvm-thin backup re-bases it.
    vm.run(f"{qb} volume backup --dest /srv/native {DEV}=bench", timeout=3600)


def restic_steps(vm: testvm.TestVM, mutate: str, res: dict[str, float]) -> None:
    """restic last: its two reads of the whole volume are the longest steps by far."""
    env = "export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=/srv/restic; "
    restic = f"restic backup --quiet --stdin --stdin-filename bench.img < {DEV}"
    vm.run(f"{env} restic init --quiet")
    timed(vm, "restic full backup", f"{env} {restic}", res)
    vm.run(mutate.format(seed=13))
    timed(vm, "restic incremental (1% rewritten)", f"{env} {restic}", res)
    res["restic incremental"] = res["restic incremental (1% rewritten)"]


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


if __name__ == "__main__":
    main()
