#!/usr/bin/python3
"""Qubes' ThinVolume driver, the parts that touch LVM, for the test VM (run there from /mnt/qbhub).

The LVM command lines are those of qubes-core-admin 4.2 qubes/storage/lvm.py
(`_get_lvm_cmdline`: create, clone, remove with blkdiscard first, rename, extend), and the
operations follow `ThinVolume` for a save_on_stop volume (private, a template's root):

    setup-pool VG POOL DEVICE SIZE   pvcreate, vgcreate, a thin pool as the Qubes installer makes
    create VG/vm-NAME-VOL SIZE       ThinVolume.create (no source)
    start VG/vm-NAME-VOL             ThinVolume.start: -snap made as a clone of the committed one
    stop VG/vm-NAME-VOL [KEEP]       ThinVolume.stop/_commit: committed -> -TIMESTAMP-back,
                                     -snap -> committed, revisions beyond KEEP (1) removed
    revert VG/vm-NAME-VOL [REV]      ThinVolume.revert: remove committed, clone the revision
    remove VG/vm-NAME-VOL            ThinVolume.remove
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def lvm(*argv: str) -> None:
    subprocess.run(["lvm", *argv], check=True, stdout=subprocess.DEVNULL)


def exists(vid: str) -> bool:
    return os.path.exists("/dev/" + vid)


def lvm_create(pool_id: str, name: str, size: int) -> None:
    lvm("lvcreate", "--thin", "--setactivationskip=n", "--activate=y", "--name=" + name,
        f"--virtualsize={size}B", "--", pool_id)  # fmt: skip


def lvm_clone(src: str, dst: str) -> None:
    # Qubes adds --type=thin; Debian 12's lvm2 (2.03.16) refuses it with --snapshot, and a
    # snapshot of a thin volume without a size is a thin snapshot anyway.
    name = dst.split("/", 1)[1]
    lvm("lvcreate", "--setactivationskip=n", "--activate=y", "--snapshot",
        "--name=" + name, "--", src)  # fmt: skip


def lvm_remove(vid: str) -> None:
    if not exists(vid):
        return
    subprocess.run(["blkdiscard", "-p", "1G", "/dev/" + vid], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    lvm("lvremove", "--force", "--", vid)


def lvm_rename(src: str, dst: str) -> None:
    lvm("lvrename", "--", src, dst)


def revisions(vid: str) -> list[str]:
    vg, name = vid.split("/")
    out = subprocess.run(["lvs", "--noheadings", "-o", "lv_name", vg], check=True,
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    revs = []
    for lv in out:
        if lv.startswith(name + "-") and lv.endswith("-back"):
            rev = lv[len(name) + 1 :]
            if rev.count("-") <= 1:
                revs.append(rev)
    return sorted(revs, key=lambda r: int(r.split("-")[0]))


def start(vid: str) -> None:
    snap = vid + "-snap"
    if not exists(snap):  # not dirty: a fresh snapshot of the committed volume
        lvm_remove(snap)
        lvm_clone(vid, snap)


def stop(vid: str, keep: int = 1) -> None:
    snap = vid + "-snap"
    if not exists(snap):
        return
    if exists(vid):
        lvm_rename(vid, f"{vid}-{int(time.time())}-back")
    lvm_rename(snap, vid)
    old = revisions(vid)
    for rev in old[: (-keep) or None]:
        lvm_remove(f"{vid}-{rev}")


def revert(vid: str, revision: str | None = None) -> None:
    revision = revision or revisions(vid)[-1]
    if exists(vid):
        lvm_remove(vid)
    lvm_clone(f"{vid}-{revision}", vid)


def main(args: list[str]) -> None:
    op = args[0]
    if op == "setup-pool":
        vg, pool, device, size = args[1:5]
        lvm("pvcreate", "--force", device)
        lvm("vgcreate", vg, device)
        lvm("lvcreate", "--type", "thin-pool", "--size", size, "--name", pool, vg)
    elif op == "create":
        vg, name = args[1].split("/")
        lvm_create(f"{vg}/{os.environ.get('POOL', 'vm-pool')}", name, int(args[2]))
    elif op == "start":
        start(args[1])
    elif op == "stop":
        stop(args[1], int(args[2]) if len(args) > 2 else 1)
    elif op == "revert":
        revert(args[1], args[2] if len(args) > 2 else None)
    elif op == "remove":
        vid = args[1]
        for v in (vid + "-snap", vid + "-import", *(f"{vid}-{r}" for r in revisions(vid)), vid):
            lvm_remove(v)
    else:
        raise SystemExit(f"unknown operation {op}")


if __name__ == "__main__":
    main(sys.argv[1:])
