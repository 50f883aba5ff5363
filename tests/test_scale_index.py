"""The local index cache (index_cache.py): same answers as the in-memory index, rebuilt when stale.

Memory at scale is measured by bench/bench_scale.py; these tests pin what makes the cache safe to
use in its place: the archive's precedence rule (first occurrence in root order wins), updates
by the index objects committed since the file was built, rebuilds when the root's index list no
longer extends the covered one, and recovery from a missing, truncated or damaged file.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import Qbhub, rewrite_blocks, write_image
from qbhub_native import index_cache
from qbhub_native.index import Index, PackTable
from qbhub_native.index_cache import CachedIndex, DiskIndex, build_cache, open_cached
from qbhub_native.pack import ENTRY

from qubes_backup_hub.errors import IntegrityError

ARCHIVE_ID = "ab" * 16


def pack_name(k: int) -> str:
    return "p" + hashlib.sha256(str(k).encode()).hexdigest()


def table(pack: int, ids: list[bytes], type_code: int = 1) -> PackTable:
    records = b"".join(
        ENTRY.pack(type_code, blob_id, 4096 * k, 100 + k, 1000 + k) for k, blob_id in enumerate(ids)
    )
    return PackTable(pack_name(pack), records)


def synthetic(seed: int, objects: int, per_pack: int) -> dict[str, list[PackTable]]:
    """Index objects of random IDs, one pack each, with some IDs repeated across objects."""
    rng = random.Random(seed)
    out: dict[str, list[PackTable]] = {}
    earlier: list[bytes] = []
    for k in range(objects):
        ids = [rng.randbytes(32) for _ in range(per_pack)]
        if earlier:
            ids[::7] = rng.sample(earlier, len(ids[::7]))  # dedup of an earlier object's blobs
        earlier.extend(ids)
        out[f"i{k:064x}"] = [table(k, ids, type_code=1 + k % 3)]
    return out


def ids_of(tables: list[PackTable]) -> list[bytes]:
    return [bytes(r[1]) for t in tables for r in ENTRY.iter_unpack(t.records)]


def reference(objects: dict[str, list[PackTable]], names: list[str]) -> Index:
    index = Index()
    for name in names:
        for t in objects[name]:
            index.add_table(t)
    return index


def listing(objects: dict[str, list[PackTable]]) -> list[tuple[str, int]]:
    return [(name, 1000 + k) for k, name in enumerate(objects)]


def assert_same(cached: CachedIndex, ref: Index, probes: list[bytes]) -> None:
    for blob_id in probes:
        assert cached.get(blob_id) == ref.get(blob_id)
        assert (blob_id in cached) == (blob_id in ref)
    assert cached.blob_ends() == ref.blob_ends()
    for pack in ref.packs():
        assert pack in cached.packs()
    assert pack_name(10**6) not in cached.packs()


def test_cache_answers_like_the_index(tmp_path: Path) -> None:
    """Every ID, with the first location in root order; unknown IDs absent; packs and ends."""
    objects = synthetic(1, 12, 300)
    indexes = listing(objects)
    reads: list[str] = []

    def read(name: str, raw_length: int) -> list[PackTable]:
        reads.append(name)
        return objects[name]

    cached = open_cached(tmp_path, ARCHIVE_ID, indexes, read)
    ref = reference(objects, list(objects))
    ids = [i for ts in objects.values() for i in ids_of(ts)]
    assert_same(cached, ref, ids + [os.urandom(32) for _ in range(200)])
    assert len(cached.disk) == len(ref)
    assert reads == list(objects)
    cached.close()
    (path,) = tmp_path.glob("*.idx")
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary files are left"


def test_new_index_objects_are_read_on_top_of_the_file(tmp_path: Path) -> None:
    """A root listing two more objects: only those are read, after the file, and agree."""
    objects = synthetic(2, 8, 200)
    names = list(objects)
    indexes = listing(objects)
    open_cached(tmp_path, ARCHIVE_ID, indexes[:6], lambda n, _: objects[n]).close()
    reads: list[str] = []

    def read(name: str, raw_length: int) -> list[PackTable]:
        reads.append(name)
        return objects[name]

    cached = open_cached(tmp_path, ARCHIVE_ID, indexes, read)
    assert reads == names[6:]
    ids = ids_of(objects[names[7]])
    assert_same(cached, reference(objects, names), ids)
    cached.close()


def test_an_index_list_that_does_not_extend_the_file_rebuilds_it(tmp_path: Path) -> None:
    """A prune (new list) or a backup putting its object first: the file is rebuilt."""
    objects = synthetic(3, 6, 100)
    names = list(objects)
    indexes = listing(objects)
    open_cached(tmp_path, ARCHIVE_ID, indexes, lambda n, _: objects[n]).close()
    reordered = [indexes[-1], *indexes[:-1]]
    reads: list[str] = []

    def read(name: str, raw_length: int) -> list[PackTable]:
        reads.append(name)
        return objects[name]

    cached = open_cached(tmp_path, ARCHIVE_ID, reordered, read)
    assert reads == [n for n, _ in reordered]
    order = [names[-1], *names[:-1]]
    ids = ids_of(objects[names[-1]])
    assert_same(cached, reference(objects, order), ids)
    cached.close()


def test_too_many_new_objects_rebuild_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    objects = synthetic(4, 6, 50)
    indexes = listing(objects)
    open_cached(tmp_path, ARCHIVE_ID, indexes[:1], lambda n, _: objects[n]).close()
    monkeypatch.setattr(index_cache, "MAX_EXTRA_OBJECTS", 2)
    cached = open_cached(tmp_path, ARCHIVE_ID, indexes, lambda n, _: objects[n])
    assert cached.disk.layout.covered == len(indexes) and len(cached.extra) == 0
    cached.close()


@pytest.mark.parametrize("damage", ["truncated", "extended", "bad-magic", "other-archive"])
def test_a_damaged_or_foreign_file_is_rebuilt(tmp_path: Path, damage: str) -> None:
    objects = synthetic(5, 4, 100)
    indexes = listing(objects)
    path = tmp_path / f"{ARCHIVE_ID}.idx"
    build_cache(path, ARCHIVE_ID, indexes, lambda n, _: objects[n])
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:-10])
    elif damage == "extended":
        path.write_bytes(data + b"\0")
    elif damage == "bad-magic":
        path.write_bytes(b"X" + data[1:])
    else:
        other = tmp_path / "other.idx"
        build_cache(other, "cd" * 16, indexes, lambda n, _: objects[n])
        os.replace(other, path)
    cached = open_cached(tmp_path, ARCHIVE_ID, indexes, lambda n, _: objects[n])
    ids = ids_of(objects[next(iter(objects))])
    assert_same(cached, reference(objects, list(objects)), ids)
    cached.close()
    DiskIndex(path).close()  # sound again


@pytest.mark.parametrize("replaced_times", [1, index_cache.REOPEN_TRIES + 1])
def test_a_file_replaced_after_it_was_written_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replaced_times: int
) -> None:
    """Another command renames its own file (for another root: here a prefix) over the one just
    built: open_cached writes it again rather than answer from the wrong root, and gives up with
    one clear error when the file keeps being replaced."""
    objects = synthetic(6, 4, 60)
    indexes = listing(objects)
    prefix_file = tmp_path / "prefix.idx"
    build_cache(prefix_file, ARCHIVE_ID, indexes[:2], lambda n, _: objects[n])
    real_build = index_cache.build_cache
    calls = []

    def build_then_replace(path: Path, *args: Any, **kwargs: Any) -> None:
        real_build(path, *args, **kwargs)
        calls.append(path)
        if len(calls) <= replaced_times:
            other = path.with_suffix(".other")
            other.write_bytes(prefix_file.read_bytes())
            os.replace(other, path)

    monkeypatch.setattr(index_cache, "build_cache", build_then_replace)
    if replaced_times > index_cache.REOPEN_TRIES:
        with pytest.raises(IntegrityError, match="keeps being replaced"):
            open_cached(tmp_path, ARCHIVE_ID, indexes, lambda n, _: objects[n])
        return
    cached = open_cached(tmp_path, ARCHIVE_ID, indexes, lambda n, _: objects[n])
    assert cached.disk.layout.covered == len(indexes) and len(calls) == 2
    assert_same(cached, reference(objects, list(objects)), ids_of(objects[indexes[-1][0]]))
    cached.close()


def test_an_empty_archive_has_an_empty_cache(tmp_path: Path) -> None:
    cached = open_cached(tmp_path, ARCHIVE_ID, [], lambda n, _: [])
    assert os.urandom(32) not in cached and cached.blob_ends() == {}
    cached.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_commands_use_the_cache_and_survive_losing_it(tmp_path: Path, qbhub: Qbhub) -> None:
    """Backups, list, restore and diff through the cache; deleted or damaged, it is rebuilt."""
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "disk.img", 96, seed=3)
    qbhub.run("init", "--dest", archive)
    first = qbhub.json("volume", "backup", "--dest", archive, f"{image}=disk")
    cache = qbhub.home / "index-cache" / f"{first['archive_id']}.idx"
    assert cache.is_file()
    digest = sha256(image)
    rewrite_blocks(image, [5, 50])
    second = qbhub.json("volume", "backup", "--dest", archive, f"{image}=disk")
    assert second["volumes"][0]["chunks_new"] <= 4, "dedup through the cache"
    for damage in ("none", "deleted", "truncated"):
        if damage == "deleted":
            cache.unlink()
        elif damage == "truncated":
            cache.write_bytes(cache.read_bytes()[:100])
        listed = qbhub.json("list", "--dest", archive)
        assert [s["session"] for s in listed["sessions"]] == [first["session"], second["session"]]
        out = tmp_path / f"out-{damage}.img"
        qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", out,
                  "--session", first["session"])  # fmt: skip
        assert sha256(out) == digest
        diff = qbhub.json("diff", "--dest", archive, "disk", image)
        assert diff["identical"]
    third = qbhub.json("volume", "backup", "--dest", archive, f"{image}=disk")
    assert third["volumes"][0]["chunks_new"] == 0
    qbhub.run("verify", "--dest", archive)


def test_split_packs_bounds_entries_per_index_object() -> None:
    """Parts of at most N entries, packs whole and in name order, nothing lost."""
    from qbhub_native.pack import PackEntry
    from qbhub_native.writer import split_packs

    packs = {pack_name(k): [PackEntry(1, os.urandom(32), 0, 1, 1)] * (k + 1) for k in range(10)}
    parts = split_packs(packs, max_entries=12)
    assert all(sum(len(e) for e in part.values()) <= 12 for part in parts)
    assert [n for part in parts for n in part] == sorted(packs)
    big = split_packs({pack_name(1): [PackEntry(1, os.urandom(32), 0, 1, 1)] * 20}, max_entries=12)
    assert len(big) == 1, "a pack is never split"


def backup_in_process(qbhub: Qbhub, archive: Path, image: Path) -> dict[str, Any]:
    """`qbhub volume backup` run in this process (so that a test can patch the engine)."""
    from types import SimpleNamespace

    from qbhub_native.engine import NativeEngine

    from qubes_backup_hub.engine import EngineContext, VolumeSource
    from qubes_backup_hub.passphrase import PassphraseSource
    from qubes_backup_hub.progress import Progress
    from qubes_backup_hub.store.local import LocalDirStore
    from qubes_backup_hub.stream.file import qbhub_open_stream

    context = EngineContext(
        hook=SimpleNamespace(qbhub_open_stream=qbhub_open_stream),  # type: ignore[arg-type]
        passphrase=PassphraseSource(value=qbhub.env["QBHUB_PASSPHRASE"].encode()),
        state_dir=qbhub.home,
        progress=Progress(enabled=False),
    )
    return NativeEngine(context).backup(
        LocalDirStore(archive), [VolumeSource(name="disk", path=str(image))]
    )


def test_a_large_session_writes_several_index_objects(
    tmp_path: Path, qbhub: Qbhub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session over the per-object entry limit: several objects, all listed, all readable."""
    from qbhub_native import writer

    archive = tmp_path / "archive"
    image = write_image(tmp_path / "disk.img", 160, seed=8)
    qbhub.run("init", "--dest", archive)
    monkeypatch.setattr(writer, "MAX_INDEX_ENTRIES", 40)
    result = backup_in_process(qbhub, archive, image)
    assert result["packs_written"] >= 2
    objects = list((archive / "objects").glob("*/i*"))
    assert len(objects) >= 2
    out = tmp_path / "out.img"
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", out)
    assert sha256(out) == sha256(image)
    qbhub.run("verify", "--dest", archive)


def test_a_backup_sets_its_own_entries_aside_and_still_deduplicates(
    tmp_path: Path, qbhub: Qbhub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts of the session's index set aside on disk still answer its dedup checks."""
    from qbhub_native import writer

    archive = tmp_path / "archive"
    half = write_image(tmp_path / "half.img", 160, seed=9, zero_fraction=0.0)
    image = tmp_path / "disk.img"
    image.write_bytes(half.read_bytes() * 2)  # the second half repeats the first
    qbhub.run("init", "--dest", archive)
    monkeypatch.setattr(writer, "MAX_INDEX_ENTRIES", 20)
    result = backup_in_process(qbhub, archive, image)
    assert result["volumes"][0]["chunks_new"] == 160
    assert len(list((archive / "objects").glob("*/i*"))) >= 2
    cache_dir = qbhub.home / "index-cache"
    assert [p.name for p in cache_dir.iterdir()] == [f"{result['archive_id']}.idx"]
    out = tmp_path / "out.img"
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", out)
    assert sha256(out) == sha256(image)
    again = qbhub.json("volume", "backup", "--dest", archive, f"{image}=disk")
    assert again["volumes"][0]["chunks_new"] == 0
    qbhub.run("verify", "--dest", archive)


def test_new_objects_beyond_the_limit_are_folded_into_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too much after the file: a new file from its records and the new objects only."""
    objects = synthetic(6, 8, 100)
    names = list(objects)
    indexes = listing(objects)
    open_cached(tmp_path, ARCHIVE_ID, indexes[:5], lambda n, _: objects[n]).close()
    monkeypatch.setattr(index_cache, "MAX_EXTRA_ENTRIES", 150)
    reads: list[str] = []

    def read(name: str, raw_length: int) -> list[PackTable]:
        reads.append(name)
        return objects[name]

    cached = open_cached(tmp_path, ARCHIVE_ID, indexes, read)
    assert cached.disk.layout.covered == len(indexes) and len(cached.extra) == 0
    assert set(reads) == set(names[5:]), "the old file's objects are not read again"
    ids = [i for ts in objects.values() for i in ids_of(ts)]
    assert_same(cached, reference(objects, names), ids)
    cached.close()


def test_a_file_damaged_inside_is_rebuilt_from_the_archive_when_folded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records out of order (damage the header does not show): refold from the archive."""
    objects = synthetic(7, 6, 100)
    indexes = listing(objects)
    path = tmp_path / f"{ARCHIVE_ID}.idx"
    build_cache(path, ARCHIVE_ID, indexes[:4], lambda n, _: objects[n])
    data = bytearray(path.read_bytes())
    layout = DiskIndex(path).layout
    data[layout.records_at] ^= 0xFF  # the first record's ID now starts with another byte
    path.write_bytes(bytes(data))
    monkeypatch.setattr(index_cache, "MAX_EXTRA_ENTRIES", 10)
    cached = open_cached(tmp_path, ARCHIVE_ID, indexes, lambda n, _: objects[n])
    ids = [i for ts in objects.values() for i in ids_of(ts)]
    assert_same(cached, reference(objects, list(objects)), ids)
    cached.close()


def test_a_backup_refuses_an_index_object_storage_lost(tmp_path: Path, qbhub: Qbhub) -> None:
    """The cache still knows its entries, but a backup must not commit over a lost index."""
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "disk.img", 32, seed=4)
    qbhub.run("init", "--dest", archive)
    qbhub.json("volume", "backup", "--dest", archive, f"{image}=disk")
    qbhub.json("list", "--dest", archive)
    (lost,) = (archive / "objects").glob("*/i*")
    lost.unlink()
    rewrite_blocks(image, [1])
    run = qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk", check=False)
    assert run.returncode in (3, 6, 7), run.stderr
    assert "Traceback" not in run.stderr


def test_set_aside_filter_has_no_false_negatives() -> None:
    """Every ID added is a candidate; most others are not."""
    from qbhub_native.writer import SetAsideFilter

    ids = [os.urandom(32) for _ in range(2000)]
    records = b"".join(ENTRY.pack(1, i, 0, 1, 1) for i in ids)
    empty = SetAsideFilter(bits=1 << 16)
    assert ids[0] not in empty
    filt = SetAsideFilter(bits=1 << 16)
    filt.add_records(records)
    assert all(i in filt for i in ids)
    assert sum(os.urandom(32) in filt for _ in range(2000)) < 200


def test_prune_writes_the_cache_for_its_new_index_objects(tmp_path: Path, qbhub: Qbhub) -> None:
    """After a prune the cache already covers the new index: the next command reuses it."""
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "disk.img", 64, seed=6)
    qbhub.run("init", "--dest", archive)
    first = qbhub.json("volume", "backup", "--dest", archive, f"{image}=disk")
    rewrite_blocks(image, [2, 30])
    qbhub.json("volume", "backup", "--dest", archive, f"{image}=disk")
    qbhub.run("prune", "--dest", archive, "--session", first["session"])
    cache = qbhub.home / "index-cache" / f"{first['archive_id']}.idx"
    layout = DiskIndex(cache).layout
    assert layout.covered == len(list((archive / "objects").glob("*/i*")))
    inode = cache.stat().st_ino
    listed = qbhub.json("list", "--dest", archive)
    assert len(listed["sessions"]) == 1
    assert cache.stat().st_ino == inode, "the cache was not rebuilt"
    out = tmp_path / "out.img"
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", out)
    assert sha256(out) == sha256(image)


def test_an_unwritable_cache_directory_falls_back_to_memory(tmp_path: Path, qbhub: Qbhub) -> None:
    """A state directory where the cache can't be made: commands still work, index in memory."""
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "disk.img", 16, seed=7)
    qbhub.run("init", "--dest", archive)
    (qbhub.home / "index-cache").write_text("not a directory")
    qbhub.json("volume", "backup", "--dest", archive, f"{image}=disk")
    out = tmp_path / "out.img"
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", out)
    assert sha256(out) == sha256(image)


def test_write_cache_merges_a_file_runs_and_tables_in_precedence_order(tmp_path: Path) -> None:
    """A file covering a prefix, sorted runs (pack numbers of their own) and pack tables give
    the same answers as the in-memory index of every object in root order."""
    objects = synthetic(11, 8, 150)
    names = list(objects)
    indexes = listing(objects)
    base_path = tmp_path / "base.idx"
    build_cache(base_path, ARCHIVE_ID, indexes[:3], lambda n, _: objects[n])
    base = DiskIndex(base_path)
    runs = [index_cache.spill_run(tmp_path, objects[n]) for n in names[3:6]]
    later = [t for n in names[6:] for t in objects[n]]
    target = index_cache.cache_path(tmp_path, ARCHIVE_ID)
    index_cache.write_cache(target, ARCHIVE_ID, indexes, [base, *runs, later])
    for run in runs:
        run.close()
    base.close()
    cached = open_cached(tmp_path, ARCHIVE_ID, indexes, lambda n, _: pytest.fail("read " + n))
    assert cached.disk.layout.covered == len(indexes)
    ref = reference(objects, names)
    probes = [i for n in names for i in ids_of(objects[n])] + [os.urandom(32) for _ in range(50)]
    assert_same(cached, ref, probes)
    cached.close()


def test_a_backup_that_set_entries_aside_leaves_a_valid_cache(
    tmp_path: Path, qbhub: Qbhub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a session whose entries went to runs, the cache file covers the new root's whole
    index list and answers like the whole index: the next command reads no index object."""
    from qbhub_native import writer
    from qbhub_native.repository import Repository

    from qubes_backup_hub.safety.rollback import LocalState
    from qubes_backup_hub.store.local import LocalDirStore

    archive = tmp_path / "archive"
    qbhub.run("init", "--dest", archive)
    monkeypatch.setattr(writer, "MAX_INDEX_ENTRIES", 20)
    image = write_image(tmp_path / "disk.img", 120, seed=12, zero_fraction=0.0)
    backup_in_process(qbhub, archive, image)
    rewrite_blocks(image, list(range(0, 120, 3)))
    result = backup_in_process(qbhub, archive, image)
    assert result["volumes"][0]["chunks_new"] >= 30
    passphrase = qbhub.env["QBHUB_PASSPHRASE"].encode()
    repo = Repository.open(LocalDirStore(archive), lambda: passphrase, LocalState(qbhub.home))
    indexes = list(repo.body.indexes)
    assert len(indexes) >= 2
    path = index_cache.cache_path(qbhub.home / "index-cache", repo.header.archive_id)
    cached = open_cached(
        path.parent, repo.header.archive_id, indexes, lambda n, _: pytest.fail("read " + n)
    )
    assert cached.disk.layout.covered == len(indexes)
    ref = repo.index
    ids = [i for t in ref.tables() for i in ids_of([t])]
    assert_same(cached, ref, ids + [os.urandom(32) for _ in range(20)])
    cached.close()
    out = tmp_path / "out.img"
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", out)
    assert sha256(out) == sha256(image)


def test_a_file_with_many_buckets_per_first_byte_finds_every_id(tmp_path: Path) -> None:
    """Enough records for several buckets per first byte (found by bisection when written):
    every ID is found in its bucket with its first location, repeated IDs included."""
    objects = synthetic(13, 12, 2000)
    indexes = listing(objects)
    cached = open_cached(tmp_path, ARCHIVE_ID, indexes, lambda n, _: objects[n])
    assert cached.disk.layout.bits >= 10
    ref = reference(objects, list(objects))
    probes = [i for n in objects for i in ids_of(objects[n])] + [os.urandom(32) for _ in range(99)]
    assert_same(cached, ref, probes)
    buckets = cached.disk.buckets
    assert all(buckets[b] <= buckets[b + 1] for b in range(len(buckets) - 1))
    cached.close()
