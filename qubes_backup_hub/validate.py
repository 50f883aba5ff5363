"""Built-in restore validators: the checks dom0 applies to every restore header."""

from __future__ import annotations

from .errors import UsageError, ValidationError
from .hookspecs import hookimpl
from .names import check_volume_name
from .restore_header import RestoreHeader

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
