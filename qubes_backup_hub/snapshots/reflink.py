"""The reflink snapshot provider, for volume files on btrfs and xfs (reflink=1).

take() clones the volume with FICLONE into ``.qbhub-views/`` beside it (same filesystem: a
metadata-only, atomic copy, so a running VM's writes land either before or after it, never half).
The backup reads that clone. Changed ranges come from comparing the FIEMAP extent maps of the view
kept from the previous backup of the same volume to the same archive with the new clone: blocks
both share are unchanged, anything else is reported (see `ranges.extent_map_diff`).

One kept view per (archive ID, volume name): ``<archive>--<volume>.<token>.img`` plus a sidecar
``<archive>--<volume>.json`` (`viewrecord.ViewRecord`) naming the view and the session it is the
state of. commit() writes the new sidecar atomically and then deletes the old view; abort() deletes
the new clone. When anything about the kept view is in doubt -- no sidecar, a damaged one, another
archive's, a missing or swapped view file, a size change, an I/O error -- take() returns
changed_ranges None with a note saying why, and the engine scans the whole volume.

Space: the kept view pins the blocks the volume has overwritten since the last backup, exactly
like a pool snapshot (revision) would.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading

from ..errors import StoreError, UsageError
from ..snapshot import SnapshotProvider, SnapshotView, VolumeRef
from .fiemap import ficlone, fiemap
from .ranges import Range, extent_map_diff
from .viewrecord import ViewRecord, ViewRecordError, read_record, write_record

VIEWS_DIR = ".qbhub-views"


class ReflinkProvider(SnapshotProvider):
    """Snapshots a volume file by reflink copy; changes from FIEMAP maps. See the module doc."""

    name = "reflink"

    def __init__(self, volume: VolumeRef, fs_type: str) -> None:
        self.volume = volume
        self.fs_type = fs_type
        real = os.path.realpath(volume.path)
        self.views_dir = os.path.join(os.path.dirname(real), VIEWS_DIR)
        self.source = real
        self.key = f"{volume.archive_id or 'unknown'}--{volume.name}"
        self.record_path = os.path.join(self.views_dir, f"{self.key}.json")
        self.new_view: str | None = None
        self.new_size = 0
        self.new_inode = 0
        self._syncing: _Fsync | None = None

    # -- the SnapshotProvider interface --------------------------------------------------------

    def take(self) -> SnapshotView:
        try:
            os.makedirs(self.views_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {self.views_dir}: {exc.strerror}") from None
        view_name = f"{self.key}.{secrets.token_hex(8)}.img"
        path = os.path.join(self.views_dir, view_name)
        src = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self.new_view = path
            try:
                try:
                    ficlone(src, dst)
                except OSError as exc:
                    raise UsageError(
                        f"cannot reflink {self.source} into {self.views_dir}: {exc.strerror}"
                    ) from None
                st = os.fstat(dst)
                self.new_size, self.new_inode = st.st_size, st.st_ino
                changed, base, note = self._changes(dst)
            finally:
                os.close(dst)
        except BaseException:
            self.abort()
            raise
        finally:
            os.close(src)
        # The clone must be durable before a sidecar names it; flush it while the backup runs.
        self._syncing = _Fsync(path)
        return SnapshotView(
            path=path,
            changed_ranges=changed,
            provider=f"{self.name}-{self.fs_type}",
            base_session=base,
            note=note,
        )

    def commit(self, session_id: str) -> None:
        if self.new_view is None:
            return
        if not self.volume.archive_id:
            self.abort()  # nothing to key the view by: keep nothing rather than guess
            return
        try:
            old = read_record(self.record_path)
        except ViewRecordError:
            old = None
        if not self._synced():
            self.abort()  # not durable: keeping it could mislead the next backup after a crash
            return
        record = ViewRecord(
            archive_id=self.volume.archive_id,
            volume=self.volume.name,
            size=self.new_size,
            base_session=session_id,
            view=os.path.basename(self.new_view),
            identity=self.new_inode,
        )
        write_record(self.record_path, record)
        self.new_view = None
        if old is not None and old.view != record.view:
            _unlink(os.path.join(self.views_dir, old.view))

    def abort(self) -> None:
        self._synced()
        if self.new_view is not None:
            _unlink(self.new_view)
            self.new_view = None

    def _synced(self) -> bool:
        """Wait for the new view's fsync; True if it is durable."""
        syncing, self._syncing = self._syncing, None
        return syncing is not None and syncing.wait()

    # -- change detection ----------------------------------------------------------------------

    def _changes(self, new_fd: int) -> tuple[list[Range] | None, str | None, str]:
        """(changed ranges, base session, note) vs the kept view; (None, None, why) if unsure."""
        if not self.volume.archive_id:
            return None, None, "the archive ID is unknown"
        try:
            record = read_record(self.record_path)
        except ViewRecordError as exc:
            return None, None, f"kept view unusable: {exc}"
        if record.archive_id != self.volume.archive_id or record.volume != self.volume.name:
            return None, None, "kept view unusable: it belongs to another archive or volume"
        if not record.view.startswith(self.key + "."):
            return None, None, "kept view unusable: the sidecar names another file"
        old_path = os.path.join(self.views_dir, record.view)
        try:
            old_fd = os.open(old_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            return None, None, f"kept view unusable: {exc.strerror}"
        try:
            st = os.fstat(old_fd)
            if st.st_ino != record.identity:
                return None, None, "kept view unusable: the view file was replaced"
            if not st.st_size == record.size == self.new_size:
                return None, None, "the volume changed size since the last backup"
            old_map = fiemap(old_fd)
            new_map = fiemap(new_fd)
        except OSError as exc:
            return None, None, f"kept view unusable: FIEMAP failed ({exc.strerror})"
        finally:
            os.close(old_fd)
        try:
            ranges = extent_map_diff(old_map, new_map, self.new_size)
        except ValueError as exc:
            return None, None, f"kept view unusable: {exc}"
        return ranges, record.base_session, ""


class _Fsync:
    """fsync() of one file on a background thread; wait() says whether it succeeded."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.ok = False
        self.thread = threading.Thread(target=self._run, name="qbhub-view-fsync", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.ok = True
        except OSError:
            self.ok = False

    def wait(self) -> bool:
        self.thread.join()
        return self.ok


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
