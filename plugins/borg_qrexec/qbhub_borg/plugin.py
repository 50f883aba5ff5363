"""The Borg engine's pluggy registration: one entry point, one engine."""

from __future__ import annotations

from collections.abc import Callable

from qubes_backup_hub.engine import EngineContext, EngineType
from qubes_backup_hub.hookspecs import hookimpl

from .engine import CAPABILITIES, BorgEngine
from .marker import is_marker


def _create(context: EngineContext) -> BorgEngine:
    return BorgEngine(context)


@hookimpl
def qbhub_register_engines(register: Callable[[EngineType], None]) -> None:
    register(
        EngineType(
            name="borg",
            description="Borg 1.2 in a sandboxed backup worker, borg serve beside the storage "
            "(repokey-blake2, fixed 64 KiB chunks, zstd)",
            capabilities=CAPABILITIES,
            create=_create,
            claims_root=is_marker,
        )
    )
