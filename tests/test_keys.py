"""Keys: a random master key, wrapped by scrypt from the passphrase, stored in the archive.

Acceptance: archive + passphrase is all a restore needs, on any machine; a wrong or missing
passphrase is exit 5 and one line; changing the passphrase rewraps the key and re-encrypts
nothing; the KDF and its parameters are recorded in the root; archives never share keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, Qbhub, Result, write_image

VOLUME = "personal-private"
NEW_PASSPHRASE = "a brand new passphrase, longer"
ROOT_MAGIC = b"QBHUB-ROOT\n"


# -- helpers ----------------------------------------------------------------------------------


def make_qbhub(home: Path, passphrase: str = PASSPHRASE) -> Qbhub:
    """A CLI runner like the `qbhub` fixture, for a given home (module fixtures need their own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBHUB_")}
    env.update({"QBHUB_HOME": str(home), "QBHUB_PASSPHRASE": passphrase})
    return Qbhub(home, env)


def root_header(archive: Path) -> dict[str, Any]:
    """The readable JSON header of an archive's root."""
    root = (archive / "root").read_bytes()
    assert root.startswith(ROOT_MAGIC)
    (hlen,) = struct.unpack_from("<I", root, len(ROOT_MAGIC))
    start = len(ROOT_MAGIC) + 4
    header = json.loads(root[start : start + hlen])
    assert isinstance(header, dict)
    return header


def object_snapshot(archive: Path) -> dict[str, tuple[int, int, str]]:
    """name -> (mtime in ns, size, digest) of every stored object."""
    snapshot = {}
    for path in (archive / "objects").glob("*/*"):
        st = path.stat()
        digest = hashlib.blake2b(path.read_bytes()).hexdigest()
        snapshot[path.name] = (st.st_mtime_ns, st.st_size, digest)
    return snapshot


def assert_one_line_error(result: Result, code: int) -> str:
    """The failure contract: exit `code`, one `qbhub: error:` line on stderr, no traceback."""
    context = f"exit {result.returncode}, stderr: {result.stderr!r}"
    assert result.returncode == code, context
    assert "Traceback" not in result.stderr, context
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, context
    assert lines[0].startswith("qbhub: error:"), context
    return lines[0]


# -- the shared archive -----------------------------------------------------------------------


@dataclass
class Keyed:
    """An encrypted archive holding one backed-up volume, and the machine that wrote it."""

    archive: Path
    qbhub: Qbhub
    image: Path
    out: Path  # an empty directory for restore targets

    def restore(self, target: Path, q: Qbhub | None = None, **kwargs: Any) -> Result:
        runner = q or self.qbhub
        return runner.run(
            "volume",
            "restore",
            "--dest",
            self.archive,
            VOLUME,
            "--to",
            target,
            "--json",
            check=False,
            **kwargs,
        )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Keyed:
    top = tmp_path_factory.mktemp("keys")
    image = write_image(top / "volume.img", 32, seed=5, tail=b"a short tail")
    q = make_qbhub(top / "home")
    archive = top / "archive"
    q.run("init", "--dest", archive)
    q.run("volume", "backup", "--dest", archive, f"{image}={VOLUME}")
    return Keyed(archive, q, image, top)


@pytest.fixture
def keyed(base: Keyed, tmp_path: Path) -> Keyed:
    """A private copy of the archive and of the local state of the machine that wrote it."""
    shutil.copytree(base.archive, tmp_path / "archive")
    shutil.copytree(base.qbhub.home, tmp_path / "home")
    (tmp_path / "out").mkdir()
    return Keyed(tmp_path / "archive", make_qbhub(tmp_path / "home"), base.image, tmp_path / "out")


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["env", "file"])
def test_archive_and_passphrase_are_all_a_restore_needs(
    keyed: Keyed, tmp_path: Path, source: str
) -> None:
    """Another machine: the archive copied elsewhere, an empty QBHUB_HOME, only the passphrase."""
    moved = tmp_path / "elsewhere" / "usb-disk" / "archive"
    shutil.copytree(keyed.archive, moved)
    fresh_home = tmp_path / "fresh-machine"
    other = make_qbhub(fresh_home)
    args: list[str | Path] = []
    env = {}
    if source == "file":
        phrase_file = tmp_path / "passphrase.txt"
        phrase_file.write_text(PASSPHRASE + "\n")
        args = ["--passphrase-file", phrase_file]
        env = {"QBHUB_PASSPHRASE": ""}
    target = keyed.out / "restored.img"
    result = other.run(
        "volume",
        "restore",
        "--dest",
        moved,
        VOLUME,
        "--to",
        target,
        "--json",
        *args,
        env=env,
    )
    assert target.read_bytes() == keyed.image.read_bytes()
    assert result.json["first_contact"] is True
    assert list((fresh_home / "archives").glob("*.json")), "the new machine remembers nothing"


@pytest.mark.parametrize("command", ["list", "restore"])
def test_wrong_passphrase_is_exit_5(keyed: Keyed, command: str) -> None:
    env = {"QBHUB_PASSPHRASE": "not the passphrase"}
    target = keyed.out / "restored.img"
    if command == "list":
        result = keyed.qbhub.run("list", "--dest", keyed.archive, check=False, env=env)
    else:
        result = keyed.restore(target, env=env)
    line = assert_one_line_error(result, 5)
    assert "passphrase" in line
    assert not target.exists()


def test_missing_passphrase_is_exit_5(keyed: Keyed) -> None:
    """No file, an empty QBHUB_PASSPHRASE and no terminal: no passphrase to be had."""
    target = keyed.out / "restored.img"
    result = keyed.restore(target, env={"QBHUB_PASSPHRASE": ""})
    line = assert_one_line_error(result, 5)
    assert "passphrase" in line
    assert not target.exists()


def test_change_passphrase_rewraps_and_reencrypts_nothing(keyed: Keyed, tmp_path: Path) -> None:
    before_objects = object_snapshot(keyed.archive)
    before = root_header(keyed.archive)
    keyed.qbhub.run(
        "key",
        "change-passphrase",
        "--dest",
        keyed.archive,
        env={"QBHUB_NEW_PASSPHRASE": NEW_PASSPHRASE},
    )
    assert object_snapshot(keyed.archive) == before_objects, "objects were rewritten"
    after = root_header(keyed.archive)
    assert after["archive_id"] == before["archive_id"]
    assert after["suite"] == before["suite"]
    assert after["wrapped_key"] != before["wrapped_key"]
    assert after["kdf"]["salt"] != before["kdf"]["salt"]

    old = keyed.qbhub.run("list", "--dest", keyed.archive, check=False)
    assert_one_line_error(old, 5)
    # The new passphrase alone restores, bit-exact, even on a machine that never saw the archive.
    newcomer = make_qbhub(tmp_path / "fresh-machine", NEW_PASSPHRASE)
    target = keyed.out / "restored.img"
    result = keyed.restore(target, q=newcomer)
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == keyed.image.read_bytes()


@pytest.mark.parametrize("missing", ["current", "new"])
def test_change_passphrase_needs_both_passphrases(keyed: Keyed, missing: str) -> None:
    """A wrong current passphrase, or no new one: exit 5 and the archive is untouched."""
    env = {"QBHUB_NEW_PASSPHRASE": NEW_PASSPHRASE}
    if missing == "current":
        env["QBHUB_PASSPHRASE"] = "not the passphrase"
    else:
        env["QBHUB_NEW_PASSPHRASE"] = ""
    root = (keyed.archive / "root").read_bytes()
    result = keyed.qbhub.run(
        "key", "change-passphrase", "--dest", keyed.archive, check=False, env=env
    )
    assert_one_line_error(result, 5)
    assert (keyed.archive / "root").read_bytes() == root


def test_archives_never_share_keys(keyed: Keyed, tmp_path: Path) -> None:
    """Same passphrase, two archives: different IDs, salts and wrapped keys, not swappable."""
    other = tmp_path / "other-archive"
    keyed.qbhub.run("init", "--dest", other)
    a, b = root_header(keyed.archive), root_header(other)
    assert a["archive_id"] != b["archive_id"]
    assert a["kdf"]["salt"] != b["kdf"]["salt"]
    assert a["wrapped_key"] != b["wrapped_key"]
    # Transplant B's wrapped key and KDF into A's root: the wrap is bound to B, A can't open.
    root = (keyed.archive / "root").read_bytes()
    (hlen,) = struct.unpack_from("<I", root, len(ROOT_MAGIC))
    body = root[len(ROOT_MAGIC) + 4 + hlen :]
    raw = json.dumps(
        {**a, "kdf": b["kdf"], "wrapped_key": b["wrapped_key"]},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    (keyed.archive / "root").write_bytes(ROOT_MAGIC + struct.pack("<I", len(raw)) + raw + body)
    result = keyed.qbhub.run("list", "--dest", keyed.archive, check=False)
    assert_one_line_error(result, 5)


def test_root_header_records_the_kdf(base: Keyed) -> None:
    """The readable header names scrypt with n, r, p and a 16-byte salt; no key in the clear."""
    header = root_header(base.archive)
    assert header["suite"] == "aes-256-gcm"
    assert "clear_key" not in header
    kdf = header["kdf"]
    assert kdf["name"] == "scrypt"
    n, r, p = kdf["n"], kdf["r"], kdf["p"]
    assert all(isinstance(v, int) for v in (n, r, p))
    assert n >= 1 << 14 and n & (n - 1) == 0, "scrypt N must be a power of two, 2^14 or more"
    assert r >= 8 and p >= 1
    assert len(bytes.fromhex(kdf["salt"])) == 16
    assert len(bytes.fromhex(header["wrapped_key"])) >= 64 + 16  # a 64-byte key, sealed
