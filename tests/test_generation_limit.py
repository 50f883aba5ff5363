"""A root at the generation limit is never written past (the limit is what a root may claim)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PASSPHRASE
from qbhub_native.repository import Repository
from qbhub_native.root import MAX_GENERATION

from qubes_backup_hub.errors import IntegrityError
from qubes_backup_hub.safety.rollback import LocalState
from qubes_backup_hub.store.local import LocalDirStore


def test_commit_at_the_limit_writes_nothing(tmp_path: Path) -> None:
    """A root forged at the limit (say with a key a compromised worker leaked) made the next
    backup write generation 2^53 + 1, which no reader accepts: refuse before writing."""
    archive = tmp_path / "archive"
    repo = Repository.create(
        LocalDirStore(archive), passphrase=PASSPHRASE.encode(), state=LocalState(tmp_path / "s")
    )
    repo.body.generation = MAX_GENERATION - 1
    repo.commit()  # the limit itself is a valid generation
    before = (archive / "root").read_bytes()
    with pytest.raises(IntegrityError, match="refusing to write"):
        repo.commit()
    assert (archive / "root").read_bytes() == before
    memory = LocalState(tmp_path / "s").recall(repo.header.archive_id, repo.fingerprint)
    assert memory is not None and memory.generation == MAX_GENERATION
