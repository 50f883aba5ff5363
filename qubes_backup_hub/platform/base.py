"""The platform interface: VMs, their settings and volumes, and services run in other VMs.

Two implementations stand behind it with the same callers: `QubesPlatform` (a real dom0, through
the Admin API and qrexec) and `LocalPlatform` (any Linux: VMs in a state file, volumes as files,
"VM" services as sandboxed processes). The hub never asks which one it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

# VM classes as Qubes names them.
VM_CLASSES = ("AppVM", "TemplateVM", "StandaloneVM", "DispVM", "AdminVM")
# Which volumes of each class are persistent (backed up); volatile and kernel never are.
PERSISTENT_VOLUMES = {
    "AppVM": ("private",),
    "DispVM": ("private",),
    "TemplateVM": ("root", "private"),
    "StandaloneVM": ("root", "private"),
}
LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")


@dataclass(frozen=True)
class VMSummary:
    """A VM as listed: name, class and power state ("Running", "Halted", ...)."""

    name: str
    klass: str
    state: str


@dataclass
class VMSettings:
    """Everything about a VM that a restore must bring back, besides its volume data.

    `properties` holds every non-default property by name (label, template and netvm included,
    as strings; "" for None); features and tags as Qubes stores them; devices as
    {"class", "backend", "ident", "options", "required"} records; firewall rules as Qubes' rule
    strings; notes as free text.
    """

    name: str
    klass: str
    properties: dict[str, Any] = field(default_factory=dict)
    features: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    firewall: list[str] = field(default_factory=list)
    notes: str = ""


@dataclass(frozen=True)
class VolumeInfo:
    """A VM volume: name, exact size, pool, and the path a snapshot provider reads it from."""

    vm: str
    name: str
    size: int
    pool: str
    path: str
    pool_driver: str = "file"


class ServiceProcess(ABC):
    """A service running in another VM (or sandbox), talking over its stdin and stdout."""

    stdin: IO[bytes]
    stdout: IO[bytes]

    @abstractmethod
    def wait(self, timeout: float | None = None) -> int:
        """Wait for the service to end; return its exit status."""

    @abstractmethod
    def kill(self) -> None:
        """Stop the service now."""


class Platform(ABC):
    """What the hub needs from the system it backs up."""

    name: str

    @abstractmethod
    def list_vms(self) -> list[VMSummary]:
        """Every VM with its class and state (dom0/AdminVM included)."""

    @abstractmethod
    def vm_settings(self, vm: str) -> VMSettings:
        """The settings of one VM."""

    @abstractmethod
    def vm_volumes(self, vm: str) -> list[VolumeInfo]:
        """The VM's persistent volumes (see PERSISTENT_VOLUMES)."""

    @abstractmethod
    def create_vm(self, settings: VMSettings, *, pool: str | None = None) -> None:
        """Create a VM of `settings.klass` with the label and template in `settings`."""

    @abstractmethod
    def apply_settings(self, settings: VMSettings) -> list[str]:
        """Apply properties, features, tags, devices, firewall, notes; return what failed."""

    @abstractmethod
    def import_volume(self, vm: str, volume: str, size: int, data: IO[bytes]) -> None:
        """Replace a volume's content with exactly `size` bytes read from `data`."""

    @abstractmethod
    def resize_volume(self, vm: str, volume: str, size: int) -> None:
        """Set `vm`'s `volume` to `size` bytes. Growing adds zeros; shrinking may be refused
        (UsageError): Qubes always refuses it, the LocalPlatform unless the cut part is a hole."""

    @abstractmethod
    def clone_volume(self, src_vm: str, dst_vm: str, volume: str) -> None:
        """Make `dst_vm`'s `volume` an exact copy of `src_vm`'s (size included).

        Cheap where the pool can share blocks (reflink files, thin LVM); the source is unchanged.
        """

    @abstractmethod
    def remove_vm(self, vm: str) -> None:
        """Delete a VM and its volumes."""

    @abstractmethod
    def call_service(self, vm: str, service: str, args: Sequence[str] = ()) -> ServiceProcess:
        """Start `service` in `vm` with stdin/stdout pipes (qrexec in Qubes)."""

    def host_limits(self) -> dict[str, int]:
        """Upper bounds this host puts on restored VM numbers ("memory" in MiB, "vcpus");
        a restore lowers larger values to these. The default knows no host limits."""
        return {}

    @abstractmethod
    def dispvm_service(self, service: str, args: Sequence[str] = ()) -> ServiceProcess:
        """Start `service` in a new disposable VM, destroyed when the service ends."""
