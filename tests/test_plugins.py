"""The plugin host: entry-point discovery, registration records, duplicates, validators."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import Qbhub

from qubes_backup_hub.engine import EngineType
from qubes_backup_hub.errors import ValidationError
from qubes_backup_hub.hookspecs import hookimpl
from qubes_backup_hub.registry import load_registry
from qubes_backup_hub.safety.restore_header import RestoreHeader, RestoreVolume
from qubes_backup_hub.store.base import StoreType


def test_engines_command_lists_native_with_capabilities(qbhub: Qbhub) -> None:
    result = qbhub.json("engines")
    engines = {e["name"]: e for e in result["engines"]}
    assert "native" in engines
    assert {"encryption", "incremental", "dedup", "verify", "prune"} <= set(
        engines["native"]["capabilities"]
    )
    assert "file" in {s["scheme"] for s in result["stores"]}
    assert result["problems"] == []


def test_builtins_are_loaded_through_the_entry_point_group() -> None:
    names = {name for name, _ in load_registry().pm.list_name_plugin()}
    assert {"native", "builtin-local-store", "builtin-file-stream", "builtin-validators"} <= names


class DuplicateOffers:
    """A plugin offering an engine and a store whose names are already taken."""

    @hookimpl
    def qbhub_register_engines(self, register: Callable[[EngineType], None]) -> None:
        register(EngineType("native", "impostor", frozenset(), create=lambda ctx: None))  # type: ignore[arg-type,return-value]

    @hookimpl
    def qbhub_register_stores(self, register: Callable[[StoreType], None]) -> None:
        register(StoreType("file", "impostor", open=lambda url: None))  # type: ignore[arg-type,return-value]


def test_duplicate_names_are_reported_and_the_first_offer_kept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = load_registry(extra_plugins=(DuplicateOffers(),))
    assert registry.engines["native"].description != "impostor"
    assert registry.stores["file"].description != "impostor"
    assert any("duplicate engine 'native'" in p for p in registry.problems)
    assert "duplicate store scheme 'file'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "size", "message"),
    [
        ("../etc", 10, "invalid volume name"),
        ("ok", -1, "impossible size"),
        ("ok", 1 << 60, "impossible size"),
    ],
)
def test_builtin_validator_refuses_bad_headers(name: str, size: int, message: str) -> None:
    hook = load_registry().pm.hook
    header = RestoreHeader(volumes=(RestoreVolume(name, size),), session="20261126T000000Z")
    with pytest.raises(ValidationError, match=message):
        hook.qbhub_validate_restore(header=header)


def test_builtin_validator_accepts_a_sane_header() -> None:
    hook = load_registry().pm.hook
    header = RestoreHeader(volumes=(RestoreVolume("private", 1 << 30),), session="20261126T000000Z")
    hook.qbhub_validate_restore(header=header)
