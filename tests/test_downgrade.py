"""Archive substitution and encryption downgrade: a hostile archive gets nothing.

Storage can delete the user's archive and put one of its own making in its place: unencrypted
(`init --encryption off`, which needs no passphrase), or encrypted under a passphrase it chose.
Acceptance: the engine trusts an archive only if its root authenticates under the user's
passphrase; an unencrypted archive is refused for every operation (exit 3, one line naming
`--allow-unencrypted`) unless the user opted in; a backup never writes to an archive that is not
authenticated under the user's key; `init --encryption off` stays allowed. First contact with an
archive is announced with the facts of its authenticated root, once.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, Qbhub, Result, write_image
from qbhub_native.engine import NativeEngine
from test_hostile_storage import archive_state, assert_one_line_error, make_qbhub

from qubes_backup_hub.engine import EngineContext, VolumeSource
from qubes_backup_hub.errors import PassphraseError, UnencryptedArchiveError
from qubes_backup_hub.passphrase import PassphraseSource
from qubes_backup_hub.progress import Progress
from qubes_backup_hub.registry import load_registry
from qubes_backup_hub.safety.rollback import ArchiveFacts
from qubes_backup_hub.store.base import Store

VOLUME = "work-private"
EVIL = b"ATTACKER-CONTROLLED-CONTENT"


def make_engine(
    state_dir: Path,
    *,
    passphrase: str = PASSPHRASE,
    allow_unencrypted: bool = False,
    announce: Callable[[ArchiveFacts], None] | None = None,
    read_grant: dict[str, str] | None = None,
    new_passphrase: str | None = None,
) -> NativeEngine:
    """A NativeEngine in this process with its own local state, wired as the CLI wires it."""
    registry = load_registry()
    context = EngineContext(
        hook=registry.pm.hook,
        passphrase=PassphraseSource(value=passphrase.encode(), env_var=None),
        state_dir=state_dir,
        progress=Progress(enabled=False),
        new_passphrase=PassphraseSource(value=new_passphrase.encode(), env_var=None)
        if new_passphrase
        else None,
        allow_unencrypted=allow_unencrypted,
        announce=announce,
        read_grant=read_grant,
    )
    return NativeEngine(context)


def open_store(archive: Path) -> Store:
    return load_registry().open_store(str(archive))


@pytest.fixture
def victim(tmp_path: Path) -> tuple[Qbhub, Path, Path]:
    """The user's machine, their encrypted archive with one backup, and the volume's image."""
    q = make_qbhub(tmp_path / "victim-home")
    image = write_image(tmp_path / "victim.img", 16, seed=3)
    archive = tmp_path / "archive"
    q.run("init", "--dest", archive)
    q.run("volume", "backup", "--dest", archive, f"{image}={VOLUME}")
    return q, archive, image


def substitute(archive: Path, tmp_path: Path, *, encryption: str) -> Path:
    """Storage replaces the archive by one it made itself (new archive ID), holding its own
    data under the victim's volume name; return the attacker's image."""
    shutil.rmtree(archive)
    attacker = make_qbhub(tmp_path / "attacker-home", passphrase="the attacker's passphrase")
    evil = write_image(tmp_path / "evil.img", 4, seed=66, tail=EVIL)
    attacker.run("init", "--encryption", encryption, "--dest", archive)
    attacker.run("volume", "backup", "--allow-unencrypted", "--dest", archive, f"{evil}={VOLUME}")
    return evil


def victim_commands(q: Qbhub, archive: Path, image: Path, out: Path) -> dict[str, Result]:
    """Every archive command the user might run next, each on the substituted archive."""
    run: Callable[..., Result] = lambda *args: q.run(*args, check=False)  # noqa: E731
    return {
        "restore": run("volume", "restore", "--dest", archive, VOLUME, "--to", out / "r.img"),
        "backup": run("volume", "backup", "--dest", archive, f"{image}={VOLUME}"),
        "list": run("list", "--dest", archive),
        "verify": run("verify", "--dest", archive),
        "prune": run("prune", "--dest", archive, "--keep-last", "0"),
        "diff": run("diff", "--dest", archive, VOLUME, image),
        "change-passphrase": q.run(
            "key", "change-passphrase", "--dest", archive, check=False,
            env={"QBHUB_NEW_PASSPHRASE": "new"},
        ),
    }  # fmt: skip


def test_unencrypted_substitute_gets_nothing(
    tmp_path: Path, victim: tuple[Qbhub, Path, Path]
) -> None:
    """Before: restore returned the attacker's data (exit 0), backup wrote the user's data to it
    in plaintext. Now every command refuses it, names the opt-in, and changes nothing."""
    q, archive, image = victim
    substitute(archive, tmp_path, encryption="off")
    before = archive_state(archive)
    out = tmp_path / "out"
    out.mkdir()
    for command, result in victim_commands(q, archive, image, out).items():
        line = assert_one_line_error(result, 3)
        assert "unencrypted" in line and "--allow-unencrypted" in line, (command, line)
    assert archive_state(archive) == before, "a refused command changed the archive"
    assert list(out.iterdir()) == []


def test_encrypted_substitute_gets_nothing(
    tmp_path: Path, victim: tuple[Qbhub, Path, Path]
) -> None:
    """An archive encrypted under the attacker's passphrase does not authenticate under ours."""
    q, archive, image = victim
    substitute(archive, tmp_path, encryption="on")
    before = archive_state(archive)
    out = tmp_path / "out"
    out.mkdir()
    for command, result in victim_commands(q, archive, image, out).items():
        assert "passphrase" in assert_one_line_error(result, 5), command
    assert archive_state(archive) == before
    assert list(out.iterdir()) == []


def test_unencrypted_archives_need_the_opt_in(tmp_path: Path, qbhub: Qbhub) -> None:
    """`init --encryption off` is explicit and allowed; using the archive needs the opt-in."""
    archive = tmp_path / "plain"
    qbhub.run("init", "--encryption", "off", "--dest", archive)
    image = write_image(tmp_path / "disk.img", 8, seed=4)
    refused = qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk", check=False)
    assert_one_line_error(refused, 3)
    qbhub.run("volume", "backup", "--allow-unencrypted", "--dest", archive, f"{image}=disk")
    out = tmp_path / "out.img"
    qbhub.run("volume", "restore", "--allow-unencrypted", "--dest", archive, "disk", "--to", out)
    assert out.read_bytes() == image.read_bytes()


ENGINE_OPERATIONS: dict[str, Callable[[NativeEngine, Store, Path, Path], Any]] = {
    "prepare": lambda e, s, image, out: e.prepare(s),
    "backup": lambda e, s, image, out: e.backup(s, [VolumeSource("disk", str(image))]),
    "restore_volume": lambda e, s, image, out: e.restore_volume(
        s, "disk", out / "r.img", session=None, overwrite=False
    ),
    "list_sessions": lambda e, s, image, out: e.list_sessions(s, session=None),
    "verify": lambda e, s, image, out: e.verify(s, quick=False),
    "prune": lambda e, s, image, out: e.prune(s, sessions=[], keep_last=0),
    "compare_volume": lambda e, s, image, out: e.compare_volume(s, "disk", image, session=None),
    "describe_session": lambda e, s, image, out: e.describe_session(s, None),
    "stream_volume": lambda e, s, image, out: e.stream_volume(
        s, e.describe_session(s, None)["session"], "disk", lambda b: None
    ),
    "grant_read": lambda e, s, image, out: e.grant_read(s),
}


@pytest.fixture
def plain_archive(tmp_path: Path) -> tuple[Path, Path]:
    """An unencrypted archive with one session of volume `disk` (made with the opt-in)."""
    archive, image = tmp_path / "plain", write_image(tmp_path / "disk.img", 8, seed=5)
    maker = make_engine(tmp_path / "maker", allow_unencrypted=True)
    maker.init_archive(open_store(archive), encryption=False)
    maker.backup(open_store(archive), [VolumeSource("disk", str(image))])
    return archive, image


@pytest.mark.parametrize("operation", sorted(ENGINE_OPERATIONS))
def test_every_engine_operation_refuses_unencrypted(
    tmp_path: Path, plain_archive: tuple[Path, Path], operation: str
) -> None:
    archive, image = plain_archive
    out = tmp_path / "out"
    out.mkdir()
    before = archive_state(archive)
    engine = make_engine(tmp_path / "state")
    with pytest.raises(UnencryptedArchiveError, match="--allow-unencrypted"):
        ENGINE_OPERATIONS[operation](engine, open_store(archive), image, out)
    assert archive_state(archive) == before
    assert list(out.iterdir()) == []
    assert not (tmp_path / "state").exists(), "a refused archive was remembered"
    allowed = make_engine(tmp_path / "state", allow_unencrypted=True)
    ENGINE_OPERATIONS[operation](allowed, open_store(archive), image, out)


def test_change_passphrase_refuses_unencrypted(
    tmp_path: Path, plain_archive: tuple[Path, Path]
) -> None:
    archive, _ = plain_archive
    engine = make_engine(tmp_path / "state", new_passphrase="new")
    with pytest.raises(UnencryptedArchiveError):
        engine.change_passphrase(open_store(archive))


def test_first_contact_is_announced_once_with_the_roots_facts(
    tmp_path: Path, victim: tuple[Qbhub, Path, Path]
) -> None:
    q, archive, _ = victim
    listing = q.json("list", "--dest", archive)
    heard: list[ArchiveFacts] = []
    engine = make_engine(tmp_path / "fresh", announce=heard.append)
    engine.list_sessions(open_store(archive), session=None)
    assert len(heard) == 1
    facts = heard[0]
    assert facts.archive_id == listing["archive_id"]
    assert facts.fingerprint == listing["fingerprint"] and len(facts.fingerprint) == 32
    assert facts.generation == listing["generation"] and facts.encrypted
    assert facts.sessions == tuple(s["session"] for s in listing["sessions"])
    assert facts.newest_session_time == listing["sessions"][-1]["finished"]
    memory = tmp_path / "fresh" / "archives" / f"{facts.archive_id}-{facts.fingerprint}.json"
    assert memory.is_file()
    make_engine(tmp_path / "fresh", announce=heard.append).list_sessions(
        open_store(archive), session=None
    )
    assert len(heard) == 1, "a known archive was announced again"


def test_wrong_passphrase_remembers_and_announces_nothing(
    tmp_path: Path, victim: tuple[Qbhub, Path, Path]
) -> None:
    _, archive, _ = victim
    heard: list[ArchiveFacts] = []
    engine = make_engine(tmp_path / "fresh", passphrase="wrong", announce=heard.append)
    with pytest.raises(PassphraseError):
        engine.list_sessions(open_store(archive), session=None)
    assert heard == [] and not (tmp_path / "fresh").exists()
