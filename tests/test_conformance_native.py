"""The native engine against qbhub's engine conformance kit."""

from __future__ import annotations

from pathlib import Path

import pytest

from qubes_backup_hub.testing.conformance import EngineConformance, EngineUnderTest


def corrupt_native(archive_dir: Path) -> None:
    """Flip one byte in the middle of the largest object (a pack of chunk data)."""
    objects = [p for p in (archive_dir / "objects").rglob("*") if p.is_file()]
    largest = max(objects, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x01
    largest.write_bytes(bytes(data))


@pytest.mark.slow
class TestNativeConformance(EngineConformance):
    engine = EngineUnderTest(name="native", corrupt=corrupt_native)
