"""The session-scoped pytest fixture that starts the LVM test VM (see vm.py), and guest helpers.

Skips with the reason when qemu or the image is missing, or when there is no usable KVM and
QBHUB_TESTVM_ACCEL=tcg does not ask for software emulation. With QBHUB_TESTVM_REQUIRED=1 (set by
.ci/run, which installs qemu, builds the image and sets QBHUB_TESTVM_ACCEL=tcg without KVM) or
under CI=true with qemu installed, a missing image fails instead: skipping would hide a broken
setup step.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator

import pytest

from . import vm as testvm_mod
from .vm import TestVM

VG = "qubes_dom0"
POOL = "vm-pool"
ARCHIVE = "/srv/archive"
# -I -S: only the standard library (no site-packages scan, no PYTHONPATH on the 9p mount).
QUBES_LVM = "python3 -I -S /mnt/qbhub/tests/testvm/qubes_lvm.py"
# LVM in the test VM, for speed: under software emulation each LVM command took 3-4 s, mostly
# waiting for udev to run its rules on every device-mapper change; LVM makes the /dev nodes
# itself instead, scans only the data disks, and keeps no metadata backups or dmeventd
# monitoring. None of this changes what LVM and device-mapper do to the pool (~1.3 s a command).
LVM_LOCAL_CONF = """activation {
  udev_sync = 0
  udev_rules = 0
  monitoring = 0
}
devices {
  obtain_device_list_from_udev = 0
  global_filter = [ "a|^/dev/vd[b-z]$|", "r|.*|" ]
}
backup {
  backup = 0
  archive = 0
}
"""


def vm_or_skip() -> None:
    required = os.environ.get("QBHUB_TESTVM_REQUIRED") == "1" or (
        os.environ.get("CI") == "true" and testvm_mod.shutil.which(testvm_mod.QEMU) is not None
    )
    if not testvm_mod.kvm_usable() and os.environ.get("QBHUB_TESTVM_ACCEL") != "tcg":
        why = (
            "no usable KVM on this machine (missing, or a PVM host that boots only PVM "
            "kernels): the LVM VM tests under software emulation take ~10 minutes; set "
            "QBHUB_TESTVM_ACCEL=tcg to run them anyway"
        )
        if required:
            pytest.fail(why)
        pytest.skip(why)
    reason = testvm_mod.unavailable_reason()
    if reason is None:
        return
    if os.environ.get("QBHUB_TESTVM_BUILD") == "1" and testvm_mod.shutil.which(testvm_mod.QEMU):
        testvm_mod.build_image()
        return
    if required:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def lvm_vm() -> Iterator[TestVM]:
    """A running test VM with a Qubes-like pool: VG qubes_dom0, thin pool vm-pool (2 GiB) on
    /dev/vdb, and an ext4 archive filesystem on a plain LV mounted at /srv."""
    vm_or_skip()
    with testvm_mod.running_vm(memory_mib=1024, cpus=2, disks_gib=(8,)) as v:
        v.start_fork_server()  # imports meanwhile, on the other vCPU
        v.run(
            f"cat > /etc/lvm/lvmlocal.conf <<'EOF'\n{LVM_LOCAL_CONF}EOF\n"
            f"{QUBES_LVM} setup-pool {VG} {POOL} /dev/vdb 2G\n"
            f"lvcreate --quiet --size 1G --name qbhub-archive {VG} >/dev/null\n"
            f"mkfs.ext4 -q /dev/{VG}/qbhub-archive\n"
            "mount /dev/qubes_dom0/qbhub-archive /srv\n"
        )
        yield v


def q(s: str) -> str:
    return shlex.quote(s)
