"""Format 2: the root body is sealed under a key of its own, which no restore worker holds.

A red-team pass showed that a compromised restore worker could leak the blob key it is granted
through the ranges it reads, and that key also sealed the root (format 1): storage could then
forge roots dom0 accepts. From format 2 the root has its own key, the wrapped master key is bound
to the format (a header cannot claim format 1 and still unwrap), and a worker's pinned root is
sealed again under a key made for its grant alone.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from conftest import PASSPHRASE
from qbhub_native.crypto import Keys, Sealer
from qbhub_native.repository import Repository
from qbhub_native.root import ROOT_AAD_PREFIX, ROOT_MAGIC, encode_root, split_root
from test_downgrade import make_engine, open_store
from test_extract import extract

from qubes_backup_hub.engine import VolumeSource
from qubes_backup_hub.errors import IntegrityError, PassphraseError
from qubes_backup_hub.safety.rollback import LocalState
from qubes_backup_hub.store.local import LocalDirStore


def new_archive(tmp_path: Path, root_format: int = 2) -> tuple[Path, Repository]:
    archive = tmp_path / "archive"
    repo = Repository.create(
        LocalDirStore(archive),
        passphrase=PASSPHRASE.encode(),
        state=LocalState(tmp_path / "writer"),
        root_format=root_format,
    )
    return archive, repo


def forge_with(archive: Path, keys: Keys, generation: int) -> None:
    """Storage's forgery: the stored header, a body of its choosing sealed under `keys`."""
    raw_header = split_root((archive / "root").read_bytes())[0]
    repo_body = {
        "generation": generation,
        "updated": "2030-01-01T00:00:00Z",
        "chunk_size": 65536,
        "fanout": 256,
        "compression_level": 1,
        "sessions": [],
        "indexes": [],
    }
    sealed = Sealer(keys).seal(ROOT_AAD_PREFIX + raw_header, json.dumps(repo_body).encode())
    root = ROOT_MAGIC + struct.pack("<I", len(raw_header)) + raw_header + bytes(sealed)
    (archive / "root").write_bytes(root)


def test_new_archives_are_format_2(tmp_path: Path) -> None:
    archive, _ = new_archive(tmp_path)
    assert split_root((archive / "root").read_bytes())[1].format == 2


def test_what_a_worker_is_granted_cannot_forge_a_root(tmp_path: Path) -> None:
    archive, _ = new_archive(tmp_path)
    grant = make_engine(tmp_path / "dom0").grant_read(open_store(archive))
    suite = grant.secret["suite"]
    for name in ("encryption_key", "pinned_key"):
        forge_with(archive, Keys.for_reading(suite, bytes.fromhex(grant.secret[name])), 1 << 40)
        with pytest.raises(IntegrityError, match="failed authentication"):
            make_engine(tmp_path / "dom0").grant_read(open_store(archive))
        memory = LocalState(tmp_path / "dom0").recall_all(grant.facts.archive_id)
        assert [m.generation for m in memory.values()] == [grant.facts.generation]


def test_format_1_root_sealed_with_the_blob_key_is_what_format_2_closes(tmp_path: Path) -> None:
    """The control: on a format 1 archive the granted blob key does forge a root (why format 2
    exists); format 1 archives stay readable."""
    archive, _ = new_archive(tmp_path, root_format=1)
    grant = make_engine(tmp_path / "dom0").grant_read(open_store(archive))
    assert "pinned_key" not in grant.secret
    key = bytes.fromhex(grant.secret["encryption_key"])
    forge_with(archive, Keys.for_reading(grant.secret["suite"], key), 7)
    assert make_engine(tmp_path / "dom0").grant_read(open_store(archive)).facts.generation == 7


def test_a_header_cannot_claim_format_1(tmp_path: Path) -> None:
    """Storage rewrites a format 2 header to say format 1 (so that the blob key would seal its
    body): the wrapped key is bound to format 2 and no longer unwraps."""
    archive, repo = new_archive(tmp_path)
    header = split_root((archive / "root").read_bytes())[1]
    header.format = 1
    forged = encode_root(header, repo.body, Sealer(repo.sealer.keys))  # the blob key
    (archive / "root").write_bytes(forged)
    with pytest.raises(PassphraseError):
        make_engine(tmp_path / "dom0").grant_read(open_store(archive))


def test_passphrase_change_upgrades_format_1(tmp_path: Path) -> None:
    archive, _ = new_archive(tmp_path, root_format=1)
    make_engine(tmp_path / "w", new_passphrase="a new passphrase 5d1").change_passphrase(
        open_store(archive)
    )
    assert split_root((archive / "root").read_bytes())[1].format == 2
    grant = make_engine(tmp_path / "r", passphrase="a new passphrase 5d1").grant_read(
        open_store(archive)
    )
    assert "pinned_key" in grant.secret


@pytest.mark.parametrize("root_format", [1, 2])
def test_both_formats_back_up_restore_and_extract(tmp_path: Path, root_format: int) -> None:
    """Archives made before format 2 keep working, in qbhub and in the standalone extractor."""
    archive, _ = new_archive(tmp_path, root_format=root_format)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(5 * 65536 + 123))
    engine = make_engine(tmp_path / "user")
    engine.backup(open_store(archive), [VolumeSource("disk", str(image))])
    assert split_root((archive / "root").read_bytes())[1].format == root_format
    out = tmp_path / "out.img"
    proc = extract(archive, "disk", out)
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.read_bytes() == image.read_bytes()
