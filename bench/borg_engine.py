"""Runner for qbhub's Borg engine (plugins/borg_qrexec), through the same command line.

Only `init` differs from the native runner (`--engine borg`); every later command finds the
engine from the archive. borg itself runs in the engine's sandboxed worker and `borg serve` in
the storage-side sandbox, so the step's CPU includes both (they are this process's descendants).
"""

from __future__ import annotations

from measure import StepResult
from native import NativeRunner
from runner import Command


class BorgEngineRunner(NativeRunner):
    """qbhub --engine borg (repokey-blake2, fixed 64 KiB chunks, zstd,3)."""

    name = "borg-engine"

    def missing(self) -> str | None:
        """qbhub must be found and its borg engine installed."""
        reason = super().missing()
        if reason is None:
            try:
                import qbhub_borg  # noqa: F401
            except ImportError:
                reason = "qbhub-borg not installed (pip install -e plugins/borg_qrexec)"
        return reason

    def init_commands(self) -> list[Command]:
        """A Borg archive (always encrypted)."""
        return [Command([*self.qbhub, "init", "--engine", "borg", "--dest", str(self.repo)])]

    def step_notes(self, result: StepResult) -> list[str]:
        """Borg reports per-archive figures only."""
        return []
