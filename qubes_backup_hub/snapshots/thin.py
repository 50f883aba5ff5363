"""The LVM thin snapshot provider, for Qubes' default pool (``/dev/VG/LV`` thin volumes in dom0).

Tested for real in a virtual machine with device-mapper (tests/test_lvm_vm.py: a pool laid out
as Qubes lays it out, Qubes' own lvm command lines, the real CLI), and its command lines and
parsing without one (tests/test_thin_delta.py).

take():   one ``lvs`` of the VG; ``lvcreate --snapshot`` of the volume (a thin snapshot, read-only,
          skipped at activation), which the backup reads: a point-in-time view, so writes to the
          volume meanwhile (a running VM, Qubes committing or removing revisions) never tear it.
          Then, if a view is kept from the previous backup to this archive and nothing about it
          is in doubt, under a per-pool lock: a pool metadata snapshot (``dmsetup message ...
          reserve_metadata_snap``), ``thin_delta -m`` between the kept view's and the new one's
          thin IDs, parsed as a stream (`thindelta.parse_thin_delta`), ``release_metadata_snap``.
commit(): deactivate the new view, remove the old kept one, rename the new one to the kept name
          (`qubeslvm.kept_name`), write the sidecar (`viewrecord.ViewRecord`, in the qbhub state
          directory) recording its thin ID and UUID (`qubeslvm.view_identity`).
abort():  remove the new view.

Any doubt gives changed_ranges None with a note (the engine then scans the whole volume): no
sidecar, a damaged or foreign one, a kept view missing, resized or replaced (another thin ID or
UUID under its name), a volume
that Qubes reverted or replaced since (`qubeslvm.history_since`), a size change, a pool metadata
snapshot held by another program, a failing command or unparseable output. When no snapshot can
be made at all (a full pool, an LV that is not thin) the volume itself is read, whole, with a
note; the kept view is then dropped at commit, which also gives its blocks back to the pool.

Which state of a Qubes volume: the QubesPlatform passes the committed volume
(``/dev/VG/vm-NAME-VOL``): for a running VM that is the state of its last shutdown (it writes
to ``-snap``). Passing ``...-snap`` backs up the live state, crash-consistent.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from ..errors import QbhubError, UsageError
from ..snapshot import SnapshotProvider, SnapshotView, VolumeRef
from .qubeslvm import (
    LvInfo,
    history_since,
    kept_name,
    lvs_argv,
    new_name,
    parse_lvs,
    view_identity,
)
from .ranges import Range
from .thindelta import parse_thin_delta
from .viewrecord import ViewRecord, ViewRecordError, read_record, write_record

_LV_PATH = re.compile(r"/dev/([A-Za-z0-9+_.][A-Za-z0-9+_.-]*)/([A-Za-z0-9+_.][A-Za-z0-9+_.-]*)")


class CommandRunner:
    """Runs LVM and device-mapper commands; tests replace it with a recording fake."""

    def run(self, argv: list[str]) -> str:
        """Run `argv`; return its stdout; raise UsageError with its stderr on failure."""
        env = {**os.environ, "LC_ALL": "C"}
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            err = " ".join(proc.stderr.split())
            raise UsageError(f"{argv[0]} failed: {err[:300]}")
        return proc.stdout

    @contextmanager
    def stream(self, argv: list[str]) -> Iterator[IO[bytes]]:
        """Run `argv` with its stdout as a binary stream; raise if it fails."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            err = proc.stderr.read(2000).decode(errors="replace")
            proc.stderr.close()
            rc = proc.wait()
        if rc != 0:
            raise UsageError(f"{argv[0]} exited {rc}: {' '.join(err.split())[:300]}")


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
        self.records_dir = records_dir
        tag = (volume.archive_id or "0")[:16].lower()
        if not re.fullmatch(r"[0-9a-f]{1,16}", tag):
            tag = "0"
        self.kept_lv = kept_name(self.lv, tag)
        self.record_path = os.path.join(records_dir, f"{self.vg}--{self.lv}--{tag}.json")
        self.new_lv: str | None = None
        self.new_thin_id = -1
        self.new_identity = -1
        self.new_size = 0
        self.drop_kept = False  # no snapshot could be made: the kept view is stale, drop it
        self.kept_listed = True  # the kept view was in take()'s lvs (True: unknown, look)

    # -- the SnapshotProvider interface --------------------------------------------------------

    def take(self) -> SnapshotView:
        try:
            table = self._lvs(self.vg)
        except UsageError as exc:
            return self._direct(f"{self.volume.path} is not an LVM volume ({exc})")
        source = table.get(self.lv)
        if source is None or not source.is_thin_volume:
            return self._direct(f"{self.vg}/{self.lv} is not a thin volume")
        self.kept_listed = self.kept_lv in table
        new_lv = new_name(self.lv, secrets.token_hex(4))
        try:
            self.runner.run(
                ["lvcreate", "--snapshot", "--name", new_lv, "--permission", "r",
                 "--setactivationskip", "y", "--ignoreactivationskip", "--activate", "y",
                 "--addtag", "qbhub-view", f"{self.vg}/{self.lv}"]
            )  # fmt: skip
        except UsageError as exc:
            pool = table.get(source.pool)
            return self._direct(f"cannot snapshot {self.vg}/{self.lv} ({exc}){_fullness(pool)}")
        self.new_lv = new_lv
        try:
            new = self._lvs(f"{self.vg}/{new_lv}").get(new_lv)
            if new is None or new.thin_id is None:
                raise UsageError(f"the new snapshot {self.vg}/{new_lv} is not a thin volume")
            self.new_thin_id, self.new_size = new.thin_id, new.size
            self.new_identity = view_identity(new)
            changed, base, note = self._changes(table, source)
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

    def commit(self, session_id: str) -> None:
        if self.new_lv is None:
            if self.drop_kept:
                self._drop_kept_view()
            return
        if not self.volume.archive_id:
            self.abort()
            return
        new_lv, self.new_lv = self.new_lv, None
        try:
            self.runner.run(["lvchange", "--activate", "n", f"{self.vg}/{new_lv}"])
            if self.kept_listed:  # (one made since would fail the rename: no silent loss)
                self._remove_kept(look=False)
            self.runner.run(["lvrename", self.vg, new_lv, self.kept_lv])
        except BaseException:
            self.new_lv = new_lv
            self.abort()
            raise
        os.makedirs(self.records_dir, mode=0o700, exist_ok=True)
        write_record(
            self.record_path,
            ViewRecord(
                archive_id=self.volume.archive_id,
                volume=self.volume.name,
                size=self.new_size,
                base_session=session_id,
                view=self.kept_lv,
                identity=self.new_identity,
            ),
        )

    def abort(self) -> None:
        if self.new_lv is not None:
            lv, self.new_lv = self.new_lv, None
            self.runner.run(["lvremove", "--force", f"{self.vg}/{lv}"])

    # -- change detection ----------------------------------------------------------------------

    def _changes(
        self, table: dict[str, LvInfo], source: LvInfo
    ) -> tuple[list[Range] | None, str | None, str]:
        if not self.volume.archive_id:
            return None, None, "the archive ID is unknown"
        try:
            record = read_record(self.record_path)
        except ViewRecordError as exc:
            return None, None, f"kept snapshot unusable: {exc}"
        if record.archive_id != self.volume.archive_id or record.view != self.kept_lv:
            return None, None, "kept snapshot unusable: it belongs to another archive or volume"
        kept = table.get(self.kept_lv)
        if kept is None:
            return None, None, f"kept snapshot unusable: {self.vg}/{self.kept_lv} is gone"
        if (
            kept.thin_id is None
            or view_identity(kept) != record.identity
            or kept.pool != source.pool
        ):
            return None, None, "kept snapshot unusable: it was replaced (another LV under its name)"
        if not kept.size == record.size == self.new_size:
            if kept.size != record.size:
                return None, None, "kept snapshot unusable: it was resized"
            return None, None, "the volume changed size since the last backup"
        history = history_since(table, self.lv, kept.time)
        if history:
            return None, None, f"{history} since the last backup"
        try:
            ranges = self.thin_delta(source.pool, kept.thin_id, self.new_thin_id)
        except QbhubError as exc:
            return None, None, f"thin_delta unusable: {exc}"
        clipped = [(o, min(n, self.new_size - o)) for o, n in ranges if o < self.new_size]
        return clipped, record.base_session, ""

    def thin_delta(self, pool: str, left: int, right: int) -> list[Range]:
        """Changed byte ranges between two thin IDs of `pool`, via a pool metadata snapshot.

        The pool has one metadata snapshot slot. Under a per-pool lock (one qbhub at a time), a
        marker file says qbhub holds it; a marker found under the lock means a qbhub died holding
        it, so it is released first. A snapshot held by anything else is left alone (and this
        backup scans the whole volume).
        """
        tpool = f"/dev/mapper/{dm_name(self.vg, pool)}-tpool"
        tmeta = f"/dev/mapper/{dm_name(self.vg, pool)}_tmeta"
        os.makedirs(self.records_dir, mode=0o700, exist_ok=True)
        base = os.path.join(self.records_dir, f"{self.vg}--{pool}")
        marker = base + ".metadata-snap"
        with _pool_lock(base + ".lock"):
            if os.path.exists(marker):
                with contextlib.suppress(UsageError):
                    self.runner.run(["dmsetup", "message", tpool, "0", "release_metadata_snap"])
                os.unlink(marker)
            with open(marker, "w") as f:
                f.write(f"{os.getpid()}\n")
            try:
                self.runner.run(["dmsetup", "message", tpool, "0", "reserve_metadata_snap"])
            except UsageError:
                os.unlink(marker)
                raise UsageError(
                    f"the pool {self.vg}/{pool} has a metadata snapshot held by another program "
                    f"(if none should, free it: dmsetup message {tpool} 0 release_metadata_snap)"
                ) from None
            try:
                argv = ["thin_delta", "--metadata-snap", "--snap1", str(left), "--snap2",
                        str(right), tmeta]  # fmt: skip
                with self.runner.stream(argv) as out:
                    delta = parse_thin_delta(out)
            finally:
                self.runner.run(["dmsetup", "message", tpool, "0", "release_metadata_snap"])
                os.unlink(marker)
        if (delta.left, delta.right) != (left, right):
            raise UsageError("thin_delta compared other devices than asked")
        return delta.changed

    # -- helpers -------------------------------------------------------------------------------

    def _lvs(self, target: str) -> dict[str, LvInfo]:
        out = self.runner.run(lvs_argv(target))
        try:
            return parse_lvs(out)
        except ValueError as exc:
            raise UsageError(f"lvs: {exc}") from None

    def _direct(self, why: str) -> SnapshotView:
        """No snapshot: read the volume itself, whole, and drop the kept view at commit."""
        self.drop_kept = True
        return SnapshotView(
            path=self.volume.path,
            changed_ranges=None,
            provider=self.name,
            note=f"{why}; reading the volume itself, whole",
        )

    def _remove_kept(self, look: bool = True) -> None:
        """Remove the kept view if there is one (`look`: ask lvs first; else take()'s lvs
        listed it, and an LVM command fewer is a second less per backup under emulation)."""
        with contextlib.suppress(UsageError):  # not there: nothing to remove
            if not look or self.kept_lv in self._lvs(f"{self.vg}/{self.kept_lv}"):
                self.runner.run(["lvremove", "--force", f"{self.vg}/{self.kept_lv}"])

    def _drop_kept_view(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.record_path)
        self._remove_kept()


def _fullness(pool: LvInfo | None) -> str:
    if pool is None:
        return ""
    parts = []
    if pool.data_percent is not None and pool.data_percent >= 99.9:
        parts.append(f"data {pool.data_percent:g}% full")
    if pool.metadata_percent is not None and pool.metadata_percent >= 99.9:
        parts.append(f"metadata {pool.metadata_percent:g}% full")
    return f": pool {pool.name} {', '.join(parts)}" if parts else ""


@contextmanager
def _pool_lock(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
