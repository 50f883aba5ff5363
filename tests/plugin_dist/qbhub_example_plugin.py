"""An example third-party qbhub plugin: a journaling directory store and a deny-list validator.

It uses only qbhub's public plugin interface (``hookspecs``, ``store.base``, ``names``, ``errors``,
``restore_header``), as any separately published plugin would:

* ``mirror://PATH`` -- a store keeping the archive in the local directory PATH: ``PATH/root``,
  ``PATH/objects/NAME``, ``PATH/partial/`` (uploads in progress), ``PATH/lock``. Every operation
  it performs is appended as one line, ``OP [NAME [BYTES]]``, to ``PATH/journal``.
* a restore validator refusing any volume named in ``QBHUB_EXAMPLE_DENY`` (comma-separated), and
  appending one line per header it checks to the file named by ``QBHUB_EXAMPLE_AUDIT`` (if set).

No module-level mutable state: each store keeps what it needs in itself, and the validator reads
its configuration when it is called.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qubes_backup_hub.errors import StoreError, UsageError, ValidationError
from qubes_backup_hub.hookspecs import hookimpl
from qubes_backup_hub.safety.names import check_object_name
from qubes_backup_hub.safety.restore_header import RestoreHeader
from qubes_backup_hub.store.base import Bytes, Store, StoreType

SCHEME = "mirror"
JOURNAL = "journal"
DENY_ENV = "QBHUB_EXAMPLE_DENY"
AUDIT_ENV = "QBHUB_EXAMPLE_AUDIT"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_line(path: Path, line: str) -> None:
    """Append one line with a single O_APPEND write (whole even with concurrent writers)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


class MirrorStore(Store):
    """An archive in a local directory, with a journal of every operation asked of it.

    Safe to call from several threads at once (engines upload and download in parallel): every
    method works on its own file descriptors, and journal lines are single appends.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"{SCHEME}://{path}"
        self._objects = path / "objects"
        self._partial = path / "partial"

    @classmethod
    def from_url(cls, url: str) -> MirrorStore:
        """Open ``mirror://PATH`` (PATH absolute or relative to the working directory)."""
        prefix = f"{SCHEME}://"
        if not url.startswith(prefix) or not url[len(prefix) :]:
            raise UsageError(f"expected {prefix}PATH, got {url!r}")
        return cls(Path(url[len(prefix) :]))

    # -- helpers ----------------------------------------------------------------------------------

    def _note(self, op: str, name: str = "", size: int | None = None) -> None:
        """Journal one operation (skipped while the archive directory does not exist yet)."""
        line = " ".join(str(part) for part in (op, name, size) if part not in ("", None))
        try:
            _append_line(self.path / JOURNAL, line)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._io("cannot write the journal", exc) from exc

    def _io(self, what: str, exc: OSError) -> StoreError:
        return StoreError(f"{what} in {self.url}: {exc.strerror or exc}")

    def _object(self, name: str) -> Path:
        return self._objects / check_object_name(name)

    def _write_new(self, name: str, data: Bytes) -> Path:
        """Write `data` to a new file under partial/, fsynced; return its path."""
        tmp = self._partial / f"{name}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def _open(self, name: str) -> int:
        try:
            return os.open(self._object(name), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise StoreError(f"object {name} is missing from {self.url}") from None
        except OSError as exc:
            raise self._io(f"cannot open object {name}", exc) from exc

    # -- the Store interface ----------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.path / "root").is_file()

    def create(self) -> None:
        if self.exists():
            raise StoreError(f"{self.url} already holds an archive")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if any(entry.name != JOURNAL for entry in self.path.iterdir()):
                raise StoreError(f"{self.url} is not empty; choose an empty or new directory")
            self._objects.mkdir()
            self._partial.mkdir()
        except OSError as exc:
            raise self._io("cannot create the archive directory", exc) from exc
        self._note("create")

    def put(self, name: str, data: Bytes) -> None:
        target = self._object(name)
        try:
            tmp = self._write_new(name, data)
            try:
                os.link(tmp, target)  # fails if `name` exists: objects are immutable
            except FileExistsError:
                raise StoreError(f"object {name} already exists; objects are immutable") from None
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise self._io(f"cannot write object {name}", exc) from exc
        self._note("put", name, len(data))

    def get(self, name: str, max_size: int) -> bytes:
        fd = self._open(name)
        try:
            size = os.fstat(fd).st_size
            if size > max_size:
                raise StoreError(f"object {name} is {size} bytes, more than the {max_size} allowed")
            data = os.pread(fd, max_size + 1, 0)
        except OSError as exc:
            raise self._io(f"cannot read object {name}", exc) from exc
        finally:
            os.close(fd)
        if len(data) > max_size:
            raise StoreError(f"object {name} grew beyond the {max_size} bytes allowed")
        self._note("get", name, len(data))
        return data

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise StoreError(f"invalid range {offset}+{length} of object {name}")
        fd = self._open(name)
        try:
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise self._io(f"cannot read object {name}", exc) from exc
        finally:
            os.close(fd)
        if len(data) != length:
            raise StoreError(
                f"object {name} is truncated: wanted {length} bytes at {offset}, got {len(data)}"
            )
        self._note("get_range", name, length)
        return data

    def list(self) -> Iterator[tuple[str, int]]:
        self._note("list")
        try:
            entries = sorted(os.scandir(self._objects), key=lambda e: e.name)
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    yield entry.name, entry.stat(follow_symlinks=False).st_size
        except OSError as exc:
            raise self._io("cannot list objects", exc) from exc

    def delete(self, name: str) -> None:
        try:
            self._object(name).unlink(missing_ok=True)
        except OSError as exc:
            raise self._io(f"cannot delete object {name}", exc) from exc
        self._note("delete", name)

    def get_root(self, max_size: int) -> bytes | None:
        try:
            fd = os.open(self.path / "root", os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._io("cannot open the root", exc) from exc
        try:
            data = os.pread(fd, max_size + 1, 0)
        except OSError as exc:
            raise self._io("cannot read the root", exc) from exc
        finally:
            os.close(fd)
        if len(data) > max_size:
            raise StoreError(f"the root of {self.url} is larger than {max_size} bytes")
        self._note("get_root", "", len(data))
        return data

    def put_root(self, data: bytes) -> None:
        try:
            _fsync_dir(self._objects)  # every object the new root names is durable first
            tmp = self._write_new("root", data)
            os.replace(tmp, self.path / "root")  # atomic: readers see the old root or the new
            _fsync_dir(self.path)
        except OSError as exc:
            raise self._io("cannot write the root", exc) from exc
        self._note("put_root", "", len(data))

    @contextmanager
    def lock(self) -> Iterator[None]:
        try:
            fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise self._io("cannot open the lock file", exc) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StoreError(f"{self.url} is in use by another writer") from None
                raise self._io("cannot lock the archive", exc) from exc
            self._note("lock")
            yield
        finally:
            os.close(fd)

    def remove_partial_uploads(self) -> int:
        removed = 0
        try:
            for entry in os.scandir(self._partial):
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._io("cannot remove partial uploads", exc) from exc
        self._note("remove_partial_uploads", "", removed)
        return removed


@hookimpl
def qbhub_register_stores(register: Callable[[StoreType], None]) -> None:
    """Offer the ``mirror://`` store."""
    register(
        StoreType(
            scheme=SCHEME,
            description="example plugin: a local directory with a journal of every operation",
            open=MirrorStore.from_url,
        )
    )


@hookimpl
def qbhub_validate_restore(header: RestoreHeader) -> None:
    """Refuse any volume whose name is listed in ``QBHUB_EXAMPLE_DENY``; audit every call."""
    denied = {n.strip() for n in os.environ.get(DENY_ENV, "").split(",") if n.strip()}
    names = [v.name for v in header.volumes] + [v.name for vm in header.vms for v in vm.volumes]
    refused = [name for name in names if name in denied]
    audit = os.environ.get(AUDIT_ENV)
    if audit:
        verdict = "refused" if refused else "allowed"
        try:
            _append_line(Path(audit), f"{verdict} {header.session} {','.join(names)}")
        except OSError as exc:  # no audit record, no restore
            raise ValidationError(f"restore refused: cannot write {audit}: {exc}") from None
    if refused:
        raise ValidationError(
            f"restore refused: volume {refused[0]!r} is on the deny list ({DENY_ENV})"
        )
