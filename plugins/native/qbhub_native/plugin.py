"""The native engine's pluggy registration: one entry point, one engine."""

from __future__ import annotations

from collections.abc import Callable

from qubes_backup_hub.engine import EngineContext, EngineType
from qubes_backup_hub.hookspecs import hookimpl

from .engine import CAPABILITIES, NativeEngine


def _create(context: EngineContext) -> NativeEngine:
    return NativeEngine(context)


@hookimpl
def qbhub_register_engines(register: Callable[[EngineType], None]) -> None:
    register(
        EngineType(
            name="native",
            description="qbhub's block-delta engine: keyed chunks, sealed packs, hash-tree archive",
            capabilities=CAPABILITIES,
            create=_create,
        )
    )
