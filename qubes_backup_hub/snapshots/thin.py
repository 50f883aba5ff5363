"""The LVM thin snapshot provider, for Qubes' default pool (``/dev/VG/LV`` thin volumes in dom0).

NOT RUN ON A LIVE POOL IN THIS PROJECT'S CI: the test machines have no device-mapper. What is
tested is the command construction (against a recording runner) and the change parsing, on real
`thin_delta` output from metadata files built with `thin_restore` (tests/test_thin_delta.py).

take():   ``lvcreate --snapshot`` of the volume (a thin snapshot: no size given), which the backup
          reads; then, if a snapshot is kept from the previous backup to this archive, a metadata
          snapshot of the pool (``dmsetup message ... reserve_metadata_snap``), ``thin_delta -m``
          between the kept snapshot's and the new one's thin IDs, parsed as a stream
          (`thindelta.parse_thin_delta`), and ``release_metadata_snap``.
commit(): remove the old kept snapshot, rename the new one to the kept name, write the sidecar
          (`viewrecord.ViewRecord`, in the qbhub state directory) recording its thin ID.
abort():  remove the new snapshot.
Any doubt (no sidecar, damaged, another archive, thin ID or size mismatch, a failing command,
unparseable output) gives changed_ranges None: the engine scans the whole volume.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from ..errors import QbhubError, UsageError
from ..snapshot import SnapshotProvider, SnapshotView, VolumeRef
from .ranges import Range
from .thindelta import parse_thin_delta
from .viewrecord import ViewRecord, ViewRecordError, read_record, write_record

_LV_PATH = re.compile(r"/dev/([A-Za-z0-9+_.][A-Za-z0-9+_.-]*)/([A-Za-z0-9+_.][A-Za-z0-9+_.-]*)")


class CommandRunner:
    """Runs LVM and device-mapper commands; tests replace it with a recording fake."""

    def run(self, argv: list[str]) -> str:
        """Run `argv`; return its stdout; raise UsageError with its stderr on failure."""
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise UsageError(f"{argv[0]} failed: {proc.stderr.strip()[:300]}")
        return proc.stdout

    @contextmanager
    def stream(self, argv: list[str]) -> Iterator[IO[bytes]]:
        """Run `argv` with its stdout as a binary stream; raise if it fails."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            rc = proc.wait()
        if rc != 0:
            raise UsageError(f"{argv[0]} exited {rc}")


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name of VG/LV: hyphens doubled, joined by one hyphen."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def parse_lv_path(path: str) -> tuple[str, str] | None:
    """(VG, LV) of a ``/dev/VG/LV`` path, or None."""
    m = _LV_PATH.fullmatch(path)
    return (m.group(1), m.group(2)) if m else None


class LvmThinProvider(SnapshotProvider):
    """Snapshots an LVM thin volume; changes from thin_delta. See the module docstring."""

    name = "lvm-thin"

    def __init__(
        self, volume: VolumeRef, records_dir: str, runner: CommandRunner | None = None
    ) -> None:
        parsed = parse_lv_path(volume.path)
        if parsed is None:
            raise UsageError(f"{volume.path} is not a /dev/VG/LV path")
        self.volume = volume
        self.vg, self.lv = parsed
        self.runner = runner or CommandRunner()
        tag = (volume.archive_id or "unknown")[:16]
        self.kept_lv = f"{self.lv}-qbhub-{tag}"
        self.record_path = os.path.join(records_dir, f"{self.vg}--{self.lv}--{tag}.json")
        self.new_lv: str | None = None
        self.new_thin_id = -1
        self.new_size = 0

    def _lv_info(self, lv: str) -> tuple[int, int, str]:
        """(thin ID, size in bytes, pool LV) of VG/lv, from `lvs`."""
        out = self.runner.run(
            ["lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", ",",
             "--options", "thin_id,lv_size,pool_lv", f"{self.vg}/{lv}"]
        )  # fmt: skip
        fields = [f.strip() for f in out.strip().split(",")]
        if len(fields) != 3 or not fields[0].isdigit() or not fields[1].isdigit() or not fields[2]:
            raise UsageError(f"{self.vg}/{lv} is not a thin volume (lvs said {out.strip()!r})")
        return int(fields[0]), int(fields[1]), fields[2]

    def take(self) -> SnapshotView:
        new_lv = f"{self.lv}-qbhub-new-{secrets.token_hex(4)}"
        self.runner.run(
            ["lvcreate", "--snapshot", "--name", new_lv, "--setactivationskip", "n",
             "--activate", "y", f"{self.vg}/{self.lv}"]
        )  # fmt: skip
        self.new_lv = new_lv
        try:
            self.new_thin_id, self.new_size, pool = self._lv_info(new_lv)
            changed, base, note = self._changes(pool)
        except BaseException:
            self.abort()
            raise
        return SnapshotView(
            path=f"/dev/{self.vg}/{new_lv}",
            changed_ranges=changed,
            provider=self.name,
            base_session=base,
            note=note,
        )

    def _changes(self, pool: str) -> tuple[list[Range] | None, str | None, str]:
        if not self.volume.archive_id:
            return None, None, "the archive ID is unknown"
        try:
            record = read_record(self.record_path)
        except ViewRecordError as exc:
            return None, None, f"kept snapshot unusable: {exc}"
        if record.archive_id != self.volume.archive_id or record.view != self.kept_lv:
            return None, None, "kept snapshot unusable: it belongs to another archive or volume"
        try:
            old_id, old_size, _ = self._lv_info(self.kept_lv)
            if old_id != record.identity:
                return None, None, "kept snapshot unusable: its thin ID changed"
            if not old_size == record.size == self.new_size:
                return None, None, "the volume changed size since the last backup"
            ranges = self.thin_delta(pool, old_id, self.new_thin_id)
        except QbhubError as exc:
            return None, None, f"thin_delta unusable: {exc}"
        clipped = [(o, min(n, self.new_size - o)) for o, n in ranges if o < self.new_size]
        return clipped, record.base_session, ""

    def thin_delta(self, pool: str, left: int, right: int) -> list[Range]:
        """Changed byte ranges between two thin IDs of `pool`, via a pool metadata snapshot."""
        tpool = f"/dev/mapper/{dm_name(self.vg, pool)}-tpool"
        tmeta = f"/dev/mapper/{dm_name(self.vg, pool)}_tmeta"
        self.runner.run(["dmsetup", "message", tpool, "0", "reserve_metadata_snap"])
        try:
            argv = ["thin_delta", "--metadata-snap", "--snap1", str(left), "--snap2", str(right),
                    tmeta]  # fmt: skip
            with self.runner.stream(argv) as out:
                delta = parse_thin_delta(out)
        finally:
            self.runner.run(["dmsetup", "message", tpool, "0", "release_metadata_snap"])
        if (delta.left, delta.right) != (left, right):
            raise UsageError("thin_delta compared other devices than asked")
        return delta.changed

    def commit(self, session_id: str) -> None:
        if self.new_lv is None:
            return
        if not self.volume.archive_id:
            self.abort()
            return
        if self._kept_exists():
            self.runner.run(["lvremove", "--force", f"{self.vg}/{self.kept_lv}"])
        self.runner.run(["lvrename", self.vg, self.new_lv, self.kept_lv])
        self.new_lv = None
        os.makedirs(os.path.dirname(self.record_path), mode=0o700, exist_ok=True)
        write_record(
            self.record_path,
            ViewRecord(
                archive_id=self.volume.archive_id,
                volume=self.volume.name,
                size=self.new_size,
                base_session=session_id,
                view=self.kept_lv,
                identity=self.new_thin_id,
            ),
        )

    def _kept_exists(self) -> bool:
        try:
            self._lv_info(self.kept_lv)
        except UsageError:
            return False
        return True

    def abort(self) -> None:
        if self.new_lv is not None:
            lv, self.new_lv = self.new_lv, None
            self.runner.run(["lvremove", "--force", f"{self.vg}/{lv}"])
