"""The Borg engine's helpers for qbhub's engine conformance kit."""

from __future__ import annotations

from pathlib import Path

from .serve import REPOSITORY


def corrupt_archive(archive_dir: Path) -> None:
    """Flip one byte in the middle of the largest Borg segment file (stored chunk data)."""
    segments = [p for p in (archive_dir / REPOSITORY / "data").rglob("*") if p.is_file()]
    largest = max(segments, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x01
    largest.write_bytes(bytes(data))
