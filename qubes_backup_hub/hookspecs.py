"""The hook specifications of qbhub: what the host calls, and each hook's contract.

A plugin is a module (or object) with functions marked ``@hookimpl`` and named like the specs below,
published through the ``qbhub`` entry-point group. The host loads built-ins and third-party plugins
the same way. There are four hook families, called in the order data flows on a backup:

* **snapshot** -- a consistent, point-in-time view of one volume, and what changed since last time;
* **stream**   -- the bytes of such a view, as data extents (holes are never read);
* **store**    -- where archives live: a flat namespace of immutable objects plus one mutable root;
* **restore-validate** -- dom0's checks on what a restore is about to import.

Engines (the code that turns streams into an archive and back) are offered through a registration
hook, as are stores. Registration hooks receive a ``register`` callable and call it once per offer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

from . import PLUGIN_GROUP

if TYPE_CHECKING:
    from .engine import EngineType
    from .safety.restore_header import RestoreHeader
    from .snapshot import SnapshotProvider, VolumeRef
    from .store.base import StoreType
    from .stream.base import VolumeStream

hookspec = pluggy.HookspecMarker(PLUGIN_GROUP)
hookimpl = pluggy.HookimplMarker(PLUGIN_GROUP)


# -- registration -----------------------------------------------------------------------------


@hookspec
def qbhub_register_engines(register: Callable[[EngineType], None]) -> None:
    """Offer backup engines.

    Called once when the plugin manager is built. Call ``register(EngineType(...))`` once per
    engine; the name must be unique among all installed plugins (a duplicate is reported and the
    second offer ignored). ``qbhub engines`` lists what was registered with its capabilities.
    """


@hookspec
def qbhub_register_stores(register: Callable[[StoreType], None]) -> None:
    """Offer store types (transports), each named by the URL scheme it handles.

    Called once when the plugin manager is built. Call ``register(StoreType(scheme=..., ...))``
    once per scheme; a plain path (no ``scheme://``) means scheme ``file``. Duplicate schemes are
    reported and the second offer ignored.
    """


# -- snapshot -----------------------------------------------------------------------------------


@hookspec(firstresult=True)
def qbhub_snapshot_provider(volume: VolumeRef) -> SnapshotProvider | None:
    """Return a snapshot provider for ``volume``, or None if this plugin cannot snapshot it.

    Called once per volume at the start of a backup; the first non-None answer wins, so
    specialised providers (reflink, LVM thin) should be registered with ``tryfirst=True``. The
    provider's ``take()`` returns a consistent view, the byte ranges changed since the view kept
    from the previous backup of the same volume to the same archive (None when unknown: the engine
    then scans the whole volume), and the ID of the session that kept view belongs to; the engine
    trusts the ranges only if that session is still the volume's newest. ``commit(session_id)``
    keeps the view for next time after the session is committed; ``abort()`` drops it when the
    session fails. A provider that cannot trust its kept
    view (missing, damaged, other archive, size changed) must report None, never a guess.
    """


# -- stream -------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def qbhub_open_stream(path: str) -> VolumeStream | None:
    """Return a VolumeStream reading the volume view at ``path``, or None to let another try.

    Called by engines once per volume view. The stream reports its size, yields its data extents
    (holes are skipped without being read; SEEK_DATA/SEEK_HOLE where the kernel supports it) and
    reads by offset. The first non-None answer wins; the built-in handles files and block devices.
    """


# -- restore-validate ----------------------------------------------------------------------------


@hookspec
def qbhub_validate_restore(header: RestoreHeader) -> None:
    """Check what a restore is about to write, before a single byte of it is written.

    Called in dom0 (the trusted side) with the header of a restore stream: the names and exact
    sizes of the volumes (and, for VM restores, the settings) decoded by the restore worker. Every
    implementation is called; any of them refuses by raising ``qubes_backup_hub.errors.
    ValidationError`` with one line saying what and where. Returning normally means "no objection".
    Implementations must not modify the header.
    """
