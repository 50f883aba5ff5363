"""Rough edges a new user hit (issue 14), each run through the real CLI: the exit code a
script can act on, and one clear line that names what the user typed (never an internal name).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Qbhub, write_image


@pytest.fixture
def vm_archive(qbhub: Qbhub, tmp_path: Path) -> Path:
    """An archive holding one session of LocalPlatform VM `work`."""
    qbhub.run("local", "vm-create", "work", "--class", "StandaloneVM", "--label", "red",
              "--size", "1M")  # fmt: skip
    archive = tmp_path / "archive"
    qbhub.run("init", "--dest", archive)
    qbhub.run("backup", "work", "--dest", archive)
    return archive


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text and "relay://" not in text
    return lines[0]


def test_restore_of_unknown_vm_or_session_is_not_found(qbhub: Qbhub, vm_archive: Path) -> None:
    vm = qbhub.run("restore", "nosuch", "--dest", vm_archive, check=False)
    assert vm.returncode == 7
    line = one_line(vm.stderr)
    assert "no VM named nosuch in session" in line and "it holds work" in line
    assert "worker" not in line and "QbhubError" not in line
    session = qbhub.run("restore", "work", "--dest", vm_archive, "--session", "20200101T000000Z",
                        "--rename", "work:w2", check=False)  # fmt: skip
    assert session.returncode == 7
    assert "no session 20200101T000000Z" in one_line(session.stderr)
    assert "NotFoundError" not in session.stderr


def test_diff_exit_status_has_its_own_code(qbhub: Qbhub, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "disk.img", blocks=4)
    qbhub.run("init", "--dest", archive)
    qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk")
    same = qbhub.run("diff", "--dest", archive, "disk", image, "--exit-status", check=False)
    assert same.returncode == 0, same.stderr
    write_image(image, blocks=4, seed=99)
    differs = qbhub.run("diff", "--dest", archive, "disk", image, "--exit-status", check=False)
    assert differs.returncode == 9  # not 3: nothing failed to authenticate
    assert "disk differs from" in one_line(differs.stderr)


def test_change_passphrase_names_the_missing_new_passphrase(qbhub: Qbhub, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    qbhub.run("init", "--dest", archive)
    result = qbhub.run("key", "change-passphrase", "--dest", archive, check=False)
    assert result.returncode == 5
    line = one_line(result.stderr)
    assert "no new passphrase" in line
    assert "--new-passphrase-file" in line and "QBHUB_NEW_PASSPHRASE" in line


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["list", "--dest", "{tmp}/missing"], 7),
        (["prune", "--dest", "{tmp}/missing", "--keep-last", "-1"], 2),
        (["volume", "restore", "--dest", "{tmp}/missing", "bad name!", "--to", "{tmp}/x"], 2),
    ],
)
def test_json_errors_are_json(qbhub: Qbhub, tmp_path: Path, args: list[str], code: int) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = qbhub.run(*argv, "--json", check=False)
    assert result.returncode == code
    document = json.loads(result.stdout)
    assert document["code"] == code
    assert document["error"] and "qbhub:" not in document["error"]
    assert document["error"] in one_line(result.stderr)


def test_volume_restore_to_stdout(qbhub: Qbhub, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "disk.img", blocks=12, holes=True)
    qbhub.run("init", "--dest", archive)
    qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk")
    command = [sys.executable, "-m", "qubes_backup_hub", "volume", "restore", "--dest",
               str(archive), "disk", "--to", "-"]  # fmt: skip
    done = subprocess.run(command, env=qbhub.env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == image.read_bytes()
    assert not (tmp_path / "-").exists() and not Path("-").exists()
    assert b"Streamed disk" in done.stderr

    # A reader that stops early: one line, non-zero, no traceback.
    reader = subprocess.Popen(["head", "-c", "10"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL)  # fmt: skip
    cut = subprocess.run(command, env=qbhub.env, stdout=reader.stdin, stderr=subprocess.PIPE,
                         timeout=300)  # fmt: skip
    assert reader.stdin is not None
    reader.stdin.close()
    reader.wait()
    assert cut.returncode == 1
    assert "then failed (its reader stopped)" in one_line(cut.stderr.decode())

    both = qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", "-", "--json",
                     check=False)  # fmt: skip
    assert both.returncode == 2 and "choose one" in both.stderr


def test_missing_paths_are_not_found_and_name_the_users_path(qbhub: Qbhub, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "disk.img", blocks=2)
    qbhub.run("init", "--dest", archive)
    qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk")
    target = tmp_path / "no-such-dir" / "out.img"
    restore = qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", target,
                        check=False)  # fmt: skip
    assert restore.returncode == 7
    line = one_line(restore.stderr)
    assert f"directory {target.parent} does not exist" in line and "partial" not in line
    diff = qbhub.run("diff", "--dest", archive, "disk", tmp_path / "gone.img", check=False)
    assert diff.returncode == 7 and "gone.img does not exist" in one_line(diff.stderr)


def test_vm_lists_read_as_english() -> None:
    from qubes_backup_hub.jobs.restore import vm_list

    assert vm_list(["work"]) == "VM work"
    assert vm_list(["fedora", "work"]) == "VMs fedora and work"
    assert vm_list(["a", "b", "c"]) == "VMs a, b and c"


def test_verbose_and_log_file(qbhub: Qbhub, vm_archive: Path, tmp_path: Path) -> None:
    log = tmp_path / "qbhub.log"
    loud = qbhub.run("-v", "--log-file", log, "backup", "work", "--dest", vm_archive)
    assert "qbhub: backing up 1 VMs" in loud.stderr and "committed" in loud.stderr
    missing = qbhub.run("--log-file", log, "list", "--dest", tmp_path / "gone", check=False)
    assert missing.returncode == 7
    assert "backing up" not in missing.stderr  # without -v, stderr holds only the error line
    text = log.read_text()
    assert "backup work --dest" in text and "session " in text and "exit 0" in text
    assert f"no qbhub archive at {tmp_path / 'gone'}" in text and "(exit 7)" in text
    assert "PASSPHRASE" not in text and "secret" not in text
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    bad = qbhub.run("--log-file", tmp_path / "no" / "dir.log", "engines", check=False)
    assert bad.returncode == 2 and "cannot open log file" in one_line(bad.stderr)


def test_sessions_carry_host_comment_tags_and_list_shows_them(
    qbhub: Qbhub, vm_archive: Path
) -> None:
    qbhub.run("backup", "work", "--dest", vm_archive, "--comment", "before the upgrade",
              "--tag", "weekly", "--tag", "pre-upgrade")  # fmt: skip
    newest = qbhub.json("list", "--dest", vm_archive)["sessions"][-1]
    assert newest["comment"] == "before the upgrade"
    assert newest["tags"] == ["pre-upgrade", "weekly"]
    assert newest["vms"] == ["work"] and newest["engine"] == "native" and newest["host"]
    assert newest["bytes_read"] >= newest["bytes_stored"]
    text = qbhub.run("list", "--dest", vm_archive).stdout
    assert '"before the upgrade"' in text and "[pre-upgrade, weekly]" in text
    assert "VMs: work" in text
    settings = qbhub.run("list", "--dest", vm_archive, "--settings").stdout
    assert "work (StandaloneVM)" in settings and "property label = red" in settings
    as_json = qbhub.json("list", "--dest", vm_archive, "--settings")
    assert as_json["vms"][0]["settings"]["properties"]["label"] == "red"
    for bad, needle in [(["--tag", "no spaces"], "invalid tag"),
                        (["--comment", "two\nlines"], "one line of printable text")]:  # fmt: skip
        refused = qbhub.run("backup", "work", "--dest", vm_archive, *bad, check=False)
        assert refused.returncode == 2 and needle in one_line(refused.stderr)


def test_session_notes_from_the_archive_are_made_printable() -> None:
    from qubes_backup_hub.session_notes import summary

    shown = summary({"host": "evil\x1b[2J", "comment": "x" * 5000, "tags": ["a\nb", 7],
                     "vms": [{"name": "w\x07"}, "junk"]})  # fmt: skip
    assert shown["host"] == "evil\\x1b[2J"
    assert len(shown["comment"]) <= 1003 and shown["comment"].endswith("...")
    assert shown["tags"] == ["a\\x0ab"] and shown["vms"] == ["w\\x07"]
    assert summary(["not", "a", "dict"]) == {}


def test_info_sums_the_archive(qbhub: Qbhub, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "disk.img", blocks=16, zero_fraction=0.0)
    qbhub.run("init", "--dest", archive)
    empty = qbhub.json("info", "--dest", archive)
    assert empty["sessions"] == 0 and empty["original_bytes"] == 0
    for _ in range(3):  # the same data three times: stored once
        qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk")
    info = qbhub.json("info", "--dest", archive)
    size = image.stat().st_size
    assert info["sessions"] == 3 and info["volumes"] == 1
    assert info["original_bytes"] == 3 * size and info["newest_bytes"] == size
    on_disk = sum(p.stat().st_size for p in archive.rglob("*") if p.is_file())
    assert info["archive_bytes"] <= on_disk
    assert info["archive_bytes"] < 1.5 * size  # deduplicated: one copy, not three
    assert info["saving"] > 0.5
    text = qbhub.run("info", "--dest", archive).stdout
    assert "3 sessions" in text and "saved by deduplication and compression" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_full_disk_names_the_target_not_a_temporary_file(qbhub: Qbhub, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(4 << 20))
    qbhub.run("init", "--dest", archive)
    qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        full = qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", small / "x.img",
                         check=False)  # fmt: skip
        assert full.returncode == 6
        line = one_line(full.stderr)
        assert f"cannot write {small / 'x.img'}: No space left on device" in line
        assert "partial" not in line
        assert os.listdir(small) == []  # the temporary file is gone too
    finally:
        subprocess.run(["umount", str(small)], check=False)
