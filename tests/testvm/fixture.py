"""The session-scoped pytest fixture that starts the LVM test VM (see vm.py), and guest helpers.

Skips with the reason when qemu or the image is missing. Under CI (CI=true) with qemu installed,
a missing image fails instead: .ci/testvm-setup installs qemu and builds the image, so qemu
without an image means that step broke, and skipping would hide it.
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
QUBES_LVM = "python3 /mnt/qbhub/tests/testvm/qubes_lvm.py"


def vm_or_skip() -> None:
    if not testvm_mod.kvm_usable() and os.environ.get("QBHUB_TESTVM_ACCEL") != "tcg":
        pytest.skip(
            "no usable KVM on this machine (missing, or a PVM host that boots only PVM "
            "kernels): the LVM VM tests under software emulation take ~25 minutes; set "
            "QBHUB_TESTVM_ACCEL=tcg to run them anyway"
        )
    reason = testvm_mod.unavailable_reason()
    if reason is None:
        return
    if os.environ.get("QBHUB_TESTVM_BUILD") == "1" and testvm_mod.shutil.which(testvm_mod.QEMU):
        testvm_mod.build_image()
        return
    if os.environ.get("CI") == "true" and testvm_mod.shutil.which(testvm_mod.QEMU):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def lvm_vm() -> Iterator[TestVM]:
    """A running test VM with a Qubes-like pool: VG qubes_dom0, thin pool vm-pool (4 GiB) on
    /dev/vdb, and an ext4 archive filesystem on a plain LV mounted at /srv."""
    vm_or_skip()
    with testvm_mod.running_vm(memory_mib=1536, cpus=2, disks_gib=(16,)) as v:
        v.run(
            f"{QUBES_LVM} setup-pool {VG} {POOL} /dev/vdb 4G\n"
            f"lvcreate --quiet --size 3G --name qbhub-archive {VG} >/dev/null\n"
            f"mkfs.ext4 -q /dev/{VG}/qbhub-archive\n"
            "mount /dev/qubes_dom0/qbhub-archive /srv\n"
        )
        yield v


def q(s: str) -> str:
    return shlex.quote(s)
