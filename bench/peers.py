"""Runners for the peer tools: Borg 1.2 and restic 0.14, as packaged by Debian 12.

Settings follow ../shared/notes/peers.md so numbers are comparable with earlier measurements:
borg ``repokey-blake2`` with ``zstd,3`` compression and its default (buzhash) chunker unless told
otherwise; restic repository version 2 (compressed, ``auto`` level).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from runner import Command, ToolRunner, command_version


class BorgRunner(ToolRunner):
    """Borg: ``init --encryption=repokey-blake2``, ``create``, ``extract``."""

    name = "borg"

    def __init__(self, root: Path, passphrase: str, chunker_params: str | None = None) -> None:
        super().__init__(root, passphrase)
        self.chunker_params = chunker_params

    def missing(self) -> str | None:
        """Borg must be on PATH."""
        return None if shutil.which("borg") else "borg not installed (apt-get install borgbackup)"

    def version(self) -> str:
        """``borg --version``, plus the chunker used."""
        chunker = self.chunker_params or "default chunker"
        return f"{command_version(['borg', '--version'])} ({chunker}, zstd,3)"

    def tool_env(self) -> dict[str, str]:
        """Passphrase and a private BORG_BASE_DIR; no interactive questions."""
        return {
            "BORG_PASSPHRASE": self.passphrase,
            "BORG_BASE_DIR": str(self.home),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_DISPLAY_PASSPHRASE": "no",
        }

    def init_commands(self) -> list[Command]:
        """An authenticated, encrypted repository."""
        return [Command(["borg", "init", "--encryption=repokey-blake2", str(self.repo)])]

    def backup_command(self, image: Path, label: str) -> Command:
        """``borg create --compression zstd,3 REPO::label IMAGE``."""
        argv = ["borg", "create", "--compression", "zstd,3"]
        if self.chunker_params:
            argv += ["--chunker-params", self.chunker_params]
        return Command([*argv, f"{self.repo}::{label}", str(image)])

    def restore_command(self, image: Path, label: str, target: Path) -> tuple[Command, Path]:
        """``borg extract REPO::label`` run inside ``target`` (paths are stored relative)."""
        command = Command(["borg", "extract", f"{self.repo}::{label}"], cwd=target)
        return command, target / str(image).lstrip("/")


class ResticRunner(ToolRunner):
    """restic: ``init --repository-version 2``, ``backup``, ``restore latest --target``."""

    name = "restic"
    host = "qbhub-bench"

    def missing(self) -> str | None:
        """restic must be on PATH."""
        return None if shutil.which("restic") else "restic not installed (apt-get install restic)"

    def version(self) -> str:
        """``restic version``."""
        return f"{command_version(['restic', 'version'])} (repository v2, compression auto)"

    def tool_env(self) -> dict[str, str]:
        """Passphrase, repository and a private cache."""
        return {
            "RESTIC_PASSWORD": self.passphrase,
            "RESTIC_REPOSITORY": str(self.repo),
            "RESTIC_CACHE_DIR": str(self.home / "cache"),
        }

    def init_commands(self) -> list[Command]:
        """A compressed (version 2) repository."""
        return [Command(["restic", "init", "--repository-version", "2"])]

    def backup_command(self, image: Path, label: str) -> Command:
        """``restic backup IMAGE``; the last snapshot of the same host and path is the parent."""
        return Command(["restic", "backup", "--host", self.host, "--tag", label, str(image)])

    def restore_command(self, image: Path, label: str, target: Path) -> tuple[Command, Path]:
        """``restic restore latest --target DIR``; the file appears under its absolute path."""
        command = Command(
            ["restic", "restore", "latest", "--host", self.host, "--target", str(target)]
        )
        return command, target / str(image).lstrip("/")
