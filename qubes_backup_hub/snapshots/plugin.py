"""The built-in snapshot plugin: picks the reflink or LVM thin provider for a volume, if it fits.

Registered through the ``qbhub`` entry-point group like any third-party plugin, with
``tryfirst=True`` so that it answers before generic providers. Volumes it does not claim fall
back to the host's PlainProvider (full scan against the previous manifest, holes skipped).
"""

from __future__ import annotations

import os
import shutil
import stat

from ..hookspecs import hookimpl
from ..safety.rollback import default_home
from ..snapshot import SnapshotProvider, VolumeRef
from .fiemap import filesystem_type, reflink_supported
from .reflink import ReflinkProvider
from .thin import LvmThinProvider, parse_lv_path

REFLINK_FILESYSTEMS = ("btrfs", "xfs")


def reflink_provider_for(volume: VolumeRef) -> ReflinkProvider | None:
    """A ReflinkProvider if `volume.path` is a regular file on a reflink-capable btrfs or xfs."""
    try:
        real = os.path.realpath(volume.path)
        if not stat.S_ISREG(os.stat(real).st_mode):
            return None
    except OSError:
        return None
    directory = os.path.dirname(real)
    fs_type = filesystem_type(directory)
    if fs_type not in REFLINK_FILESYSTEMS or not reflink_supported(directory):
        return None
    return ReflinkProvider(volume, fs_type)


def thin_provider_for(volume: VolumeRef) -> LvmThinProvider | None:
    """An LvmThinProvider if `volume.path` is a ``/dev/VG/LV`` block device and LVM is present."""
    if parse_lv_path(volume.path) is None or shutil.which("lvcreate") is None:
        return None
    try:
        if not stat.S_ISBLK(os.stat(volume.path).st_mode):
            return None
    except OSError:
        return None
    return LvmThinProvider(volume, str(default_home() / "thin-views"))


@hookimpl(tryfirst=True)
def qbhub_snapshot_provider(volume: VolumeRef) -> SnapshotProvider | None:
    return reflink_provider_for(volume) or thin_provider_for(volume)
