"""Prune through the real CLI: sessions go, their space comes back, the rest stays whole.

DESIGN §3: "Prune removes sessions and reclaims space by repacking"; an interrupted backup leaves
at most unreferenced objects, which prune removes. After a prune the archive verifies, every
remaining session restores bit-exact, and later backups still dedup against surviving chunks.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import CHUNK, Qbhub

from qubes_backup_hub.store.local import TMP_PREFIX

MiB = 1024 * 1024
BLOCKS = 128  # 8 MiB volumes: big enough for several 4 MiB packs per session
REPACK_BELOW = 0.75  # prune repacks a pack when less than this fraction of it is live
OBJECT_NAME = re.compile(r"[pi][0-9a-f]{64}")


# -- helpers ------------------------------------------------------------------------------------


def random_image(path: Path, seed: int, blocks: int = BLOCKS) -> Path:
    """`blocks` chunks of random (incompressible) data."""
    path.write_bytes(random.Random(seed).randbytes(blocks * CHUNK))
    return path


def churn(path: Path, fraction: float, seed: int) -> None:
    """Rewrite a random `fraction` of the image's chunks with fresh random data."""
    rng = random.Random(seed)
    blocks = path.stat().st_size // CHUNK
    with open(path, "r+b") as f:
        for i in rng.sample(range(blocks), int(blocks * fraction)):
            f.seek(i * CHUNK)
            f.write(rng.randbytes(CHUNK))


def backup(qbhub: Qbhub, archive: Path, image: Path, name: str = "disk") -> dict[str, Any]:
    return qbhub.json("volume", "backup", "--dest", archive, f"{image}={name}")


def sessions_with_churn(
    qbhub: Qbhub, archive: Path, image: Path, count: int
) -> list[tuple[str, bytes]]:
    """`count` sessions of `image`, rewriting half its chunks before each but the first."""
    versions = []
    for k in range(count):
        if k:
            churn(image, 0.5, seed=1000 + k)
        versions.append((backup(qbhub, archive, image)["session"], image.read_bytes()))
    return versions


def restored(qbhub: Qbhub, archive: Path, tmp_path: Path, session: str | None = None) -> bytes:
    """The bytes of volume "disk" restored from `session` (default: newest)."""
    target = tmp_path / f"restored-{session or 'newest'}-{time.monotonic_ns()}.img"
    extra = ["--session", session] if session else []
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", target, *extra)
    return target.read_bytes()


def session_ids(qbhub: Qbhub, archive: Path) -> list[str]:
    return [s["session"] for s in qbhub.json("list", "--dest", archive)["sessions"]]


def archive_bytes(archive: Path) -> int:
    """Bytes of every file under the archive directory (what the archive costs on disk)."""
    return sum(p.stat().st_size for p in archive.rglob("*") if p.is_file())


def object_files(archive: Path) -> list[Path]:
    return [p for p in (archive / "objects").glob("*/*") if p.is_file()]


def pack_count(archive: Path) -> int:
    return sum(1 for p in object_files(archive) if p.name.startswith("p"))


def verify_full(qbhub: Qbhub, archive: Path) -> dict[str, Any]:
    result = qbhub.json("verify", "--dest", archive)
    assert result["mode"] == "full"
    return result


def one_line_error(stderr: str) -> None:
    """Assert stderr is exactly one `qbhub: error: ...` line (no traceback)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbhub: error:"), stderr


def plant_object(archive: Path, name: str, data: bytes) -> Path:
    """Put a file where the local store keeps object `name` (DIR/objects/XY/NAME)."""
    path = archive / "objects" / name[-2:] / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


# -- tests --------------------------------------------------------------------------------------


def test_keep_last_reclaims_space_and_the_survivor_restores(
    tmp_path: Path, qbhub: Qbhub, archive: Path
) -> None:
    image = random_image(tmp_path / "disk.img", seed=1)
    versions = sessions_with_churn(qbhub, archive, image, 4)
    before = archive_bytes(archive)

    result = qbhub.json("prune", "--dest", archive, "--keep-last", "1")
    after = archive_bytes(archive)
    assert result["sessions_removed"] == [s for s, _ in versions[:-1]]
    assert session_ids(qbhub, archive) == [versions[-1][0]]
    # Four sessions held ~8 + 3 x 4 MiB; one 8 MiB session survives.
    assert after < 0.55 * before, (before, after)

    # Compare with an archive that only ever held the surviving version: prune must come within
    # the repack threshold of it.
    fresh = tmp_path / "fresh"
    qbhub.run("init", "--dest", fresh)
    backup(qbhub, fresh, image)
    assert after <= archive_bytes(fresh) / REPACK_BELOW + 64 * 1024, (after, archive_bytes(fresh))

    checked = verify_full(qbhub, archive)
    assert checked["sessions"] == 1 and checked["unreferenced_objects"] == 0
    assert restored(qbhub, archive, tmp_path) == versions[-1][1]
    gone = qbhub.run(
        "volume",
        "restore",
        "--dest",
        archive,
        "disk",
        "--to",
        tmp_path / "gone.img",
        "--session",
        versions[0][0],
        check=False,
    )
    assert gone.returncode == 7
    one_line_error(gone.stderr)

    # A new incremental after the prune dedups against the chunks that survived it.
    with open(image, "r+b") as f:
        for i in (3, 90):
            f.seek(i * CHUNK)
            f.write(random.Random(i).randbytes(CHUNK))
    next_session = backup(qbhub, archive, image)
    assert next_session["volumes"][0]["chunks_new"] == 2
    assert next_session["bytes_stored"] < 2 * CHUNK + 32 * 1024
    assert restored(qbhub, archive, tmp_path) == image.read_bytes()
    verify_full(qbhub, archive)


def test_prune_of_a_middle_session_keeps_the_others_whole(
    tmp_path: Path, qbhub: Qbhub, archive: Path
) -> None:
    image = random_image(tmp_path / "disk.img", seed=2)
    versions = sessions_with_churn(qbhub, archive, image, 3)
    (first, v1), (middle, _), (last, v3) = versions
    before = archive_bytes(archive)

    result = qbhub.json("prune", "--dest", archive, "--session", middle)
    assert result["sessions_removed"] == [middle]
    assert session_ids(qbhub, archive) == [first, last]
    # Chunks only the middle session held (written by it, overwritten by the last) are gone.
    assert archive_bytes(archive) < before - MiB
    verify_full(qbhub, archive)
    assert restored(qbhub, archive, tmp_path, first) == v1
    assert restored(qbhub, archive, tmp_path, last) == v3


def test_prune_of_an_unknown_session_fails_with_exit_7(
    qbhub: Qbhub, archive: Path, tmp_path: Path
) -> None:
    image = random_image(tmp_path / "disk.img", seed=3, blocks=8)
    session = backup(qbhub, archive, image)["session"]
    root = (archive / "root").read_bytes()

    result = qbhub.run("prune", "--dest", archive, "--session", "20000101T000000Z", check=False)
    assert result.returncode == 7
    one_line_error(result.stderr)
    assert "20000101T000000Z" in result.stderr
    assert (archive / "root").read_bytes() == root
    assert session_ids(qbhub, archive) == [session]


def test_prune_with_both_session_and_keep_last_is_a_usage_error(
    qbhub: Qbhub, archive: Path, tmp_path: Path
) -> None:
    image = random_image(tmp_path / "disk.img", seed=4, blocks=8)
    session = backup(qbhub, archive, image)["session"]
    result = qbhub.run(
        "prune", "--dest", archive, "--session", session, "--keep-last", "0", check=False
    )
    assert result.returncode == 2
    one_line_error(result.stderr)
    assert session_ids(qbhub, archive) == [session]


def test_prune_that_changes_no_pack_succeeds(tmp_path: Path, qbhub: Qbhub, archive: Path) -> None:
    """Pruning with nothing to repack (or nothing to drop at all) works, and so does a rerun.

    Here the consolidated index holds exactly what an existing index object holds, so it has the
    same content-derived name: prune must not trip over an identical object already stored.
    """
    image = random_image(tmp_path / "disk.img", seed=8, blocks=8)
    first = backup(qbhub, archive, image)["session"]
    random_image(image, seed=9, blocks=8)  # every chunk new: the first session's pack dies whole
    last = backup(qbhub, archive, image)["session"]

    result = qbhub.json("prune", "--dest", archive, "--session", first)
    assert result["sessions_removed"] == [first]
    again = qbhub.json("prune", "--dest", archive, "--keep-last", "1")
    assert again["sessions_removed"] == []
    assert session_ids(qbhub, archive) == [last]
    assert verify_full(qbhub, archive)["unreferenced_objects"] == 0
    assert restored(qbhub, archive, tmp_path) == image.read_bytes()


def two_sessions_with_churn(qbhub: Qbhub, archive: Path, image: Path) -> tuple[str, str]:
    """Two sessions, half the chunks rewritten in between: dropping the first forces a repack."""
    (first, _), (last, _) = sessions_with_churn(qbhub, archive, image, 2)
    return first, last


def test_prune_removes_objects_left_by_an_interrupted_backup(
    tmp_path: Path, qbhub: Qbhub, archive: Path
) -> None:
    image = random_image(tmp_path / "disk.img", seed=5, blocks=16)
    first, last = two_sessions_with_churn(qbhub, archive, image)
    committed = {p.name for p in object_files(archive)}

    # A backup that uploads two 4 MiB packs for its first volume, then dies on the second.
    other = random_image(tmp_path / "other.img", seed=6, blocks=160)
    failed = qbhub.run(
        "volume",
        "backup",
        "--dest",
        archive,
        f"{other}=other",
        f"{tmp_path / 'missing.img'}=missing",
        check=False,
    )
    assert failed.returncode == 7
    orphans = [p for p in object_files(archive) if p.name not in committed]
    assert len(orphans) >= 2, "the failed run left no packs behind"
    # And a stray object that looks like a pack but isn't one of ours.
    orphans.append(plant_object(archive, "p" + os.urandom(32).hex(), os.urandom(8192)))
    assert qbhub.json("verify", "--dest", archive, "--quick")["unreferenced_objects"] >= 3
    before = archive_bytes(archive)

    result = qbhub.json("prune", "--dest", archive, "--session", first)
    assert result["sessions_removed"] == [first]
    assert [p.name for p in orphans if p.exists()] == []
    assert archive_bytes(archive) < before - 8 * MiB
    checked = verify_full(qbhub, archive)
    assert checked["unreferenced_objects"] == 0
    assert checked["packs"] == pack_count(archive)
    assert session_ids(qbhub, archive) == [last]
    assert restored(qbhub, archive, tmp_path) == image.read_bytes()


def test_prune_removes_partial_uploads_of_a_killed_backup(
    tmp_path: Path, qbhub: Qbhub, archive: Path
) -> None:
    """A backup SIGKILLed while writing an object leaves the store's temporary file behind.

    The local store writes DIR/objects/XY/<TMP_PREFIX>NAME.RANDOM and renames it into place; a
    kill between the two leaves the temporary file, often a whole 4 MiB pack. No writer can own
    it any more (prune holds the archive lock, and this one is a day old), so prune must remove
    it with the rest of the garbage, or every crash leaks space for good.
    """
    image = random_image(tmp_path / "disk.img", seed=7, blocks=16)
    first, last = two_sessions_with_churn(qbhub, archive, image)
    name = "p" + os.urandom(32).hex()
    partial = archive / "objects" / name[-2:] / f"{TMP_PREFIX}{name}.{os.urandom(4).hex()}"
    partial.parent.mkdir(exist_ok=True)
    partial.write_bytes(os.urandom(2 * MiB))
    day_ago = time.time() - 86400
    os.utime(partial, (day_ago, day_ago))

    qbhub.json("prune", "--dest", archive, "--session", first)
    leftovers = [p.name for p in object_files(archive) if not OBJECT_NAME.fullmatch(p.name)]
    assert leftovers == [], "prune left partial uploads of a killed backup in the archive"
    assert session_ids(qbhub, archive) == [last]
    assert restored(qbhub, archive, tmp_path) == image.read_bytes()


# -- bounded memory (livesets.py, extsort.py): in-process archives ------------------------------

SMALL_CHUNK = 4096


class ListStream:
    """A VolumeStream over a bytes object (the tests' in-process volumes)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def data_extents(self, start: int = 0, end: int | None = None) -> Any:
        stop = self.size if end is None else min(end, self.size)
        if start < stop:
            yield start, stop - start

    def read_into(self, buf: Any, offset: int) -> int:
        n = min(len(buf), self.size - offset)
        memoryview(buf)[:n] = self.data[offset : offset + n]
        return n

    def close(self) -> None:
        pass

    def __enter__(self) -> ListStream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class InProcess:
    """An unencrypted archive written and read by the native engine in this process."""

    def __init__(self, tmp_path: Path) -> None:
        from types import SimpleNamespace

        from qbhub_native.engine import NativeEngine

        from qubes_backup_hub.engine import EngineContext
        from qubes_backup_hub.passphrase import PassphraseSource
        from qubes_backup_hub.progress import Progress
        from qubes_backup_hub.store.local import LocalDirStore

        self.volumes: dict[str, bytes] = {}
        hook = SimpleNamespace(
            qbhub_open_stream=lambda path: ListStream(self.volumes[path]),
            qbhub_validate_restore=lambda header: None,
        )
        self.home = tmp_path / "home"
        self.context = EngineContext(
            hook=hook,  # type: ignore[arg-type]
            passphrase=PassphraseSource(value=b"unused"),
            state_dir=self.home,
            progress=Progress(enabled=False),
            allow_unencrypted=True,
            options={"chunk_size": SMALL_CHUNK},
        )
        self.engine = NativeEngine(self.context)
        self.store = LocalDirStore(tmp_path / "archive")
        self.engine.init_archive(self.store, encryption=False)

    def fresh_engine(self) -> Any:
        from qbhub_native.engine import NativeEngine

        return NativeEngine(self.context)

    def backup(self, volumes: dict[str, bytes]) -> str:
        from qubes_backup_hub.engine import VolumeSource

        self.volumes.update(volumes)
        sources = [VolumeSource(name=name, path=name) for name in volumes]
        return str(self.engine.backup(self.store, sources)["session"])

    def repo(self) -> Any:
        return self.fresh_engine()._open(self.store)

    def restore(self, tmp_path: Path, name: str, session: str) -> bytes:
        target = tmp_path / f"out-{name}-{session}.img"
        self.fresh_engine().restore_volume(
            self.store, name, target, session=session, overwrite=True
        )
        return target.read_bytes()


def sliding_sessions(arch: InProcess, *, seed: int, count: int) -> list[tuple[str, bytes]]:
    """`count` sessions of a 40-chunk volume "disk", each rewriting 6 chunks one further on
    than the last (so sessions share most packs and prune has packs to repack)."""
    rng = random.Random(seed)
    disk = rng.randbytes(40 * SMALL_CHUNK)
    sessions = []
    for k in range(count):
        at = k * SMALL_CHUNK
        disk = disk[:at] + rng.randbytes(6 * SMALL_CHUNK) + disk[at + 6 * SMALL_CHUNK :]
        sessions.append((arch.backup({"disk": disk}), disk))
    return sessions


def random_volumes(rng: random.Random, pool: list[bytes]) -> dict[str, bytes]:
    """A few volumes: random chunks, zero chunks, chunks reused from `pool`, clones."""
    out: dict[str, bytes] = {}
    for v in range(rng.randint(1, 4)):
        chunks = []
        for _ in range(rng.randint(0, 70)):
            kind = rng.random()
            if kind < 0.15:
                chunks.append(bytes(SMALL_CHUNK))
            elif kind < 0.45 and pool:
                chunks.append(rng.choice(pool))
            else:
                chunk = rng.randbytes(SMALL_CHUNK)
                pool.append(chunk)
                chunks.append(chunk)
        tail = rng.randbytes(rng.randint(0, 100)) if rng.random() < 0.3 else b""
        out[f"vol{v}"] = b"".join(chunks) + tail
    if rng.random() < 0.3:
        out["clone"] = out["vol0"]
    return out


def test_external_live_set_agrees_with_the_in_memory_one(tmp_path: Path) -> None:
    """On random archives (churn, clones, size changes, zero chunks, removed volumes), the
    sorted-run live set equals the in-memory walk, for random subsets of sessions, and the split
    of the index cache into live and dead entries by pack equals the in-memory plan's."""
    from qbhub_native import livesets
    from qbhub_native.extsort import RunSorter
    from qbhub_native.livesets import whole_cache
    from qbhub_native.prune import plan
    from qbhub_native.verify import walk_sessions

    for seed in range(3):
        rng = random.Random(seed)
        arch = InProcess(tmp_path / f"a{seed}")
        pool: list[bytes] = []
        sessions = []
        for _ in range(7):
            volumes = random_volumes(rng, pool)
            if sessions and rng.random() < 0.5:  # an incremental: a few chunks change
                volumes = {k: bytearray(v) for k, v in arch.volumes.items() if k.startswith("vol")}
                for data in volumes.values():
                    for _ in range(rng.randint(0, 3)):
                        if len(data) >= SMALL_CHUNK:
                            at = rng.randrange(len(data) // SMALL_CHUNK) * SMALL_CHUNK
                            data[at : at + SMALL_CHUNK] = rng.randbytes(SMALL_CHUNK)
                volumes = {k: bytes(v) for k, v in volumes.items()}
            sessions.append(arch.backup(volumes))
        repo = arch.repo()
        directory = arch.home / "index-cache"
        for trial in range(4):
            subset = set(rng.sample(sessions, rng.randint(0, len(sessions))))
            if trial == 0:
                subset = set(sessions)
            expected = walk_sessions(repo, subset).all()
            sorter = RunSorter(directory, 32, run_records=rng.choice([1, 7, 1000]))
            livesets.LiveWalker(repo, sorter).walk(subset)
            got = list(sorter.sorted())
            assert got == sorted(expected), (seed, trial)

            disk = whole_cache(repo)  # the cache file, every index object folded in
            assert disk is not None
            try:
                split = livesets.split_packs(disk, iter(got), directory)
                by_pack = {split.names[k]: entries for k, entries in
                           livesets.grouped_entries(split)}  # fmt: skip
            finally:
                disk.close()
            sizes = dict(arch.store.list())
            reference = plan(arch.repo(), expected, sizes, REPACK_BELOW)  # index in memory
            assert by_pack == {**reference.keep, **reference.repack}, (seed, trial)
            assert not split.missing
        assert not list(directory.glob(".tmp-*")), "no temporary file left behind"


@pytest.mark.slow
def test_prune_after_a_thousand_sessions_keeps_the_newest(tmp_path: Path) -> None:
    """1,000 nightly sessions of two small volumes, prune keeping 30: exactly the newest 30
    stay, they restore bit-exact, the dropped ones' chunks are gone, verify finds nothing."""
    arch = InProcess(tmp_path)
    rng = random.Random(5)
    disk = bytearray(rng.randbytes(8 * SMALL_CHUNK))
    home = bytearray(rng.randbytes(3 * SMALL_CHUNK))
    versions: list[tuple[str, bytes, bytes]] = []
    for night in range(1000):
        at = (night % 8) * SMALL_CHUNK
        disk[at : at + 16] = night.to_bytes(16, "little")
        if night % 3 == 0:
            home[:8] = night.to_bytes(8, "little")
        session = arch.backup({"disk": bytes(disk), "home": bytes(home)})
        versions.append((session, bytes(disk), bytes(home)))
    before = archive_bytes(arch.store.path)
    result = arch.fresh_engine().prune(arch.store, sessions=[], keep_last=30)
    assert result["sessions_left"] == 30
    assert result["sessions_removed"] == [s for s, _, _ in versions[:970]]
    repo = arch.repo()
    assert [r.session_id for r in repo.body.sessions] == [s for s, _, _ in versions[970:]]
    assert archive_bytes(arch.store.path) < before / 5
    for session, disk_bytes, home_bytes in versions[970::7] + versions[-1:]:
        assert arch.restore(tmp_path, "disk", session) == disk_bytes
        assert arch.restore(tmp_path, "home", session) == home_bytes
    checked = arch.fresh_engine().verify(arch.store, quick=False)
    assert checked["damaged"] == [] and checked["unreferenced_objects"] == 0
    assert checked["sessions"] == 30
    # Only the chunks of the kept nights remain: 8 + 3 first chunks, then one disk chunk per
    # night (the nightly change) and one home chunk every third night, within the 30 kept.
    assert checked["chunks_referenced"] == len(
        {v[1][k : k + SMALL_CHUNK] for v in versions[970:] for k in range(0, 8 * 4096, 4096)}
        | {v[2][k : k + SMALL_CHUNK] for v in versions[970:] for k in range(0, 3 * 4096, 4096)}
    )


def test_a_crash_between_prune_steps_leaves_a_readable_archive(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Stopped before the new root (1-2), or after it while deleting (3): the archive opens,
    lists the sessions of the root that was written, restores them, verifies clean but for
    unreferenced objects; the next prune removes those."""
    from qbhub_native.repository import Repository

    from qubes_backup_hub.store.local import LocalDirStore

    arch = InProcess(tmp_path)
    sessions = sliding_sessions(arch, seed=9, count=6)

    class Crash(Exception):
        pass

    def crash(*args: object, **kwargs: object) -> None:
        raise Crash

    # Crash before step (2): the old root stands, with every session.
    with monkeypatch.context() as m:
        m.setattr(Repository, "commit", crash)
        with pytest.raises(Crash):
            arch.fresh_engine().prune(arch.store, sessions=[], keep_last=2)
    assert [r.session_id for r in arch.repo().body.sessions] == [s for s, _ in sessions]
    for session, content in sessions:
        assert arch.restore(tmp_path, "disk", session) == content
    checked = arch.fresh_engine().verify(arch.store, quick=False)
    assert checked["damaged"] == [] and checked["unreferenced_objects"] > 0

    # Crash during step (3), after the first deletion: the new root stands.
    calls = []
    real_delete = LocalDirStore.delete

    def delete_once(self: LocalDirStore, name: str) -> None:
        if calls:
            raise Crash
        calls.append(name)
        real_delete(self, name)

    with monkeypatch.context() as m:
        m.setattr(LocalDirStore, "delete", delete_once)
        with pytest.raises(Crash):
            arch.fresh_engine().prune(arch.store, sessions=[], keep_last=2)
    assert [r.session_id for r in arch.repo().body.sessions] == [s for s, _ in sessions[-2:]]
    for session, content in sessions[-2:]:
        assert arch.restore(tmp_path, "disk", session) == content
    checked = arch.fresh_engine().verify(arch.store, quick=False)
    assert checked["damaged"] == [] and checked["unreferenced_objects"] > 0

    # The next prune (dropping nothing more than a session) removes what was left.
    arch.fresh_engine().prune(arch.store, sessions=[], keep_last=1)
    checked = arch.fresh_engine().verify(arch.store, quick=False)
    assert checked["damaged"] == [] and checked["unreferenced_objects"] == 0
    assert arch.restore(tmp_path, "disk", sessions[-1][0]) == sessions[-1][1]


def test_prune_ignores_a_cache_file_another_command_put_in_its_place(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Between prune writing the index cache for its new root and reading which packs that root
    references, another command (a reader of the older root) renames its own file over it. Prune
    must not take the other file's packs for the referenced ones: the packs it just wrote stay,
    the survivors restore bit-exact and verify is clean."""
    import shutil

    from qbhub_native import prune as prune_module
    from qbhub_native.engine import INDEX_CACHE_DIR
    from qbhub_native.index_cache import cache_path

    arch = InProcess(tmp_path)
    sessions = sliding_sessions(arch, seed=11, count=6)
    repo = arch.repo()
    repo.locator  # noqa: B018  (loads the index: the cache file now covers the old root)
    path = cache_path(arch.home / INDEX_CACHE_DIR, repo.header.archive_id)
    old_file = tmp_path / "old-root.idx"
    shutil.copyfile(path, old_file)
    real_build = prune_module.build_cache
    replaced = []

    def build_then_replace(target: Path, *args: Any, **kwargs: Any) -> None:
        real_build(target, *args, **kwargs)
        shutil.copyfile(old_file, target.with_suffix(".other"))
        target.with_suffix(".other").rename(target)  # what the other command's rename does
        replaced.append(target)

    monkeypatch.setattr(prune_module, "build_cache", build_then_replace)
    result = arch.fresh_engine().prune(arch.store, sessions=[], keep_last=2)
    monkeypatch.undo()
    assert replaced and result["packs_repacked"], result
    for session, content in sessions[-2:]:
        assert arch.restore(tmp_path, "disk", session) == content
    checked = arch.fresh_engine().verify(arch.store, quick=False)
    assert checked["damaged"] == [] and checked["unreferenced_objects"] == 0


def test_a_pack_lost_before_its_repack_stops_prune_with_nothing_removed(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A pack that prune must repack (it holds kept data) is gone from storage: prune stops with
    an error naming the pack and pointing at verify, before any new root; every session stays,
    and once the pack is back a prune succeeds."""
    from qbhub_native.limits import MAX_PACK

    from qubes_backup_hub.errors import IntegrityError, NotFoundError
    from qubes_backup_hub.store.local import LocalDirStore

    arch = InProcess(tmp_path)
    sessions = sliding_sessions(arch, seed=12, count=5)
    real_get = LocalDirStore.get
    lost: list[str] = []

    def get_losing_whole_packs(self: LocalDirStore, name: str, max_size: int) -> bytes:
        if max_size == MAX_PACK:  # prune reads a pack whole only to repack it
            lost.append(name)
            raise NotFoundError(f"object {name} not found")
        return real_get(self, name, max_size)

    with monkeypatch.context() as m:
        m.setattr(LocalDirStore, "get", get_losing_whole_packs)
        with pytest.raises(IntegrityError) as caught:
            arch.fresh_engine().prune(arch.store, sessions=[], keep_last=1)
    message = str(caught.value)
    assert lost and f"pack {lost[0]}" in message and "no session was removed" in message
    assert "qbhub verify" in message and "\n" not in message
    assert [r.session_id for r in arch.repo().body.sessions] == [s for s, _ in sessions]
    for session, content in sessions:
        assert arch.restore(tmp_path, "disk", session) == content
    arch.fresh_engine().prune(arch.store, sessions=[], keep_last=1)
    assert arch.restore(tmp_path, "disk", sessions[-1][0]) == sessions[-1][1]
    checked = arch.fresh_engine().verify(arch.store, quick=False)
    assert checked["damaged"] == [] and checked["unreferenced_objects"] == 0
