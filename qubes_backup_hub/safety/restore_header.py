"""The header of a restore stream: what dom0 is told before any restored byte is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RestoreVolume:
    """One volume in a restore stream: its name and exact size in bytes."""

    name: str
    size: int


@dataclass(frozen=True)
class RestoreVM:
    """One VM in a restore stream: name, class, settings document, and its volumes in order."""

    name: str
    klass: str
    settings: dict[str, Any]
    volumes: tuple[RestoreVolume, ...]


@dataclass(frozen=True)
class RestoreHeader:
    """What a restore will import: plain volumes, or VMs with their settings and volumes."""

    volumes: tuple[RestoreVolume, ...]
    session: str
    settings: dict[str, Any] = field(default_factory=dict)
    vms: tuple[RestoreVM, ...] = ()
