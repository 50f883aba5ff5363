"""The LVM thin provider on a live pool, in a VM with device-mapper (tests/testvm/).

The pool is laid out as Qubes lays it out (VG qubes_dom0, thin pool vm-pool, volumes
vm-NAME-private made, started, stopped and reverted with the command lines of Qubes' lvm driver:
tests/testvm/qubes_lvm.py), volumes are written through ext4, and every backup is the real CLI
(`qbhub volume backup`) on the LVM path. After every backup the archive is compared with a full
scan of the volume (`qbhub diff`: the newest session against the device, chunk by chunk), so a
change thin_delta missed would fail the test; test_a_missed_change_is_caught shows that it does.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from testvm import fixture
from testvm.fixture import ARCHIVE, POOL, QUBES_LVM, VG
from testvm.vm import TestVM

lvm_vm = fixture.lvm_vm  # the session's VM (a pytest fixture)

pytestmark = pytest.mark.slow

MiB = 1 << 20
TPOOL = f"/dev/mapper/{VG}-{POOL.replace('-', '--')}-tpool"
VIEWS = "/root/qbhub-home/thin-views"


def sh(vm: TestVM, script: str, **kw: Any) -> str:
    return vm.run(script, **kw).stdout


def make_volume(vm: TestVM, lv: str, size: int = 64 * MiB, files: int = 4) -> str:
    """A Qubes volume (ThinVolume.create) with an ext4 filesystem holding `files` 4 MiB files.

    Small volumes: under software emulation (CI has no KVM) every MiB read, hashed and compared
    costs; what is tested (LVM's snapshots and block mappings) does not depend on the size."""
    sh(vm, f"{QUBES_LVM} create {VG}/{lv} {size}\nmkfs.ext4 -q /dev/{VG}/{lv}")
    write_files(vm, lv, [f"f{i}" for i in range(files)], 4)
    return f"/dev/{VG}/{lv}"


def write_files(
    vm: TestVM, lv: str, names: list[str], mib: int, remove: tuple[str, ...] = ()
) -> None:
    """Mount the volume, write the named files (random data), remove some, trim, unmount."""
    cmds = [f"mkdir -p /mnt/{lv}", f"mount /dev/{VG}/{lv} /mnt/{lv}"]
    cmds += [f"head -c {mib}M /dev/urandom > /mnt/{lv}/{n}" for n in names]
    cmds += [f"rm -f /mnt/{lv}/{n}" for n in remove]
    cmds += [f"fstrim /mnt/{lv} || true", f"umount /mnt/{lv}"]
    sh(vm, "\n".join(cmds))


def init_archive(vm: TestVM, name: str) -> str:
    dest = f"{ARCHIVE}-{name}"
    vm.qbhub("init", "--dest", dest)
    return dest


def backup(vm: TestVM, dest: str, path: str, name: str) -> dict[str, Any]:
    out = vm.qbhub_json("volume", "backup", "--dest", dest, f"{path}={name}")
    (entry,) = [v for v in out["volumes"] if v["name"] == name]
    return entry  # type: ignore[no-any-return]


def assert_exact(vm: TestVM, dest: str, name: str, path: str) -> None:
    """`assert_matches_full_scan` and `assert_restores_to`, run side by side in the VM."""
    fork = vm.qbhub_argv()
    out = sh(
        vm,
        f"""{" ".join(fork)} diff --json --dest {dest} {name} {path} > /tmp/diff.json &
        {" ".join(fork)} volume restore --dest {dest} {name} --to /srv/restored.img --overwrite \
          >/dev/null
        wait $! || {{ echo "diff failed"; exit 1; }}
        cmp /srv/restored.img {path}
        rm /srv/restored.img
        cat /tmp/diff.json""",
    )
    diff = json.loads(out)
    assert diff["differing_count"] == 0, f"the archive misses changes: {diff}"


def assert_matches_full_scan(vm: TestVM, dest: str, name: str, path: str) -> None:
    """The newest session holds exactly what a full scan of `path` reads now."""
    diff = vm.qbhub_json("diff", "--dest", dest, name, path)
    assert diff["differing_count"] == 0, f"the archive misses changes: {diff}"


def assert_restores_to(vm: TestVM, dest: str, name: str, path: str) -> None:
    vm.qbhub("volume", "restore", "--dest", dest, name, "--to", "/srv/restored.img",
             "--overwrite")  # fmt: skip
    sh(vm, f"cmp /srv/restored.img {path}\nrm /srv/restored.img")


def lvs(vm: TestVM) -> dict[str, dict[str, str]]:
    out = sh(vm, f"lvs --reportformat json -o lv_name,lv_attr,origin,lv_tags,thin_id {VG}")
    return {r["lv_name"]: r for r in json.loads(out)["report"][0]["lv"]}


def kept_views(vm: TestVM, lv: str) -> list[str]:
    return [n for n in lvs(vm) if n.startswith(f"{lv}-qbk")]


def held_metadata_root(vm: TestVM) -> str:
    """Field 7 of the pool's status: the held metadata root, "-" when none is held."""
    return sh(vm, f"dmsetup status {TPOOL}").split()[6]


def test_backup_and_incrementals_on_a_live_pool(lvm_vm: TestVM) -> None:
    vm, lv, name = lvm_vm, "vm-work-private", "work-private"
    path = make_volume(vm, lv)
    dest = init_archive(vm, "chain")
    first = backup(vm, dest, path, name)
    assert first["provider"] == "full-scan"
    assert "no view is kept" in first["snapshot_note"]
    assert_exact(vm, dest, name, path)
    (kept,) = kept_views(vm, lv)
    info = lvs(vm)[kept]
    assert info["lv_attr"][1] == "r" and info["lv_attr"][4] != "a", info  # read-only, inactive
    assert info["origin"] == lv and "qbhub-view" in info["lv_tags"]
    assert not [n for n in lvs(vm) if "-qbn" in n]  # no view left behind
    assert held_metadata_root(vm) == "-"

    for step in range(3):  # incrementals: files added, rewritten, removed (and trimmed)
        write_files(vm, lv, [f"new{step}", "f1"], 1, remove=(f"f{step + 2}",) if step < 2 else ())
        entry = backup(vm, dest, path, name)
        assert entry["provider"] == "lvm-thin", entry
        assert "snapshot_note" not in entry
        assert 0 < entry["bytes_read"] < 16 * MiB, entry
        assert_exact(vm, dest, name, path)
        assert len(kept_views(vm, lv)) == 1 and held_metadata_root(vm) == "-"

    # A Qubes VM run: start makes -snap, the VM writes there; a backup meanwhile holds the
    # committed state (the last shutdown's) and finds it unchanged.
    sh(vm, f"{QUBES_LVM} start {VG}/{lv}")
    write_files(vm, f"{lv}-snap", ["while-running"], 2)
    during = backup(vm, dest, path, name)
    assert during["provider"] == "lvm-thin" and during["bytes_read"] == 0, during
    assert_restores_to(vm, dest, name, path)
    sh(vm, f"sleep 1.1\n{QUBES_LVM} stop {VG}/{lv}")  # commit: -snap becomes the volume
    assert any(n.startswith(f"{lv}-") and n.endswith("-back") for n in lvs(vm))
    after = backup(vm, dest, path, name)
    assert after["provider"] == "lvm-thin", after  # a normal stop is no revert
    assert 2 * MiB <= after["bytes_read"] < 16 * MiB, after
    assert_exact(vm, dest, name, path)


def test_writes_during_the_backup_give_a_consistent_image(lvm_vm: TestVM) -> None:
    """A writer keeps rewriting files through the mounted filesystem (a VM still running) while
    the full backup and an incremental run; each restores bit-exact to the snapshot it read."""
    vm, lv, name = lvm_vm, "vm-busy-private", "busy-private"
    path = make_volume(vm, lv, files=2)
    dest = init_archive(vm, "busy")
    sh(vm, f"mkdir -p /mnt/{lv} && mount /dev/{VG}/{lv} /mnt/{lv}")
    writer = sh(
        vm,
        f"""setsid sh -c 'i=0; while :; do
        head -c 1M /dev/urandom > /mnt/{lv}/w$((i % 6)); sync; i=$((i + 1)); echo $i > /run/writes
        done' >/dev/null 2>&1 < /dev/null & echo $!""",
    ).strip()
    try:
        for expected in ("full-scan", "lvm-thin"):
            before = int(sh(vm, "sleep 0.5; cat /run/writes"))
            entry = backup(vm, dest, path, name)
            assert entry["provider"] == expected, entry
            assert int(sh(vm, "cat /run/writes")) > before  # it really wrote meanwhile
            # The archive holds exactly the view the backup read, which the provider kept.
            (kept,) = kept_views(vm, lv)
            sh(vm, f"lvchange --quiet --activate y --ignoreactivationskip {VG}/{kept}")
            assert_restores_to(vm, dest, name, f"/dev/{VG}/{kept}")
            sh(vm, f"lvchange --quiet --activate n {VG}/{kept}")
    finally:
        sh(vm, f"kill {writer}; sleep 0.3; umount /mnt/{lv}")
    sh(vm, f"e2fsck -fn /dev/{VG}/{lv} >/dev/null")
    entry = backup(vm, dest, path, name)
    assert entry["provider"] == "lvm-thin"
    assert_matches_full_scan(vm, dest, name, path)


def fallback_setup(vm: TestVM, tag: str) -> tuple[str, str, str, str]:
    """A volume with one backup done (a kept view) and a change made since."""
    lv, name = f"vm-{tag}-private", f"{tag}-private"
    path = make_volume(vm, lv, size=32 * MiB, files=2)
    dest = init_archive(vm, tag)
    assert backup(vm, dest, path, name)["provider"] == "full-scan"
    write_files(vm, lv, ["changed"], 2)
    return lv, name, path, dest


def assert_full_scan_with_note(vm: TestVM, dest: str, path: str, name: str, note: str) -> None:
    entry = backup(vm, dest, path, name)
    assert entry["provider"] == "full-scan", entry
    assert note in entry["snapshot_note"], entry
    assert_exact(vm, dest, name, path)


def test_held_metadata_snapshot_falls_back_to_a_full_scan(lvm_vm: TestVM) -> None:
    vm = lvm_vm
    lv, name, path, dest = fallback_setup(vm, "held")
    sh(vm, f"dmsetup message {TPOOL} 0 reserve_metadata_snap")  # another tool holds it
    try:
        assert_full_scan_with_note(vm, dest, path, name, "held by another program")
        assert held_metadata_root(vm) != "-"  # not ours: left alone
    finally:
        sh(vm, f"dmsetup message {TPOOL} 0 release_metadata_snap")
    write_files(vm, lv, ["again"], 1)
    assert backup(vm, dest, path, name)["provider"] == "lvm-thin"
    assert_matches_full_scan(vm, dest, name, path)


def test_metadata_snapshot_left_by_a_crashed_qbhub_is_released(lvm_vm: TestVM) -> None:
    vm = lvm_vm
    _, name, path, dest = fallback_setup(vm, "crashed")
    # What a qbhub killed between reserve and release leaves: the marker and the held snapshot.
    sh(vm, f"echo 12345 > {VIEWS}/{VG}--{POOL}.metadata-snap\n"
           f"dmsetup message {TPOOL} 0 reserve_metadata_snap")  # fmt: skip
    entry = backup(vm, dest, path, name)
    assert entry["provider"] == "lvm-thin", entry
    assert held_metadata_root(vm) == "-"
    assert_matches_full_scan(vm, dest, name, path)


def test_kept_snapshot_removed_falls_back_to_a_full_scan(lvm_vm: TestVM) -> None:
    vm = lvm_vm
    lv, name, path, dest = fallback_setup(vm, "removed")
    (kept,) = kept_views(vm, lv)
    sh(vm, f"lvremove --quiet --force {VG}/{kept}")
    assert_full_scan_with_note(vm, dest, path, name, "is gone")
    assert backup(vm, dest, path, name)["provider"] == "lvm-thin"  # and it is kept again


def test_kept_snapshot_resized_falls_back_to_a_full_scan(lvm_vm: TestVM) -> None:
    vm = lvm_vm
    lv, name, path, dest = fallback_setup(vm, "resized")
    (kept,) = kept_views(vm, lv)
    sh(vm, f"lvextend --quiet --size +32M {VG}/{kept}")
    assert_full_scan_with_note(vm, dest, path, name, "was resized")


def test_kept_snapshot_replaced_falls_back_to_a_full_scan(lvm_vm: TestVM) -> None:
    vm = lvm_vm
    lv, name, path, dest = fallback_setup(vm, "replaced")
    (kept,) = kept_views(vm, lv)
    sh(vm, f"lvremove --quiet --force {VG}/{kept}\n"
           f"lvcreate --quiet --snapshot --name {kept} {VG}/{lv}")  # fmt: skip
    # LVM gives the new LV the lowest free thin ID: often the very one of the LV it replaces.
    assert_full_scan_with_note(vm, dest, path, name, "it was replaced")


def test_volume_reverted_by_qubes_falls_back_to_a_full_scan(lvm_vm: TestVM) -> None:
    vm, lv, name = lvm_vm, "vm-rev-private", "rev-private"
    path = make_volume(vm, lv, size=32 * MiB, files=2)
    vid = f"{VG}/{lv}"
    sh(vm, f"{QUBES_LVM} start {vid}")  # a VM run that leaves a revision
    write_files(vm, f"{lv}-snap", ["run1"], 1)
    sh(vm, f"sleep 1.1\n{QUBES_LVM} stop {vid}")
    dest = init_archive(vm, "rev")
    assert backup(vm, dest, path, name)["provider"] == "full-scan"
    sh(vm, f"sleep 1.1\n{QUBES_LVM} revert {vid}")  # qvm-volume revert: back before run1
    assert_full_scan_with_note(vm, dest, path, name, "was reverted to revision")
    sh(vm, f"{QUBES_LVM} start {vid}")  # and after the next run, the kept view is trusted again
    write_files(vm, f"{lv}-snap", ["run2"], 1)
    sh(vm, f"sleep 1.1\n{QUBES_LVM} stop {vid}")
    assert backup(vm, dest, path, name)["provider"] == "lvm-thin"
    assert_matches_full_scan(vm, dest, name, path)


def test_full_pool_falls_back_to_a_full_scan(lvm_vm: TestVM) -> None:
    """A pool out of data space: the backup reads the volume itself, says so, and drops the kept
    view (its blocks go back to the pool)."""
    vm, lv, name = lvm_vm, "vm-full-private", "full-private"
    sh(vm, f"lvcreate --quiet --type thin-pool --size 32M --name full-pool {VG}\n"
           f"lvchange --quiet --errorwhenfull y {VG}/full-pool\n"
           f"POOL=full-pool {QUBES_LVM} create {VG}/{lv} {64 * MiB}")  # fmt: skip
    path = f"/dev/{VG}/{lv}"
    sh(vm, f"head -c 8M /dev/urandom | dd of={path} bs=1M oflag=direct status=none")
    dest = init_archive(vm, "full")
    assert backup(vm, dest, path, name)["provider"] == "full-scan"
    # Fill the pool: the kept view pins the first 8 MiB, new writes take the rest.
    fill = vm.run(f"head -c 48M /dev/urandom | dd of={path} bs=1M oflag=direct status=none",
                  check=False)  # fmt: skip
    assert fill.rc != 0  # out of data space
    assert_full_scan_with_note(vm, dest, path, name, "cannot snapshot")
    assert not kept_views(vm, lv)
    assert "does not exist" not in sh(vm, f"lvs {VG}/full-pool")


def test_a_missed_change_is_caught(lvm_vm: TestVM) -> None:
    """The check every test above makes after each backup does catch a miss: a kept view forged
    to already hold a change (so thin_delta cannot see it) makes the incremental skip it, and
    the full-scan comparison reports exactly that range."""
    vm, lv, name = lvm_vm, "vm-miss-private", "miss-private"
    path = make_volume(vm, lv, size=32 * MiB, files=1)
    dest = init_archive(vm, "miss")
    assert backup(vm, dest, path, name)["provider"] == "full-scan"
    (kept,) = kept_views(vm, lv)
    offset = 24 * MiB
    sh(vm, f"head -c 65536 /dev/urandom | dd of={path} bs=64K seek={offset // 65536} "
           f"oflag=direct status=none\n"
           f"lvremove --quiet --force {VG}/{kept}\n"
           f"lvcreate --quiet --snapshot -ky --name {kept} {VG}/{lv}")  # fmt: skip
    sh(
        vm,
        f"""python3 - <<'PY'
import dataclasses, glob, subprocess
from qubes_backup_hub.snapshots.qubeslvm import lvs_argv, parse_lvs, view_identity
from qubes_backup_hub.snapshots.viewrecord import read_record, write_record
lvs = subprocess.run(lvs_argv("{VG}/{kept}"), capture_output=True, text=True, check=True).stdout
(path,) = glob.glob("{VIEWS}/{VG}--{lv}--*.json")
identity = view_identity(parse_lvs(lvs)["{kept}"])
write_record(path, dataclasses.replace(read_record(path), identity=identity))
PY""",
    )
    entry = backup(vm, dest, path, name)
    assert entry["provider"] == "lvm-thin" and entry["bytes_read"] == 0, entry  # missed it
    diff = vm.qbhub_json("diff", "--dest", dest, name, path)
    assert diff["differing_ranges"] == [[offset, 65536]], diff
