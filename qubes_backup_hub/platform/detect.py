"""Which platform to use: a real dom0 when qubesd is there, else the LocalPlatform."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError
from ..safety.rollback import default_home
from .base import Platform

QUBESD_SOCKET = Path("/var/run/qubesd.sock")


def platform_choice() -> str:
    """$QBHUB_PLATFORM (`local` or `qubes`) if set, else `qubes` when qubesd runs here
    ($QBHUB_QUBESD_SOCKET, else /var/run/qubesd.sock), else `local`."""
    socket = Path(os.environ.get("QBHUB_QUBESD_SOCKET") or QUBESD_SOCKET)
    return os.environ.get("QBHUB_PLATFORM") or ("qubes" if socket.exists() else "local")


def default_platform() -> Platform:
    """The platform platform_choice() names."""
    choice = platform_choice()
    if choice == "qubes":
        from .qubes.platform import QubesPlatform

        return QubesPlatform()
    if choice == "local":
        from .local.platform import LocalPlatform

        return LocalPlatform(default_home())
    raise UsageError(f"unknown platform {choice!r} in QBHUB_PLATFORM (use local or qubes)")
