"""thin_delta parsing (on real thin_delta output of thin_restore-made metadata) and the LVM thin
provider's commands (against a recording runner: no device-mapper on the test machines, so the
provider itself never runs against a live pool here)."""

from __future__ import annotations

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
from qubes_backup_hub.snapshots.ranges import RangeList
from qubes_backup_hub.snapshots.thin import CommandRunner, LvmThinProvider, dm_name
from qubes_backup_hub.snapshots.thindelta import ThinDeltaError, parse_thin_delta

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
        SAMPLE.replace(b"right_only begin=\"11\"", b"right_only begin=\"5\""),  # out of order
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
    """Answers lvs from a table, runs the real thin_delta on a metadata file, records argv."""

    def __init__(self, meta: Path, lvs: dict[str, str]) -> None:
        self.meta, self.lvs, self.calls = meta, lvs, []  # type: list[list[str]]

    def run(self, argv: list[str]) -> str:
        self.calls.append(argv)
        if argv[0] == "lvs":
            lv = argv[-1].split("/")[1]
            for prefix, answer in self.lvs.items():
                if lv.startswith(prefix):
                    return answer
            raise UsageError(f"lvs: {lv} not found")
        if argv[0] == "lvrename":
            self.lvs[argv[3]] = self.lvs.pop("vm-work-private-qbhub-new")
        return ""

    @contextmanager
    def stream(self, argv: list[str]) -> Iterator[IO[bytes]]:
        self.calls.append(argv)
        left, right = argv[argv.index("--snap1") + 1], argv[argv.index("--snap2") + 1]
        yield io.BytesIO(thin_delta_output(self.meta, int(left), int(right)))


@NEEDS_TOOLS
def test_lvm_thin_provider_commands_and_ranges(
    pair_10g: tuple[Path, list[int]], tmp_path: Path
) -> None:
    meta, remapped = pair_10g
    size = 10 * (1 << 30)
    runner = RecordingRunner(meta, {"vm-work-private-qbhub-new": f"  1,{size},pool00\n"})
    ref = VolumeRef("private", "/dev/qubes_dom0/vm-work-private", archive_id="ab" * 16)
    first = LvmThinProvider(ref, str(tmp_path), runner)
    view = first.take()
    assert view.changed_ranges is None and "no view is kept" in view.note
    assert view.path.startswith("/dev/qubes_dom0/vm-work-private-qbhub-new-")
    new_lv = view.path.rsplit("/", 1)[1]
    assert runner.calls[0] == ["lvcreate", "--snapshot", "--name", new_lv, "--setactivationskip",
                               "n", "--activate", "y", "qubes_dom0/vm-work-private"]  # fmt: skip
    first.commit("20240101T000000Z")
    assert ["lvrename", "qubes_dom0", new_lv, "vm-work-private-qbhub-abababababababab"] in (
        runner.calls
    )
    assert runner.lvs == {"vm-work-private-qbhub-abababababababab": f"  1,{size},pool00\n"}
    runner.lvs["vm-work-private-qbhub-new"] = f"2,{size},pool00"  # the next snapshot: thin ID 2
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
    second.abort()
    assert runner.calls[-1][:2] == ["lvremove", "--force"]
    assert dm_name("my-vg", "pool-1") == "my--vg-pool--1"
