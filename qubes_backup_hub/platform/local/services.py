"""Which Python module implements each "qrexec service" on the LocalPlatform.

In Qubes a service is a file in /etc/qubes-rpc of the target VM; here it is a module run with
`python -m` inside the VM's sandbox. Each platform has its own table (the defaults plus whatever
a caller, such as a test, registers), so nothing is shared between platforms.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ...errors import NotFoundError, UsageError

# qrexec's rules: service names and arguments are short and drawn from a small alphabet.
SERVICE_NAME = re.compile(r"[a-zA-Z0-9_.-]{1,64}")
SERVICE_ARG = re.compile(r"[a-zA-Z0-9_.+-]{1,64}")
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True)
class ServiceModule:
    """A service's module, and any extra import roots it needs (bound read-only)."""

    module: str
    python_path: tuple[Path, ...] = ()


DEFAULT_SERVICES: Mapping[str, ServiceModule] = MappingProxyType(
    {
        "qbhub.Storage": ServiceModule("qubes_backup_hub.agent.storage"),
        "qbhub.RestoreWorker": ServiceModule("qubes_backup_hub.workers.restore"),
    }
)


class ServiceTable:
    """Service name -> module, starting from DEFAULT_SERVICES."""

    def __init__(self, services: Mapping[str, ServiceModule] = DEFAULT_SERVICES) -> None:
        self._services = dict(services)

    def register(self, name: str, module: str, python_path: Sequence[Path] = ()) -> None:
        """Make `name` run `module` (importable from qbhub's roots or from `python_path`)."""
        if not SERVICE_NAME.fullmatch(name):
            raise UsageError(f"invalid service name {name[:40]!r}")
        if not MODULE_NAME.fullmatch(module):
            raise UsageError(f"invalid module name {module[:80]!r}")
        self._services[name] = ServiceModule(module, tuple(Path(p) for p in python_path))

    def resolve(self, name: str) -> ServiceModule:
        """The module behind `name`, or NotFoundError."""
        found = self._services.get(name)
        if found is None:
            raise NotFoundError(f"no service {name[:40]!r} on the local platform")
        return found

    def names(self) -> list[str]:
        return sorted(self._services)


def check_service_args(args: Sequence[str]) -> tuple[str, ...]:
    """Return `args` if each is a valid qrexec argument, else raise UsageError."""
    for arg in args:
        if not isinstance(arg, str) or not SERVICE_ARG.fullmatch(arg):
            raise UsageError(f"invalid service argument {str(arg)[:40]!r}")
    return tuple(args)
