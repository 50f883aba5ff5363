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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import PASSPHRASE, Qbhub, Result, write_image
from qbhub_native.engine import NativeEngine
from qbhub_native.root import split_root
from test_downgrade import make_engine, open_store

from qubes_backup_hub.engine import ReadGrant, VolumeSource
from qubes_backup_hub.errors import IntegrityError, RollbackError, UsageError
from qubes_backup_hub.passphrase import PassphraseSource
from qubes_backup_hub.store.base import Store

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


# -- read grants: what a restore worker gets instead of the passphrase -------------------------


class NoPassphrase(PassphraseSource):
    """A passphrase source that must never be asked (a restore worker has none)."""

    def get(self, *, confirm: bool = False) -> bytes:
        raise AssertionError("the passphrase was asked for")


class RelayedStore:
    """The archive as a restore worker sees it through dom0's relay: every read passes, and the
    root served is the one dom0 pinned for the grant (sealed again under the grant's key)."""

    def __init__(self, store: Store, pinned_root: bytes) -> None:
        self.store, self.pinned_root = store, pinned_root

    def get_root(self, max_size: int) -> bytes:
        return self.pinned_root

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def worker_view(archive: Path, grant: ReadGrant) -> Store:
    return cast(Store, RelayedStore(open_store(archive), grant.pinned_root))


def granted_engine(state_dir: Path, grant: dict[str, str]) -> NativeEngine:
    """An engine as a restore worker builds it: a read grant, no passphrase, throwaway state."""
    engine = make_engine(state_dir, read_grant=grant)
    engine.context.passphrase = NoPassphrase(env_var=None)
    return engine


def test_read_grant_holds_only_the_sealing_key(keyed: Keyed, tmp_path: Path) -> None:
    grant = make_engine(tmp_path / "dom0").grant_read(open_store(keyed.archive))
    stored = (keyed.archive / "root").read_bytes()
    # The same header, the body sealed again under the grant's own key (tests/test_root_key.py).
    assert split_root(grant.pinned_root)[0] == split_root(stored)[0]
    assert grant.pinned_root != stored
    header = root_header(keyed.archive)
    assert set(grant.secret) == {"format", "archive_id", "suite", "encryption_key", "pinned_key"}
    assert grant.secret["archive_id"] == header["archive_id"] == grant.facts.archive_id
    assert len(bytes.fromhex(grant.secret["encryption_key"])) == 32
    flat = json.dumps(grant.secret)
    assert PASSPHRASE not in flat and header["wrapped_key"] not in flat
    assert header["kdf"]["salt"] not in flat
    assert grant.facts.sessions and grant.facts.generation >= 2
    # dom0 authenticated that root itself: it now remembers it (and announced nothing twice).
    assert list((tmp_path / "dom0" / "archives").glob(f"{header['archive_id']}-*.json"))


def test_grant_reads_without_passphrase_or_kdf(
    keyed: Keyed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grant = make_engine(tmp_path / "dom0").grant_read(open_store(keyed.archive))
    kdf_runs: list[int] = []
    real_scrypt = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        kdf_runs.append(1)
        return real_scrypt(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    worker = granted_engine(tmp_path / "worker", grant.secret)
    store = worker_view(keyed.archive, grant)
    info = worker.describe_session(store, None)
    assert [v["name"] for v in info["volumes"]] == [VOLUME]
    pieces: list[bytes] = []
    size = worker.stream_volume(store, info["session"], VOLUME, pieces.append)
    assert b"".join(pieces) == keyed.image.read_bytes() and size == keyed.image.stat().st_size
    assert kdf_runs == []
    assert not (tmp_path / "worker" / "archives").exists(), "a worker touched rollback memory"


def test_grant_never_writes(keyed: Keyed, tmp_path: Path) -> None:
    grant = make_engine(tmp_path / "dom0").grant_read(open_store(keyed.archive))
    worker = granted_engine(tmp_path / "worker", grant.secret)
    store = worker_view(keyed.archive, grant)
    worker.describe_session(store, None)
    before = object_snapshot(keyed.archive), (keyed.archive / "root").read_bytes()
    attempts: list[Callable[[], object]] = [
        lambda: worker.backup(store, [VolumeSource("disk", str(keyed.image))]),
        lambda: worker.prune(store, sessions=[], keep_last=0),
        lambda: worker.change_passphrase(store),
        lambda: worker.init_archive(open_store(tmp_path / "new"), encryption=True),
        lambda: worker.grant_read(store),
        lambda: worker._open(store).commit(),
        lambda: worker._open(store).sealer.blob_id(1, b"x"),
    ]
    for attempt in attempts:
        with pytest.raises(UsageError):
            attempt()
    assert (object_snapshot(keyed.archive), (keyed.archive / "root").read_bytes()) == before
    assert not (tmp_path / "new").exists()


def test_grant_from_another_archive_fails(keyed: Keyed, tmp_path: Path) -> None:
    other = tmp_path / "other-archive"
    keyed.qbhub.run("init", "--dest", other)
    theirs = make_engine(tmp_path / "dom0").grant_read(open_store(other)).secret
    ours = make_engine(tmp_path / "dom0").grant_read(open_store(keyed.archive))
    store = worker_view(keyed.archive, ours)
    with pytest.raises(IntegrityError, match="read grant"):
        granted_engine(tmp_path / "w1", theirs).describe_session(store, None)
    # Their keys under our archive ID: the pinned root does not authenticate.
    forged = {**theirs, "archive_id": root_header(keyed.archive)["archive_id"]}
    with pytest.raises(IntegrityError, match="failed authentication"):
        granted_engine(tmp_path / "w2", forged).describe_session(store, None)


def test_grant_read_checks_rollback(keyed: Keyed, tmp_path: Path) -> None:
    """dom0's side does every check of an opening: an older root than it saw is refused."""
    old_root = (keyed.archive / "root").read_bytes()
    keyed.qbhub.run("volume", "backup", "--dest", keyed.archive, f"{keyed.image}=second")
    dom0 = make_engine(keyed.qbhub.home)
    dom0.grant_read(open_store(keyed.archive))
    (keyed.archive / "root").write_bytes(old_root)
    with pytest.raises(RollbackError):
        make_engine(keyed.qbhub.home).grant_read(open_store(keyed.archive))
