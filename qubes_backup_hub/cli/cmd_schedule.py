"""`qbhub schedule`: systemd timers that run a profile's backup, prune and verify unattended.

`install PROFILE` writes `qbhub-PROFILE.service` (a oneshot running `qbhub schedule run
PROFILE`) and `qbhub-PROFILE.timer`, then enables the timer; `list` and `remove` manage them.
`run PROFILE` is what the timer starts: backup (the profile's VMs), prune (if the profile has
keep-* rules), then verify (quick, or full when the last full verify is older than the
profile's `verify-every`, 30 days by default). Each step is the ordinary `qbhub` command with
`--profile`, so a scheduled run does exactly what the user would type. Output goes to the
journal; a failure also raises a desktop notification when a session bus is reachable;
success stays quiet apart from the journal.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import QbhubError, UsageError
from ..retention import parse_span
from ..safety.rollback import default_home
from .profiles import Profile, check_profile_name, config_path, load_profile

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_VERIFY_EVERY = "30d"
SHORTHANDS = {"daily": "daily", "hourly": "hourly", "weekly": "weekly"}


class ScheduleError(QbhubError):
    """systemd refused a unit or a command (exit code 1)."""


def unit_dir(user: bool) -> Path:
    if user:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "systemd" / "user"
    return Path("/etc/systemd/system")


def qbhub_command() -> list[str]:
    """How a unit starts this qbhub: the installed script if on PATH next to this Python."""
    script = Path(sys.executable).parent / "qbhub"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "qubes_backup_hub"]


def check_calendar(spec: str) -> str:
    """`spec` if systemd accepts it as OnCalendar= (when systemd-analyze is here to ask)."""
    if "\n" in spec or not spec.strip():
        raise UsageError(f"invalid calendar {spec!r}")
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        done = subprocess.run([analyze, "calendar", spec], capture_output=True, text=True)
        if done.returncode != 0:
            raise UsageError(f"systemd does not accept the calendar {spec!r} (see systemd.time(7))")
    return spec


UNIT_SAFE_PATH = re.compile(r"/[A-Za-z0-9/._+@:,=-]*")


def unit_path(path: str, what: str) -> str:
    """`path` if a unit file can carry it as it is: absolute, only characters systemd takes
    literally in ExecStart= and Environment= (no quotes, spaces, `%`, `$`, backslashes or
    control characters, which could end the line or be expanded), else a usage error."""
    if not UNIT_SAFE_PATH.fullmatch(path):
        raise UsageError(
            f"{what} {path!r} has characters a systemd unit can't carry safely: use a path of "
            "letters, digits and / . _ + @ : , = -"
        )
    return path


def check_root_config(path: Path) -> None:
    """A system unit runs as root: its profile (which names a command to run) must be root's."""
    try:
        st = path.stat()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise UsageError(
            f"a system timer runs as root, and {path} names commands it runs: it must be owned "
            "by root and writable by nobody else (chown root; chmod go-w)"
        )


def unit_texts(profile: Profile, calendar: str, command: list[str]) -> tuple[str, str]:
    """The .service and .timer of `profile`."""
    argv = [unit_path(command[0], "the qbhub command"), *command[1:], "schedule", "run",
            check_profile_name(profile.name)]  # fmt: skip
    run = " ".join(argv)  # every word is safe as it is (unit_path, check_profile_name)
    environment = {"QBHUB_CONFIG": unit_path(str(config_path().resolve()), "the config file")}
    if os.environ.get("QBHUB_HOME"):
        home = str(Path(os.environ["QBHUB_HOME"]).resolve())
        environment["QBHUB_HOME"] = unit_path(home, "QBHUB_HOME")
    assignments = "\n".join(f"Environment={k}={v}" for k, v in environment.items())
    service = f"""[Unit]
Description=qbhub scheduled backup of profile {profile.name}
After=network-online.target

[Service]
Type=oneshot
{assignments}
ExecStart={run}
Nice=10
IOSchedulingClass=idle
"""
    timer = f"""[Unit]
Description=qbhub schedule of profile {profile.name}

[Timer]
OnCalendar={calendar}
Persistent=true
RandomizedDelaySec=10min

[Install]
WantedBy=timers.target
"""
    return service, timer


def systemctl(user: bool, *args: str) -> None:
    argv = ["systemctl", *(["--user"] if user else []), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise ScheduleError("systemctl is not installed: use --no-enable") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise ScheduleError(f"{shlex.join(argv)} failed: {why}")


def where(user: bool | None, directory: Path | None) -> tuple[bool, Path]:
    as_user = (os.geteuid() != 0) if user is None else user
    return as_user, directory or unit_dir(as_user)


@click.group()
def schedule() -> None:
    """Run a profile's backup, prune and verify on a schedule (systemd timers)."""


scope_options = [
    click.option("--user/--system", "user", default=None,
                 help="User units (~/.config/systemd/user) or system units (/etc/systemd/system); "
                 "default: system for root, else user."),
    click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Write the units here instead (nothing is enabled)."),
]  # fmt: skip


def with_scope(func: F) -> F:
    for option in reversed(scope_options):
        func = option(func)
    return func


@schedule.command()
@click.argument("profile_name", metavar="PROFILE")
@click.option("--daily", "when", flag_value="daily", help="Once a day (the default).")
@click.option("--hourly", "when", flag_value="hourly", help="Once an hour.")
@click.option("--on-calendar", "calendar", metavar="SPEC", help="A systemd OnCalendar= spec.")
@click.option("--no-enable", is_flag=True, help="Write the units but do not enable the timer.")
@with_scope
def install(
    profile_name: str,
    when: str | None,
    calendar: str | None,
    no_enable: bool,
    user: bool | None,
    unit_dir: Path | None,
) -> None:
    """Write and enable the timer that runs PROFILE (`qbhub schedule run PROFILE`)."""
    profile = load_profile(profile_name)
    if when and calendar:
        raise UsageError("give --daily, --hourly or --on-calendar, not several")
    spec = calendar or when or profile.get("schedule") or "daily"
    spec = check_calendar(SHORTHANDS.get(spec, spec))
    if not profile.get("dest"):
        raise UsageError(f"profile {profile_name} has no dest: a scheduled run needs one")
    as_user, directory = where(user, unit_dir)
    if not as_user:
        check_root_config(config_path())
    service, timer = unit_texts(profile, spec, qbhub_command())
    directory.mkdir(parents=True, exist_ok=True)
    base = directory / f"qbhub-{profile.name}"
    for suffix, text in ((".service", service), (".timer", timer)):
        tmp = base.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(base.with_suffix(suffix))
    if not (no_enable or unit_dir):
        systemctl(as_user, "daemon-reload")
        systemctl(as_user, "enable", "--now", f"qbhub-{profile.name}.timer")
    state = "written" if (no_enable or unit_dir) else "enabled"
    click.echo(f"qbhub-{profile.name}.timer {state} in {directory}: {spec}")


@schedule.command("list")
@with_scope
def list_cmd(user: bool | None, unit_dir: Path | None) -> None:
    """The profiles that have a timer, and when each runs."""
    _as_user, directory = where(user, unit_dir)
    timers = sorted(directory.glob("qbhub-*.timer")) if directory.is_dir() else []
    if not timers:
        click.echo(f"no qbhub timers in {directory}")
    for timer in timers:
        calendar = next(
            (line.split("=", 1)[1] for line in timer.read_text().splitlines()
             if line.startswith("OnCalendar=")), "?",
        )  # fmt: skip
        click.echo(f"{timer.stem.removeprefix('qbhub-'):<24} {calendar}")


@schedule.command()
@click.argument("profile_name", metavar="PROFILE")
@with_scope
def remove(profile_name: str, user: bool | None, unit_dir: Path | None) -> None:
    """Disable PROFILE's timer and delete its units."""
    check_profile_name(profile_name)
    as_user, directory = where(user, unit_dir)
    base = directory / f"qbhub-{profile_name}"
    units = [base.with_suffix(".timer"), base.with_suffix(".service")]
    if not any(u.exists() for u in units):
        raise UsageError(f"no timer for profile {profile_name} in {directory}")
    if unit_dir is None:
        systemctl(as_user, "disable", "--now", f"qbhub-{profile_name}.timer")
    for unit in units:
        unit.unlink(missing_ok=True)
    if unit_dir is None:
        systemctl(as_user, "daemon-reload")
    click.echo(f"removed the timer of profile {profile_name}")


def verify_state_path(profile: Profile) -> Path:
    return default_home() / "schedule" / f"{profile.name}.json"


def full_verify_due(profile: Profile, now: float) -> bool:
    every = parse_span(str(profile.get("verify-every", DEFAULT_VERIFY_EVERY))).total_seconds()
    try:
        last = float(json.loads(verify_state_path(profile).read_text())["last_full_verify"])
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return now - last >= every


def notify_failure(text: str) -> None:
    """A desktop notification, when notify-send and a session bus are there; else nothing."""
    bus = os.environ.get("DBUS_SESSION_BUS_ADDRESS") or (
        f"unix:path=/run/user/{os.getuid()}/bus"
        if Path(f"/run/user/{os.getuid()}/bus").exists()
        else ""
    )
    tool = shutil.which("notify-send")
    if not bus or tool is None:
        return
    env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": bus}
    subprocess.run([tool, "--urgency=critical", "qbhub backup failed", text], env=env,
                   check=False, timeout=10, capture_output=True)  # fmt: skip


@schedule.command()
@click.argument("profile_name", metavar="PROFILE")
def run(profile_name: str) -> None:
    """Run PROFILE once as the timer does: backup, prune (keep-* rules), verify."""
    profile = load_profile(profile_name)
    now = time.time()
    full = full_verify_due(profile, now)
    steps = [["backup"]]
    if profile.retention:
        steps.append(["prune"])
    steps.append(["verify"] if full else ["verify", "--quick"])
    for step in steps:
        argv = [*qbhub_command(), "-v", *step, "--profile", profile.name]  # -v: to the journal
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            command = shlex.join(["qbhub", *step])
            text = f"profile {profile.name}: `{command}` failed (exit {done.returncode})"
            notify_failure(text)
            raise ScheduledRunFailed(text, done.returncode)
    if full:
        path = verify_state_path(profile)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"last_full_verify": now}))
    click.echo(f"profile {profile.name}: {', '.join(' '.join(s) for s in steps)} done")


class ScheduledRunFailed(QbhubError):
    """A step of a scheduled run failed: exits with that step's code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code
