"""Progress of long work: a one-line bar on a terminal (bytes, rate, ETA), silence otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    """Format a byte count with binary units: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """Reports progress of one task at a time; draws only when the stream is a terminal."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = ""
        self.total = 0
        self.done = 0
        self.started = 0.0
        self.last_draw = 0.0

    def start(self, label: str, total: int) -> None:
        """Begin a task of `total` bytes."""
        self.label, self.total, self.done = label, total, 0
        self.started = self.last_draw = time.monotonic()
        self._draw(force=True)

    def advance(self, nbytes: int) -> None:
        """Record `nbytes` more of the task as done."""
        self.done += nbytes
        self._draw()

    def finish(self) -> None:
        """End the task and leave its final line on screen."""
        self.done = max(self.done, self.total)
        self._draw(force=True)
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last_draw < 0.2:
            return
        self.last_draw = now
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        fraction = self.done / self.total if self.total else 1.0
        width = 24
        bar = "#" * int(fraction * width)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (
            f"\r{self.label[:28]:<28} [{bar:<{width}}] {fraction * 100:5.1f}% "
            f"{human_bytes(self.done)}/{human_bytes(self.total)} {human_bytes(rate)}/s "
            f"ETA {eta:4.0f}s"
        )
        self.stream.write(line)
        self.stream.flush()
