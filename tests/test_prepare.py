"""Engine.prepare: start-up work done early is reused only while the archive is unchanged.

`qbhub volume backup` and `qbhub backup` let the engine unlock the key and load the index on a
thread while snapshots are taken. The backup re-reads the root under the lock: a root written in
between (another machine's prune or passphrase change) must not be acted on with stale state.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import qbhub_native.repository as repository_module
from conftest import PASSPHRASE, Qbhub
from qbhub_native.engine import NativeEngine
from test_incremental_metadata import engine_for, only_volume, open_store, random_volume

from qubes_backup_hub.engine import EngineContext, VolumeSource
from qubes_backup_hub.errors import PassphraseError
from qubes_backup_hub.passphrase import PassphraseSource

CHUNKS = 40


def engine_in(directory: Path) -> NativeEngine:
    """An engine with its own local state, as on another machine (see engine_for)."""
    directory.mkdir(parents=True, exist_ok=True)
    return engine_for(directory)


@pytest.fixture
def kdf_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the scrypt unwraps the repository performs."""
    runs: list[int] = []
    real = repository_module.unwrap_key

    def counting(*args: object, **kwargs: object) -> bytes:
        runs.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(repository_module, "unwrap_key", counting)
    return runs


def test_unchanged_archive_reuses_key_and_index(
    tmp_path: Path, qbhub: Qbhub, archive: Path, kdf_runs: list[int]
) -> None:
    image = random_volume(tmp_path / "disk.img", CHUNKS, seed=1)
    engine, store = engine_for(tmp_path), open_store(archive)
    engine.prepare(store)
    first = engine.backup(store, [VolumeSource("disk", str(image))])
    assert only_volume(first)["chunks_new"] == CHUNKS
    assert len(kdf_runs) == 1, "backup unwrapped the key again although the header was the same"
    engine.prepare(store)
    second = engine.backup(store, [VolumeSource("disk", str(image))])
    assert only_volume(second)["chunks_new"] == 0, "the index after our own commit is current"
    assert len(kdf_runs) == 1


def test_prune_in_between_is_seen(tmp_path: Path, qbhub: Qbhub, archive: Path) -> None:
    """A stale index would dedup against pruned blobs and leave a session that cannot restore."""
    image = random_volume(tmp_path / "disk.img", CHUNKS, seed=2)
    ours, theirs = engine_in(tmp_path / "a"), engine_in(tmp_path / "b")
    theirs.backup(open_store(archive), [VolumeSource("disk", str(image))])
    store = open_store(archive)
    ours.prepare(store)  # the index now lists every chunk of `image`
    theirs.prune(open_store(archive), sessions=[], keep_last=0)  # ...which is then deleted
    result = ours.backup(store, [VolumeSource("disk", str(image))])
    assert only_volume(result)["chunks_new"] == CHUNKS
    assert qbhub.json("verify", "--dest", archive)["mode"] == "full"
    out = tmp_path / "restored.img"
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", out)
    assert out.read_bytes() == image.read_bytes()


def test_passphrase_change_in_between_is_seen(
    tmp_path: Path, qbhub: Qbhub, archive: Path, kdf_runs: list[int]
) -> None:
    image = random_volume(tmp_path / "disk.img", CHUNKS, seed=3)
    ours = engine_in(tmp_path / "a")
    store = open_store(archive)
    ours.prepare(store)
    theirs = engine_in(tmp_path / "b")
    rekey = EngineContext(
        hook=theirs.context.hook,
        passphrase=theirs.context.passphrase,
        state_dir=theirs.context.state_dir,
        progress=theirs.context.progress,
        new_passphrase=PassphraseSource(value=b"a new passphrase", env_var=None),
    )
    type(theirs)(rekey).change_passphrase(open_store(archive))
    with pytest.raises(PassphraseError):
        ours.backup(store, [VolumeSource("disk", str(image))])
    assert len(kdf_runs) == 3  # ours, theirs (one open, the rewrap is no unwrap), ours again


def test_wrong_passphrase_backup_is_one_line_and_stores_nothing(
    tmp_path: Path, qbhub: Qbhub, archive: Path
) -> None:
    image = random_volume(tmp_path / "disk.img", CHUNKS, seed=4)
    objects = sorted(p.name for p in archive.rglob("*"))
    result = qbhub.run(
        "volume", "backup", "--dest", archive, f"{image}=disk",
        check=False, env={"QBHUB_PASSPHRASE": "not " + PASSPHRASE},
    )  # fmt: skip
    assert result.returncode == 5, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "passphrase" in lines[0] and "Traceback" not in result.stderr
    assert sorted(p.name for p in archive.rglob("*")) == objects
