"""The interface every benchmarked tool implements, and the step executor shared by all of them.

A runner knows how to set up an empty archive and which commands perform a backup and a restore;
``run_step`` drops caches, runs the command measured, and records the archive's size afterwards.
Each runner keeps its archive, cache and logs in its own directory under the benchmark workdir,
so runs never share state with each other or with the user's own configuration.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from measure import CacheDropper, StepResult, dir_usage, run_measured


@dataclass(frozen=True)
class Command:
    """One command line to run, and the directory to run it in."""

    argv: list[str]
    cwd: Path | None = None


class ToolRunner(ABC):
    """A backup tool under test, with its own archive (``repo``) and cache (``home``)."""

    name = "tool"

    def __init__(self, root: Path, passphrase: str) -> None:
        self.root = root
        self.repo = root / "repo"
        self.home = root / "home"
        self.logs = root / "logs"
        self.passphrase = passphrase

    @abstractmethod
    def missing(self) -> str | None:
        """Why the tool cannot run here (e.g. not installed), or None when it can."""

    @abstractmethod
    def version(self) -> str:
        """A one-line version string for the report."""

    @abstractmethod
    def tool_env(self) -> dict[str, str]:
        """Environment variables the tool needs (passphrase, cache locations)."""

    @abstractmethod
    def init_commands(self) -> list[Command]:
        """Commands that create an empty encrypted archive at ``self.repo`` (not measured)."""

    @abstractmethod
    def backup_command(self, image: Path, label: str) -> Command:
        """The command backing up ``image``; ``label`` names the snapshot if the tool wants one."""

    @abstractmethod
    def restore_command(self, image: Path, label: str, target: Path) -> tuple[Command, Path]:
        """Restore the latest backup of ``image`` under the empty directory ``target``.

        Returns the command and the path at which the restored image will appear.
        """

    def env(self) -> dict[str, str]:
        """The full environment for the tool's commands."""
        env = dict(os.environ)
        env.update(
            XDG_CACHE_HOME=str(self.home / "xdg-cache"),
            XDG_CONFIG_HOME=str(self.home / "xdg-config"),
            LC_ALL="C.UTF-8",
        )
        env.update(self.tool_env())
        return env

    def prepare(self) -> None:
        """Create the runner's directories and an empty archive; raise RuntimeError on failure."""
        for path in (self.home, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        for command in self.init_commands():
            done = subprocess.run(
                command.argv,
                env=self.env(),
                cwd=command.cwd,
                capture_output=True,
                text=True,
                check=False,
            )
            with open(self.logs / "init.log", "a") as log:
                log.write(f"$ {' '.join(command.argv)}\n{done.stdout}{done.stderr}")
            if done.returncode != 0:
                raise RuntimeError(
                    f"{self.name}: {' '.join(command.argv)} failed "
                    f"(exit {done.returncode}): {done.stderr.strip()[-800:]}"
                )

    def run_step(self, step: str, command: Command, dropper: CacheDropper) -> StepResult:
        """Drop caches, run ``command`` measured, then record archive and cache sizes."""
        dropper.drop()
        log = self.logs / f"{step.replace(' ', '-')}.log"
        result = run_measured(self.name, step, command.argv, self.env(), log, command.cwd)
        result.stored, result.stored_apparent = dir_usage(self.repo)
        result.cache = dir_usage(self.home)[0]
        if result.ok:
            result.notes = self.step_notes(result)
        return result

    def step_notes(self, result: StepResult) -> list[str]:
        """Facts the tool reported about a successful step, for the table (none by default)."""
        return []

    def remove_archive(self) -> None:
        """Delete everything the runner wrote."""
        shutil.rmtree(self.root, ignore_errors=True)


def command_version(argv: list[str]) -> str:
    """First line of a ``--version``-style command's output, or a short error."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"
