"""`qbhub key export` / `key import`: a copy of the wrapped key kept apart repairs a root whose
key part storage damaged (which no passphrase opens otherwise), and nothing else."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import Qbhub, write_image

from qubes_backup_hub.cli import keyfile
from qubes_backup_hub.errors import UsageError


def damage_wrapped_key(archive: Path) -> None:
    """Flip one hex digit of the wrapped key in the stored root's header."""
    root = archive / "root"
    data = bytearray(root.read_bytes())
    (length,) = struct.unpack_from("<I", data, 11)
    header = json.loads(data[15 : 15 + length])
    at = data.index(header["wrapped_key"].encode(), 15) + 10
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    root.write_bytes(bytes(data))


def test_export_repairs_a_damaged_key_and_nothing_else(qbhub: Qbhub, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "disk.img", blocks=8)
    qbhub.run("init", "--dest", archive)
    qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk")
    export = tmp_path / "key.txt"
    qbhub.run("key", "export", "--dest", archive, export)
    text = export.read_text()
    assert text.startswith("qbhub key export 1\narchive ")
    assert oct(export.stat().st_mode & 0o777) == "0o600"
    assert qbhub.run("key", "export", "--dest", archive, "-").stdout == text
    again = qbhub.run("key", "export", "--dest", archive, export, check=False)
    assert again.returncode == 2 and "exists" in again.stderr

    intact = qbhub.run("key", "import", "--dest", archive, export, check=False)
    assert intact.returncode == 2 and "nothing to import" in intact.stderr

    damage_wrapped_key(archive)
    broken = qbhub.run("list", "--dest", archive, check=False)
    assert broken.returncode in (3, 5)  # no passphrase opens it now

    before = (archive / "root").read_bytes()
    wrong = qbhub.run("key", "import", "--dest", archive, export, check=False,
                      env={"QBHUB_PASSPHRASE": "not it"})  # fmt: skip
    assert wrong.returncode == 3 and "does not open" in wrong.stderr
    assert (archive / "root").read_bytes() == before  # a failed import writes nothing

    repaired = qbhub.json("key", "import", "--dest", archive, export)
    assert repaired["repaired"] is True
    out = tmp_path / "out.img"
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", out)
    assert out.read_bytes() == image.read_bytes()
    assert qbhub.json("verify", "--dest", archive)["sessions"] == 1


def test_another_archives_export_is_refused(qbhub: Qbhub, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    qbhub.run("init", "--dest", one)
    qbhub.run("init", "--dest", two)
    export = tmp_path / "key.txt"
    qbhub.run("key", "export", "--dest", one, export)
    damage_wrapped_key(two)
    refused = qbhub.run("key", "import", "--dest", two, export, check=False)
    assert refused.returncode == 2 and "this export is of archive" in refused.stderr


def test_printed_export_finds_typos_by_line() -> None:
    text = keyfile.encode("ab" * 16, b'{"format":2,"wrapped_key":"' + b"7" * 184 + b'"}')
    archive_id, header = keyfile.decode("# typed back from paper\n" + text)
    assert archive_id == "ab" * 16 and header.startswith(b'{"format":2')
    lines = text.splitlines()
    typo = lines[3][:5] + ("A" if lines[3][5] != "A" else "B") + lines[3][6:]
    with pytest.raises(UsageError, match="line 02 has a typo"):
        keyfile.decode("\n".join([*lines[:3], typo, *lines[4:]]))
    with pytest.raises(UsageError, match="line 02 is malformed"):
        keyfile.decode("\n".join([*lines[:3], *lines[4:]]))
    with pytest.raises(UsageError, match="not a qbhub key export"):
        keyfile.decode("hello\n")
