"""Built-in restore validators: the checks dom0 applies to every restore header."""

from __future__ import annotations

from ..errors import UsageError, ValidationError
from ..hookspecs import hookimpl
from .names import check_volume_name
from .restore_header import RestoreHeader
from .vm_rules import check_settings, check_vm_name, check_vm_volumes

MAX_VOLUME_BYTES = 1 << 50  # 1 PiB: anything larger is a lie, not a volume


@hookimpl
def qbhub_validate_restore(header: RestoreHeader) -> None:
    """Refuse invalid volume names, duplicate names and impossible sizes."""
    seen: set[str] = set()
    for volume in header.volumes:
        try:
            check_volume_name(volume.name)
        except UsageError as exc:
            raise ValidationError(f"restore refused: {exc}") from None
        if volume.name in seen:
            raise ValidationError(f"restore refused: volume {volume.name!r} appears twice")
        seen.add(volume.name)
        if not isinstance(volume.size, int) or not 0 <= volume.size <= MAX_VOLUME_BYTES:
            raise ValidationError(
                f"restore refused: volume {volume.name!r} has an impossible size {volume.size!r}"
            )
    names: set[str] = set()
    for vm in header.vms:
        check_vm_name(vm.name, "restore header")
        if vm.name in names:
            raise ValidationError(f"restore refused: VM {vm.name} appears twice")
        names.add(vm.name)
        check_settings(vm.name, vm.klass, vm.settings)
        volumes = [(v.name, v.size) for v in vm.volumes]
        check_vm_volumes(vm.name, vm.klass, volumes, MAX_VOLUME_BYTES)
