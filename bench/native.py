"""Runner for qbhub's native engine, driven through its command line like any user would.

CLI contract used here::

    qbhub init --dest DIR --encryption on
    qbhub volume backup --dest DIR PATH=NAME --json
    qbhub volume restore --dest DIR NAME --to OUTPUT
    qbhub list --dest DIR --json

The passphrase comes from QBHUB_PASSPHRASE and the engine's small local state lives in QBHUB_HOME,
both pointed inside the benchmark workdir.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

from measure import StepResult
from runner import Command, ToolRunner, command_version

VOLUME = "image"


def backup_report(log_text: str) -> dict[str, object] | None:
    """The JSON document ``volume backup --json`` printed, found in a step's log."""
    decoder = json.JSONDecoder()
    offset = log_text.find("\n{")
    while offset != -1:
        try:
            doc, _ = decoder.raw_decode(log_text, offset + 1)
        except ValueError:
            offset = log_text.find("\n{", offset + 1)
            continue
        return doc if isinstance(doc, dict) else None
    return None


def default_qbhub() -> list[str] | None:
    """The ``qbhub`` console script next to this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "qbhub"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("qbhub")
    return [found] if found else None


def qbhub_command(override: str | None) -> list[str] | None:
    """The command prefix for qbhub: ``--qbhub CMD`` split like a shell would, else the default."""
    return shlex.split(override) if override else default_qbhub()


class NativeRunner(ToolRunner):
    """qbhub's native engine, encrypted (and compressed: the engine's default)."""

    name = "native"

    def __init__(self, root: Path, passphrase: str, qbhub: list[str] | None) -> None:
        super().__init__(root, passphrase)
        self.qbhub = qbhub or []

    def missing(self) -> str | None:
        """qbhub must be found (``--qbhub`` or installed next to this Python or on PATH)."""
        if not self.qbhub:
            return "qbhub not installed (pip install -e . -e plugins/native, or pass --qbhub)"
        return None

    def version(self) -> str:
        """``qbhub --version`` when the CLI offers it."""
        return f"{command_version([*self.qbhub, '--version'])} ({shlex.join(self.qbhub)})"

    def tool_env(self) -> dict[str, str]:
        """Passphrase and a private QBHUB_HOME."""
        return {"QBHUB_PASSPHRASE": self.passphrase, "QBHUB_HOME": str(self.home)}

    def init_commands(self) -> list[Command]:
        """An encrypted archive."""
        return [Command([*self.qbhub, "init", "--dest", str(self.repo), "--encryption", "on"])]

    def backup_command(self, image: Path, label: str) -> Command:
        """``qbhub volume backup --dest DIR IMAGE=image --json``; every run makes a new session."""
        return Command(
            [
                *self.qbhub,
                "volume",
                "backup",
                "--dest",
                str(self.repo),
                f"{image}={VOLUME}",
                "--json",
            ]
        )

    def restore_command(self, image: Path, label: str, target: Path) -> tuple[Command, Path]:
        """``qbhub volume restore --dest DIR image --to TARGET/image.img`` (latest session)."""
        output = target / f"{VOLUME}.img"
        command = Command(
            [
                *self.qbhub,
                "volume",
                "restore",
                "--dest",
                str(self.repo),
                VOLUME,
                "--to",
                str(output),
            ]
        )
        return command, output

    def step_notes(self, result: StepResult) -> list[str]:
        """For backups: how the engine found the changes, what it read, how many chunks were new."""
        if result.step == "restore":
            return []
        with open(result.log, errors="replace") as f:
            doc = backup_report(f.read())
        volumes = doc.get("volumes") if doc else None
        if not isinstance(volumes, list):
            return ["no --json report found in the log"]
        return [
            f"volume {v.get('name')}: change detection {v.get('provider')}, read "
            f"{int(v.get('bytes_read', 0)) / 1e6:.1f} MB, {v.get('chunks_new')} new chunks"
            for v in volumes
            if isinstance(v, dict)
        ]
