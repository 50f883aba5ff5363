"""thin_delta parsing (on real thin_delta output of thin_restore-made metadata), the LVM thin
provider's commands (against a recording runner) and Qubes' LVM naming. The provider on a live
pool, in a VM with device-mapper: tests/test_lvm_vm.py."""

from __future__ import annotations

import dataclasses
import io
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

from qubes_backup_hub.errors import UsageError
from qubes_backup_hub.snapshot import VolumeRef
from qubes_backup_hub.snapshots.qubeslvm import (
    LvInfo,
    history_since,
    is_qbhub_view,
    kept_name,
    lvs_argv,
    parse_lvs,
    qubes_base,
    view_identity,
)
from qubes_backup_hub.snapshots.ranges import RangeList
from qubes_backup_hub.snapshots.thin import CommandRunner, LvmThinProvider, dm_name
from qubes_backup_hub.snapshots.thindelta import ThinDeltaError, parse_thin_delta
from qubes_backup_hub.snapshots.viewrecord import read_record, write_record

BLOCK_SECTORS = 128  # 64 KiB data blocks
BLOCK = BLOCK_SECTORS * 512
NEEDS_TOOLS = pytest.mark.skipif(
    shutil.which("thin_restore") is None or shutil.which("thin_delta") is None,
    reason="thin-provisioning-tools not installed (apt-get install thin-provisioning-tools)",
)


def thin_pair_xml(nblocks: int, remapped: list[int]) -> str:
    """Device 1 maps every block; device 2 is a snapshot of it with `remapped` blocks rewritten."""
    lines = [
        f'<superblock uuid="" time="1" transaction="2" flags="0" version="2" '
        f'data_block_size="{BLOCK_SECTORS}" nr_data_blocks="{nblocks + len(remapped)}">',
        f'<device dev_id="1" mapped_blocks="{nblocks}" transaction="0" creation_time="0" '
        'snap_time="0">',
        f'<range_mapping origin_begin="0" data_begin="0" length="{nblocks}" time="0"/>',
        "</device>",
        f'<device dev_id="2" mapped_blocks="{nblocks}" transaction="1" creation_time="1" '
        'snap_time="1">',
    ]
    pos = 0
    for k, block in enumerate(remapped):
        if block > pos:
            lines.append(f'<range_mapping origin_begin="{pos}" data_begin="{pos}" '
                         f'length="{block - pos}" time="0"/>')  # fmt: skip
        lines.append(f'<single_mapping origin_block="{block}" data_block="{nblocks + k}" '
                     'time="1"/>')  # fmt: skip
        pos = block + 1
    if pos < nblocks:
        lines.append(f'<range_mapping origin_begin="{pos}" data_begin="{pos}" '
                     f'length="{nblocks - pos}" time="0"/>')  # fmt: skip
    lines += ["</device>", "</superblock>"]
    return "\n".join(lines)


def expected_ranges(remapped: list[int]) -> list[tuple[int, int]]:
    out = RangeList()
    for block in remapped:
        out.add(block * BLOCK, BLOCK)
    return out.ranges


@pytest.fixture(scope="module")
def pair_10g(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """Metadata of a 10 GiB thin pair, 1% of the blocks remapped, made by thin_restore."""
    if shutil.which("thin_restore") is None:
        pytest.skip("thin-provisioning-tools not installed")
    nblocks = 10 * (1 << 30) // BLOCK
    remapped = sorted(random.Random(5).sample(range(nblocks), nblocks // 100))
    d = tmp_path_factory.mktemp("thin")
    (d / "pair.xml").write_text(thin_pair_xml(nblocks, remapped))
    meta = d / "meta.bin"
    subprocess.run(["truncate", "-s", "64M", str(meta)], check=True)
    subprocess.run(["thin_restore", "-i", str(d / "pair.xml"), "-o", str(meta)], check=True)
    return meta, remapped


def thin_delta_output(meta: Path, left: int = 1, right: int = 2) -> bytes:
    argv = ["thin_delta", "--snap1", str(left), "--snap2", str(right), str(meta)]
    return subprocess.run(argv, check=True, capture_output=True).stdout


@NEEDS_TOOLS
def test_10g_pair_gives_exact_ranges(pair_10g: tuple[Path, list[int]]) -> None:
    meta, remapped = pair_10g
    argv = ["thin_delta", "--snap1", "1", "--snap2", "2", str(meta)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        delta = parse_thin_delta(proc.stdout)  # straight from the pipe, as a stream
    assert proc.returncode == 0
    assert (delta.left, delta.right, delta.data_block_size) == (1, 2, BLOCK_SECTORS)
    assert delta.changed == expected_ranges(remapped)
    assert delta.blocks_compared == 10 * (1 << 30) // BLOCK


@NEEDS_TOOLS
def test_left_only_and_right_only_count_as_changed(tmp_path: Path) -> None:
    xml = thin_pair_xml(100, [10]).replace('nr_data_blocks="101"', 'nr_data_blocks="300"')
    xml = xml.replace('length="89" time="0"/>', 'length="79" time="0"/>')  # 90..94 left only
    extra = '<range_mapping origin_begin="100" data_begin="200" length="5" time="1"/>'
    xml = xml.replace("</device>\n</superblock>", extra + "\n</device>\n</superblock>")
    (tmp_path / "t.xml").write_text(xml)
    meta = tmp_path / "meta.bin"
    subprocess.run(["truncate", "-s", "4M", str(meta)], check=True)
    subprocess.run(["thin_restore", "-i", str(tmp_path / "t.xml"), "-o", str(meta)], check=True)
    out = thin_delta_output(meta)
    assert b"left_only" in out and b"right_only" in out
    delta = parse_thin_delta(io.BytesIO(out))
    assert delta.changed == [(10 * BLOCK, BLOCK), (90 * BLOCK, 15 * BLOCK)]


SAMPLE = b"""<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="9">
  <diff left="1" right="2">
    <same begin="0" length="10"/>
    <different begin="10" length="1"/>
    <right_only begin="11" length="2"/>
  </diff>
</superblock>
"""


@pytest.mark.parametrize("read_size", [1, 7, 64, 1 << 20])
def test_any_read_size_gives_the_same_result(read_size: int) -> None:
    delta = parse_thin_delta(io.BytesIO(SAMPLE), read_size)
    assert delta.changed == [(10 * BLOCK, 3 * BLOCK)]


@pytest.mark.parametrize(
    "bad",
    [
        SAMPLE[:-20],  # truncated
        SAMPLE.replace(b"<same", b"<similar"),  # unknown element
        SAMPLE.replace(b'right_only begin="11"', b'right_only begin="5"'),  # out of order
        SAMPLE.replace(b"  <diff", b"junk <diff"),  # text between elements
        SAMPLE.replace(b'data_block_size="128"', b'data_block_size="0"'),
        SAMPLE.replace(b"</diff>\n", b""),
        b"",
    ],
)
def test_malformed_output_is_refused(bad: bytes) -> None:
    with pytest.raises(ThinDeltaError):
        parse_thin_delta(io.BytesIO(bad), 16)


class RecordingRunner(CommandRunner):
    """A volume group in a dict: answers lvs, lvcreate, lvrename, lvremove like LVM would, runs the
    real thin_delta on a metadata file, records every argv."""

    def __init__(self, meta: Path, size: int) -> None:
        self.meta, self.size, self.calls = meta, size, []  # type: list[list[str]]
        self.next_id = 1
        # name -> (thin ID, origin, creation time); the pool and the volume itself
        self.lvs: dict[str, tuple[int | None, str, int]] = {"pool00": (None, "", 100)}
        self.lvs["vm-work-private"] = (self._new_id(), "", 100)
        self.now = 1000

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _row(self, name: str) -> str:
        thin_id, origin, time = self.lvs[name]
        if thin_id is None:
            return f"  {name}||{16 * self.size}|||{time}|twi-aotz--|12.5|3.1|uuid-pool"
        uuid = f"uuid-{thin_id}-{time}"  # a new one for every LV made (and kept by renames)
        return f"  {name}|{thin_id}|{self.size}|pool00|{origin}|{time}|Vwi-a-tz--|50.0||{uuid}"

    def run(self, argv: list[str]) -> str:
        self.calls.append(argv)
        if argv[0] == "lvs":
            target = argv[-1]
            if "/" not in target:
                return "\n".join(self._row(n) for n in self.lvs) + "\n"
            lv = target.split("/")[1]
            if lv not in self.lvs:
                raise UsageError(f"lvs: {lv} not found")
            return self._row(lv) + "\n"
        if argv[0] == "lvcreate":
            origin = argv[-1].split("/")[1]
            self.now += 10
            self.lvs[argv[argv.index("--name") + 1]] = (self._new_id(), origin, self.now)
        if argv[0] == "lvrename":
            self.lvs[argv[3]] = self.lvs.pop(argv[2])
        if argv[0] == "lvremove":
            del self.lvs[argv[-1].split("/")[1]]
        return ""

    @contextmanager
    def stream(self, argv: list[str]) -> Iterator[IO[bytes]]:
        self.calls.append(argv)
        yield io.BytesIO(thin_delta_output(self.meta, 1, 2))  # the pair in the metadata file


@NEEDS_TOOLS
def test_lvm_thin_provider_commands_and_ranges(
    pair_10g: tuple[Path, list[int]], tmp_path: Path
) -> None:
    meta, remapped = pair_10g
    size = 10 * (1 << 30)
    runner = RecordingRunner(meta, size)
    ref = VolumeRef("private", "/dev/qubes_dom0/vm-work-private", archive_id="ab" * 16)
    first = LvmThinProvider(ref, str(tmp_path), runner)
    view = first.take()
    assert view.changed_ranges is None and "no view is kept" in view.note
    assert view.path.startswith("/dev/qubes_dom0/vm-work-private-qbn")
    assert view.path.endswith("-snap")  # hidden from Qubes' volume list, like Qubes' own -snap
    new_lv = view.path.rsplit("/", 1)[1]
    assert runner.calls[0] == lvs_argv("qubes_dom0")
    assert runner.calls[1] == [
        "lvcreate", "--snapshot", "--name", new_lv, "--permission", "r", "--setactivationskip",
        "y", "--ignoreactivationskip", "--activate", "y", "--addtag", "qbhub-view",
        "qubes_dom0/vm-work-private"]  # fmt: skip
    first.commit("20240101T000000Z")
    kept = "vm-work-private-qbkabababababababab-snap"
    assert ["lvchange", "--activate", "n", f"qubes_dom0/{new_lv}"] in runner.calls
    assert ["lvrename", "qubes_dom0", new_lv, kept] in runner.calls
    assert set(runner.lvs) == {"pool00", "vm-work-private", kept}
    # The pair in the metadata file is thin IDs 1 and 2: make the kept view 1, the next one 2.
    runner.lvs[kept] = (1, "vm-work-private", runner.lvs[kept][2])
    runner.next_id = 2
    record_path = str(tmp_path / "qubes_dom0--vm-work-private--abababababababab.json")
    identity = view_identity(parse_lvs(runner._row(kept))[kept])
    write_record(record_path, dataclasses.replace(read_record(record_path), identity=identity))
    runner.calls.clear()
    second = LvmThinProvider(ref, str(tmp_path), runner)
    view = second.take()
    assert view.base_session == "20240101T000000Z" and view.note == ""
    assert view.changed_ranges == expected_ranges(remapped)
    tpool = "/dev/mapper/qubes_dom0-pool00-tpool"
    assert ["dmsetup", "message", tpool, "0", "reserve_metadata_snap"] in runner.calls
    assert ["thin_delta", "--metadata-snap", "--snap1", "1", "--snap2", "2",
            "/dev/mapper/qubes_dom0-pool00_tmeta"] in runner.calls  # fmt: skip
    assert runner.calls[-1] == ["dmsetup", "message", tpool, "0", "release_metadata_snap"]
    assert not list(tmp_path.glob("*.metadata-snap"))  # the marker goes with the release
    second.abort()
    assert runner.calls[-1][:2] == ["lvremove", "--force"]
    assert dm_name("my-vg", "pool-1") == "my--vg-pool--1"


def test_a_failing_snapshot_reads_the_volume_whole_and_drops_the_kept_view(
    tmp_path: Path,
) -> None:
    class FullPool(RecordingRunner):
        def run(self, argv: list[str]) -> str:
            if argv[0] == "lvcreate":
                self.calls.append(argv)
                raise UsageError("lvcreate failed: Cannot create new thin volume, free space in "
                                 "thin pool qubes_dom0/pool00 reached threshold.")  # fmt: skip
            return super().run(argv)

    runner = FullPool(tmp_path / "unused", 1 << 30)
    runner.lvs["vm-work-private-qbk00-snap"] = (7, "vm-work-private", 50)
    ref = VolumeRef("private", "/dev/qubes_dom0/vm-work-private", archive_id="00")
    provider = LvmThinProvider(ref, str(tmp_path), runner)
    view = provider.take()
    assert view.path == "/dev/qubes_dom0/vm-work-private" and view.changed_ranges is None
    assert "cannot snapshot" in view.note and "reached threshold" in view.note
    provider.commit("s1")
    assert "vm-work-private-qbk00-snap" not in runner.lvs  # its blocks go back to the pool


def test_a_kept_view_made_again_with_the_same_thin_id_is_not_trusted(tmp_path: Path) -> None:
    """LVM gives a new thin volume the lowest free thin ID: a kept view removed and made again
    under its name (of the volume as it is now, so holding every change) can get its very thin ID
    back. Only its UUID differs, and that is enough for a full scan."""
    runner = RecordingRunner(tmp_path / "unused", 1 << 30)
    ref = VolumeRef("private", "/dev/qubes_dom0/vm-work-private", archive_id="00")
    first = LvmThinProvider(ref, str(tmp_path), runner)
    first.take()
    first.commit("s1")
    kept = "vm-work-private-qbk00-snap"
    thin_id, origin, made = runner.lvs[kept]
    runner.lvs[kept] = (thin_id, origin, made + 5)  # lvremove; lvcreate --snapshot --name kept
    second = LvmThinProvider(ref, str(tmp_path), runner)
    view = second.take()
    assert view.changed_ranges is None
    assert "it was replaced (another LV under its name)" in view.note
    second.abort()


QUBES_LVS = {
    # name: (origin, creation time)
    "vm-work-private-qbk00-snap": ("vm-work-private", 1000),  # the kept view, made at 1000
}


def _table(rows: dict[str, tuple[str, int]]) -> dict[str, LvInfo]:
    return {n: LvInfo(n, i, 1 << 30, "vm-pool", o, t, "Vwi-a-tz--")
            for i, (n, (o, t)) in enumerate(rows.items())}  # fmt: skip


def test_qubes_history_normal_stop_is_not_a_revert() -> None:
    # VM started at 1100 (-snap cloned from the volume), stopped at 1200: volume renamed to
    # -1200-back, -snap renamed to the volume.
    table = _table({"vm-work-private": ("vm-work-private-1200-back", 1100),
                    "vm-work-private-1200-back": ("", 900)})  # fmt: skip
    assert history_since(table, "vm-work-private", 1000) == ""


def test_qubes_history_revert_is_seen() -> None:
    # Reverted at 1300 to the revision made at 1200: the volume is a clone of -1200-back.
    table = _table({"vm-work-private": ("vm-work-private-1200-back", 1300),
                    "vm-work-private-1200-back": ("vm-work-private-1100-back", 1100)})  # fmt: skip
    assert "reverted to revision vm-work-private-1200-back" in history_since(
        table, "vm-work-private", 1000
    )
    # ... also after the VM ran again since (start 1400, stop 1500): the walk goes back.
    table = _table({"vm-work-private": ("vm-work-private-1500-back", 1400),
                    "vm-work-private-1500-back": ("vm-work-private-1200-back", 1300),
                    "vm-work-private-1200-back": ("", 1100)})  # fmt: skip
    assert "reverted" in history_since(table, "vm-work-private", 1000)
    # A revert before the kept view was made is history the last backup already saw.
    assert history_since(table, "vm-work-private", 1350) == ""


def test_qubes_history_clone_of_another_volume_is_seen() -> None:
    table = _table({"vm-work-private": ("vm-other-private", 1300)})
    assert "replaced by a clone of vm-other-private" in history_since(
        table, "vm-work-private", 1000
    )


def test_qubes_names() -> None:
    assert qubes_base("vm-work-private-snap") == "vm-work-private"
    assert qubes_base("vm-work-private-1700000000-back") == "vm-work-private"
    assert qubes_base("vm-work-private-qbk0123abcd-snap") == "vm-work-private"
    assert qubes_base("vm-work-private-import") == "vm-work-private"
    assert kept_name("vm-work-private", "ab").endswith("-snap")
    assert is_qbhub_view(kept_name("vm-a-private", "0f"))
    assert not is_qbhub_view("vm-a-private-snap")
    row = "  vm-a-private|3|1073741824|vm-pool|vm-a-private-1-back|1700000000|Vwi-a-tz--|5.00||U1"
    info = parse_lvs(row)["vm-a-private"]
    assert (info.thin_id, info.size, info.pool, info.time) == (3, 1 << 30, "vm-pool", 1700000000)
    assert info.is_thin_volume and info.active
    with pytest.raises(ValueError):
        parse_lvs("garbage")
