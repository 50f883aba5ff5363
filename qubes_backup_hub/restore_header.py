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
class RestoreHeader:
    """What a restore will import: the volumes, and for VM restores the VM's settings document."""

    volumes: tuple[RestoreVolume, ...]
    session: str
    settings: dict[str, Any] = field(default_factory=dict)
