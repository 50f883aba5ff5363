"""Profiles: named sets of command options in a TOML file, applied with `--profile NAME`.

The file is `$QBHUB_CONFIG`, else `$XDG_CONFIG_HOME/qbhub/config.toml` (by default
`~/.config/qbhub/config.toml`; in dom0 that is the dom0 user's). Each `[profiles.NAME]` table
holds option names as on the command line::

    [profiles.nightly]
    dest = "qubes://backupvm/main"
    passphrase-command = "cat /root/.qbhub-passphrase"
    all = true
    exclude = ["untrusted"]
    keep-daily = 7
    keep-weekly = 4
    schedule = "daily"

A profile supplies defaults only: an option given on the command line wins, then its
environment variable (`QBHUB_DEST`, ...), then the profile. Which keys reach which command:
archive keys reach every command that has the option; `vms`, `all` and `exclude` reach only
`qbhub backup` (never a restore); `keep-*` reach only `prune`; `schedule` and `verify-every`
are read by `qbhub schedule`.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError

PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MAX_CONFIG = 1 << 20


def _string(value: Any) -> bool:
    return isinstance(value, str)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


@dataclass(frozen=True)
class Key:
    """One profile key: the click parameter it feeds, the commands it reaches, its type."""

    param: str
    commands: frozenset[str] | None  # top-level command names; None: every command with `param`
    check: Callable[[Any], bool]
    expected: str


ARCHIVE = None
KEYS: dict[str, Key] = {
    "dest": Key("dest", ARCHIVE, _string, "a string"),
    "engine": Key("engine", ARCHIVE, _string, "a string"),
    "passphrase-file": Key("passphrase_file", ARCHIVE, _string, "a string"),
    "passphrase-command": Key("passphrase_command", ARCHIVE, _string, "a string"),
    "lock-wait": Key("lock_wait", ARCHIVE, _number, "a number of seconds"),
    "vms": Key("vms", frozenset({"backup"}), _strings, "a list of VM names"),
    "all": Key("all_vms", frozenset({"backup"}), _flag, "true or false"),
    "exclude": Key("exclude", frozenset({"backup"}), _strings, "a list of VM names"),
    "keep-last": Key("keep_last", frozenset({"prune"}), _count, "a count"),
    "keep-within": Key("keep_within", frozenset({"prune"}), _string, "a span like 2d"),
    "keep-hourly": Key("keep_hourly", frozenset({"prune"}), _count, "a count"),
    "keep-daily": Key("keep_daily", frozenset({"prune"}), _count, "a count"),
    "keep-weekly": Key("keep_weekly", frozenset({"prune"}), _count, "a count"),
    "keep-monthly": Key("keep_monthly", frozenset({"prune"}), _count, "a count"),
    "keep-yearly": Key("keep_yearly", frozenset({"prune"}), _count, "a count"),
    "schedule": Key("schedule", frozenset({"schedule"}), _string, "daily, hourly or a calendar"),
    "verify-every": Key("verify_every", frozenset({"schedule"}), _string, "a span like 30d"),
}


def config_path() -> Path:
    """Where the profiles are read from."""
    explicit = os.environ.get("QBHUB_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "qbhub" / "config.toml"


@dataclass(frozen=True)
class Profile:
    """One checked profile: its name and its keys (command-line spelling)."""

    name: str
    values: dict[str, Any]

    def defaults_for(self, command: str, params: set[str]) -> dict[str, Any]:
        """The click default_map of top-level command `command`, whose parameters are `params`."""
        out: dict[str, Any] = {}
        for key, value in self.values.items():
            spec = KEYS[key]
            if spec.param in params and (spec.commands is None or command in spec.commands):
                out[spec.param] = tuple(value) if isinstance(value, list) else value
        return out

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    @property
    def retention(self) -> dict[str, Any]:
        """The profile's keep-* rules, as keyword arguments of retention.make_rules."""
        return {
            key.removeprefix("keep-"): value
            for key, value in self.values.items()
            if key.startswith("keep-")
        }


def check_profile_name(name: str) -> str:
    if not PROFILE_NAME.fullmatch(name):
        raise UsageError(
            f"invalid profile name {name!r}: use 1-64 of A-Z a-z 0-9 _ -, starting with a "
            "letter or digit"
        )
    return name


def load_profiles(path: Path | None = None) -> dict[str, Profile]:
    """Every profile in the config file, checked; a missing file holds none."""
    path = path or config_path()
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG:
        raise UsageError(f"{path} is larger than 1 MiB")
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    unknown_tables = sorted(set(document) - {"profiles"})
    if unknown_tables:
        raise UsageError(
            f"{path}: unknown top-level key {unknown_tables[0]!r} (only [profiles.NAME])"
        )
    tables = document.get("profiles", {})
    if not isinstance(tables, dict):
        raise UsageError(f"{path}: `profiles` must be a table of [profiles.NAME] tables")
    profiles = {}
    for name, values in tables.items():
        check_profile_name(name)
        if not isinstance(values, dict):
            raise UsageError(f"{path}: profile {name} must be a table")
        for key, value in values.items():
            spec = KEYS.get(key)
            if spec is None:
                known = ", ".join(sorted(KEYS))
                raise UsageError(f"{path}: profile {name}: unknown key {key!r} (known: {known})")
            if not spec.check(value):
                raise UsageError(f"{path}: profile {name}: {key} must be {spec.expected}")
        profiles[name] = Profile(name, dict(values))
    return profiles


def load_profile(name: str, path: Path | None = None) -> Profile:
    """Profile `name`, or a usage error naming the file and the profiles it has."""
    check_profile_name(name)
    path = path or config_path()
    profiles = load_profiles(path)
    if name not in profiles:
        have = ", ".join(sorted(profiles)) or "none"
        raise UsageError(f"no profile {name!r} in {path} (profiles there: {have})")
    return profiles[name]
