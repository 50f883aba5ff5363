"""Where passphrases come from: a file, a command's output, the QBHUB_PASSPHRASE environment
variable, or a prompt."""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import PassphraseError

ENV_VAR = "QBHUB_PASSPHRASE"
MAX_PASSPHRASE_FILE = 64 * 1024
COMMAND_TIMEOUT = 120.0  # seconds a --passphrase-command may take (a pinentry waits for a human)


@dataclass(frozen=True)
class PassphraseSource:
    """Obtains a passphrase on demand, the first available of: file, command, environment,
    terminal."""

    file: Path | None = None
    command: str | None = None  # run without a shell (split like a shell would); stdout's 1st line
    env_var: str | None = ENV_VAR
    prompt: str = "Passphrase for the archive: "
    value: bytes | None = None  # given directly (e.g. handed to a restore worker by dom0)
    what: str = "passphrase"  # how errors name it ("new passphrase")
    file_option: str = "--passphrase-file or --passphrase-command"  # what errors suggest

    def will_prompt(self) -> bool:
        """True if get() would ask on the terminal (no value, file or environment variable)."""
        return (
            self.value is None
            and self.file is None
            and self.command is None
            and not (self.env_var and os.environ.get(self.env_var))
        )

    def get(self, *, confirm: bool = False) -> bytes:
        """Return the passphrase as UTF-8 bytes; `confirm` asks twice when prompting."""
        if self.value is not None:
            phrase = self.value
        elif self.file is not None:
            try:
                raw = self.file.read_bytes()[: MAX_PASSPHRASE_FILE + 1]
            except OSError as exc:
                raise PassphraseError(
                    f"cannot read passphrase file {self.file}: {exc.strerror}"
                ) from None
            if len(raw) > MAX_PASSPHRASE_FILE:
                raise PassphraseError(f"passphrase file {self.file} is larger than 64 KiB")
            phrase = raw.rstrip(b"\r\n")
        elif self.command is not None:
            phrase = run_passphrase_command(self.command)
        elif self.env_var and os.environ.get(self.env_var):
            phrase = os.environ[self.env_var].encode()
        elif sys.stdin.isatty():
            first = getpass.getpass(self.prompt)
            if confirm and getpass.getpass("Repeat the passphrase: ") != first:
                raise PassphraseError("the two passphrases differ")
            phrase = first.encode()
        else:
            variable = f"set {self.env_var}, " if self.env_var else ""
            raise PassphraseError(
                f"no {self.what}: give {self.file_option}, {variable}or run on a terminal"
            )
        if not phrase:
            raise PassphraseError(f"the {self.what} is empty")
        return phrase


def run_passphrase_command(command: str) -> bytes:
    """The first line `command` prints (like BORG_PASSCOMMAND); its stderr goes to the user."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise PassphraseError(f"cannot parse --passphrase-command: {exc}") from None
    if not argv:
        raise PassphraseError("--passphrase-command is empty")
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, timeout=COMMAND_TIMEOUT
        )
    except FileNotFoundError:
        raise PassphraseError(f"passphrase command not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise PassphraseError(
            f"passphrase command {argv[0]} gave no answer in {COMMAND_TIMEOUT:g} s"
        ) from None
    except OSError as exc:
        raise PassphraseError(f"cannot run passphrase command {argv[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        raise PassphraseError(f"passphrase command {argv[0]} failed (exit {done.returncode})")
    if len(done.stdout) > MAX_PASSPHRASE_FILE:
        raise PassphraseError(f"passphrase command {argv[0]} printed more than 64 KiB")
    return done.stdout.split(b"\n", 1)[0].rstrip(b"\r")
