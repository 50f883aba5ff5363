"""Progress of long work: a one-line bar on a terminal (bytes, rate, ETA), silence otherwise."""

from __future__ import annotations

import shutil
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
    """Reports progress of one task at a time; draws only when the stream is a terminal.

    `advance` counts bytes that were really read or written; `skip` counts bytes passed over
    without work (holes, unchanged ranges): they move the bar but not the rate, so a sparse
    volume neither jumps to 100% at the end nor shows a rate of hundreds of GiB/s.
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = ""
        self.total = 0
        self.done = 0
        self.worked = 0
        self.started = 0.0
        self.last_draw = 0.0

    def start(self, label: str, total: int) -> None:
        """Begin a task of `total` bytes."""
        self.label, self.total, self.done, self.worked = label, total, 0, 0
        self.started = self.last_draw = time.monotonic()
        self._draw(force=True)

    def advance(self, nbytes: int) -> None:
        """Record `nbytes` more of the task as done, by real work."""
        self.done += nbytes
        self.worked += nbytes
        self._draw()

    def skip(self, nbytes: int) -> None:
        """Record `nbytes` more of the task as done without work (a hole, an unchanged range)."""
        self.done += nbytes
        self._draw()

    def finish(self) -> None:
        """End the task and leave its final line on screen."""
        self.done = max(self.done, self.total)
        self._draw(force=True, final=True)
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def line(self, now: float, *, final: bool = False) -> str:
        """The status line at time `now` (without the carriage return)."""
        elapsed = now - self.started
        fraction = min(self.done / self.total, 1.0) if self.total else 1.0
        width = 24
        bar = "#" * int(fraction * width)
        text = (
            f"{self.label[:28]:<28} [{bar:<{width}}] {fraction * 100:5.1f}% "
            f"{human_bytes(self.done)}/{human_bytes(self.total)}"
        )
        if elapsed >= 1.0 and self.worked:
            rate = self.worked / elapsed
            text += f" {human_bytes(rate)}/s"
            if not final:
                text += f" ETA {clock((self.total - self.done) / rate)}"
        if final:
            text += f" in {clock(elapsed)}"
        return text

    def _draw(self, force: bool = False, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last_draw < 0.2:
            return
        self.last_draw = now
        columns = shutil.get_terminal_size((100, 24)).columns
        # Cut to the terminal's width (a wrapped line can't be redrawn) and clear what is left
        # of a longer earlier line.
        self.stream.write("\r" + self.line(now, final=final)[: max(columns - 1, 20)] + "\x1b[K")
        self.stream.flush()


def clock(seconds: float) -> str:
    """12s, 4m05s, 2h03m."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
