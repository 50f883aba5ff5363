"""Profiles (`--profile`, config.toml, QBHUB_* variables), `--passphrase-command`, and
`qbhub schedule`: the generated systemd units are checked by `systemd-analyze verify`, and the
service's own command line is executed (no systemd runs here: the timer itself is systemd's job).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import PASSPHRASE, Qbhub

ANALYZE = shutil.which("systemd-analyze")


def write_config(tmp_path: Path, text: str) -> dict[str, str]:
    config = tmp_path / "config.toml"
    config.write_text(text)
    return {"QBHUB_CONFIG": str(config)}


def phrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "phrase"
    path.write_text(PASSPHRASE + "\n")
    return path


@pytest.fixture
def platform(qbhub: Qbhub) -> Qbhub:
    """Two LocalPlatform VMs with small volumes."""
    for name in ("work", "mail"):
        qbhub.run("local", "vm-create", name, "--class", "StandaloneVM", "--label", "red",
                  "--size", "1M")  # fmt: skip
    return qbhub


def test_profile_supplies_defaults_and_flags_win(platform: Qbhub, tmp_path: Path) -> None:
    archive, other = tmp_path / "archive", tmp_path / "other"
    env = write_config(tmp_path, f"""
[profiles.nightly]
dest = "{archive}"
passphrase-command = "cat {phrase_file(tmp_path)}"
vms = ["work"]
keep-last = 1
""")  # fmt: skip
    env["QBHUB_PASSPHRASE"] = "not the passphrase"  # the profile's command comes first
    platform.run("init", "--profile", "nightly", env=env)
    first = platform.json("backup", "--profile", "nightly", env=env)
    assert first["vms"] == ["work"]
    # A VM named on the command line wins over the profile's list.
    second = platform.json("backup", "--profile", "nightly", "mail", env=env)
    assert second["vms"] == ["mail"]
    listed = platform.json("list", "--profile", "nightly", env=env)["sessions"]
    assert [s["session"] for s in listed] == [first["session"], second["session"]]
    # --dest given wins: the other (missing) archive is what the command looks at.
    missing = platform.run("list", "--profile", "nightly", "--dest", other, check=False, env=env)
    assert missing.returncode == 7 and str(other) in missing.stderr
    # keep-last from the profile reaches prune.
    plan = platform.json("prune", "--profile", "nightly", "--dry-run", env=env)
    assert plan["drop"] == [first["session"]]
    # QBHUB_PROFILE selects the profile; QBHUB_DEST alone works without one.
    via_env = platform.json("list", env={**env, "QBHUB_PROFILE": "nightly"})
    assert len(via_env["sessions"]) == 2
    plain = platform.json("list", env={"QBHUB_DEST": str(archive)})
    assert len(plain["sessions"]) == 2


def test_backup_keys_never_reach_restore(platform: Qbhub, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    env = write_config(tmp_path, f'[profiles.p]\ndest = "{archive}"\nall = true\n')
    platform.run("init", "--profile", "p", env=env)
    platform.run("backup", "--profile", "p", env=env)
    result = platform.run("restore", "--profile", "p", check=False, env=env)
    assert result.returncode == 2  # no VMs named: `all` is a backup key, not a restore one
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[profiles.p]\ndest = "x"\nkeep-daly = 7\n', "unknown key 'keep-daly'"),
        ('[profiles.p]\nkeep-daily = "7"\n', "keep-daily must be a count"),
        ("[profiles.p]\nkeep-daily = -1\n", "keep-daily must be a count"),
        ('[profiles.p]\nvms = "work"\n', "vms must be a list of VM names"),
        ("[profiles.p\n", "config.toml"),
        ("[other]\nx = 1\n", "unknown top-level key 'other'"),
        ('[profiles."bad name"]\n', "invalid profile name"),
        ("[profiles.q]\n", "no profile 'p'"),
    ],
)
def test_bad_config_is_one_line_usage_error(
    qbhub: Qbhub, tmp_path: Path, text: str, needle: str
) -> None:
    env = write_config(tmp_path, text)
    result = qbhub.run("list", "--profile", "p", "--dest", tmp_path, check=False, env=env)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_passphrase_command(qbhub: Qbhub, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    env = {"QBHUB_PASSPHRASE": ""}
    good = f"cat {phrase_file(tmp_path)}"
    qbhub.run("init", "--dest", archive, "--passphrase-command", good, env=env)
    assert qbhub.json("list", "--dest", archive, "--passphrase-command", good, env=env)
    for command, needle in [
        ("false", "passphrase command false failed (exit 1)"),
        ("/nonexistent/pass", "passphrase command not found"),
        ("echo wrong", "passphrase"),
        ("'unbalanced", "cannot parse --passphrase-command"),
    ]:
        result = qbhub.run("list", "--dest", archive, "--passphrase-command", command,
                           check=False, env=env)  # fmt: skip
        assert result.returncode == 5, (command, result.stderr)
        assert needle in result.stderr and result.stderr.count("\n") == 1


def unit_command(service: Path) -> tuple[list[str], dict[str, str]]:
    """ExecStart= and Environment= of a generated service, as argv and variables."""
    argv: list[str] = []
    env: dict[str, str] = {}
    for line in service.read_text().splitlines():
        if line.startswith("ExecStart="):
            argv = shlex.split(line.removeprefix("ExecStart=").replace("%%", "%"))
        elif line.startswith("Environment="):
            key, _, value = shlex.split(line.removeprefix("Environment="))[0].partition("=")
            env[key] = value.replace("%%", "%")
    return argv, env


def test_schedule_units_verify_and_their_command_runs(platform: Qbhub, tmp_path: Path) -> None:
    archive, units = tmp_path / "archive", tmp_path / "units"
    env = write_config(tmp_path, f"""
[profiles.nightly]
dest = "{archive}"
passphrase-file = "{phrase_file(tmp_path)}"
all = true
keep-last = 2
schedule = "*-*-* 03:15"
""")  # fmt: skip
    platform.run("init", "--profile", "nightly", env=env)
    installed = platform.run("schedule", "install", "nightly", "--unit-dir", units, env=env)
    assert "*-*-* 03:15" in installed.stdout
    service, timer = units / "qbhub-nightly.service", units / "qbhub-nightly.timer"
    assert "OnCalendar=*-*-* 03:15" in timer.read_text()
    if ANALYZE is None:
        pytest.skip("systemd-analyze is not installed: the units cannot be verified here")
    check = subprocess.run([ANALYZE, "verify", str(service), str(timer)],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert "nightly" in platform.run("schedule", "list", "--unit-dir", units, env=env).stdout

    argv, unit_env = unit_command(service)
    run_env = {**platform.env, **unit_env, "QBHUB_PASSPHRASE": ""}
    for _ in range(3):
        done = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert "backup, prune, verify --quick done" in done.stdout  # the full verify ran once
    sessions = platform.json("list", "--profile", "nightly", env=env)["sessions"]
    assert len(sessions) == 2  # three nightly runs, keep-last 2
    volumes = " ".join(v["name"] for v in sessions[-1]["volumes"])
    assert "work" in volumes and "mail" in volumes  # `all = true` reached the backup

    # A failing step: exit code of that step, one line naming it, nothing after it runs.
    shutil.rmtree(archive)
    failed = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 7
    assert "`qbhub backup` failed (exit 7)" in failed.stderr

    # Paths a unit file can't carry as they are (a newline would add a line of its own).
    evil_home = str(tmp_path / "h\nExecStartPre=/usr/bin/touch /tmp/pwned\n#")
    refused = platform.run("schedule", "install", "nightly", "--unit-dir", units, check=False,
                           env={**env, "QBHUB_HOME": evil_home})  # fmt: skip
    assert refused.returncode == 2 and "can't carry safely" in refused.stderr
    assert "ExecStartPre" not in service.read_text()
    writable = tmp_path / "loose.toml"
    writable.write_text(Path(env["QBHUB_CONFIG"]).read_text())
    writable.chmod(0o666)
    loose = platform.run("schedule", "install", "nightly", "--unit-dir", units, "--system",
                         check=False, env={**env, "QBHUB_CONFIG": str(writable)})  # fmt: skip
    assert loose.returncode == 2 and "owned by root and writable by nobody else" in loose.stderr

    bad = platform.run("schedule", "install", "nightly", "--unit-dir", units,
                       "--on-calendar", "bogus", check=False, env=env)  # fmt: skip
    assert bad.returncode == 2 and "does not accept the calendar" in bad.stderr
    platform.run("schedule", "remove", "nightly", "--unit-dir", units, env=env)
    assert not service.exists() and not timer.exists()
