"""Snapshot providers: a consistent view of a volume and what changed since the last backup."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class VolumeRef:
    """A volume the user asked to back up: where it lives and which archive it goes to."""

    name: str
    path: str
    archive_id: str = ""


@dataclass(frozen=True)
class SnapshotView:
    """A point-in-time view of a volume: a path to read and the ranges changed since last time."""

    path: str
    changed_ranges: list[tuple[int, int]] | None
    provider: str
    base_session: str | None = None  # the session the changed ranges are relative to
    note: str = ""  # why changed_ranges is None, when the provider knows (shown to the user)


class SnapshotProvider(ABC):
    """Made by the snapshot hook for one volume; see `hookspecs.qbhub_snapshot_provider`."""

    name = "abstract"

    @abstractmethod
    def take(self) -> SnapshotView:
        """Make the view (and compute changed ranges against the kept view, if any)."""

    def commit(self, session_id: str) -> None:  # noqa: B027 - optional, default does nothing
        """Keep the view for the next backup, as the state of session `session_id`."""

    def abort(self) -> None:  # noqa: B027 - optional hook point, default does nothing
        """Drop the view; called when the session failed."""


class PlainProvider(SnapshotProvider):
    """The fallback: the volume itself is the view, and every backup scans it whole."""

    name = "plain"

    def __init__(self, volume: VolumeRef) -> None:
        self.volume = volume

    def take(self) -> SnapshotView:
        return SnapshotView(path=self.volume.path, changed_ranges=None, provider=self.name)
