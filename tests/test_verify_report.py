"""`verify` reports every damaged object and what it affects, and goes on past the first one.

An archive of three sessions (1: alpha and beta; 2: alpha changed; 3: alpha again) is damaged in
four places at once: a pack deleted, a tree page and a session record flipped, a chunk flipped.
Full and quick verify list each problem with the sessions and volumes that reference it, print
the listing on stdout, and exit 3 with one summary line on stderr.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, Qbhub, rewrite_blocks, write_image
from qbhub_native.repository import Repository
from qbhub_native.verify import DamageReport, TolerantRepository, verify_archive

from qubes_backup_hub.progress import Progress
from qubes_backup_hub.safety.rollback import LocalState
from qubes_backup_hub.store.local import LocalDirStore

CHANGED = [10, 11, 12]


@dataclass
class Damaged:
    """The damaged archive and what was damaged."""

    archive: Path
    sessions: list[str]
    lost_pack: str  # deleted; holds alpha's chunk 0 (unchanged since session 1)
    beta_page: str  # flipped: beta's only tree page (session 1)
    record: str  # flipped: session 2's record
    chunk: str  # flipped: alpha's chunk 10 as sessions 2 and 3 hold it
    chunk_pack: str


def object_path(archive: Path, name: str) -> Path:
    return archive / "objects" / name[-2:] / name


def flip_blob(archive: Path, repo: Repository, blob_id: bytes) -> str:
    """Flip a byte in the middle of a blob; return its pack's name."""
    loc = repo.index.get(blob_id)
    assert loc is not None
    path = object_path(archive, loc.pack)
    data = bytearray(path.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return loc.pack


def open_repo(archive: Path, state: Path) -> Repository:
    return Repository.open(LocalDirStore(archive), lambda: PASSPHRASE.encode(), LocalState(state))


def first_leaf(repo: Repository, session: int, volume: str) -> bytes:
    record = repo.session_record(repo.body.sessions[session])
    found = record.volume(volume)
    assert found is not None and found.geometry.height == 0
    return found.tree_id


@pytest.fixture
def damaged(tmp_path: Path, qbhub: Qbhub) -> Damaged:
    archive = tmp_path / "archive"
    alpha = write_image(tmp_path / "alpha.img", 100, seed=1, zero_fraction=0.0)
    beta = write_image(tmp_path / "beta.img", 40, seed=2, zero_fraction=0.0)
    qbhub.run("init", "--dest", archive)
    qbhub.run("volume", "backup", "--dest", archive, f"{alpha}=alpha", f"{beta}=beta")
    rewrite_blocks(alpha, CHANGED)
    qbhub.run("volume", "backup", "--dest", archive, f"{alpha}=alpha")
    qbhub.run("volume", "backup", "--dest", archive, f"{alpha}=alpha")

    repo = open_repo(archive, tmp_path / "state")
    sessions = [ref.session_id for ref in repo.body.sessions]
    alpha_leaf_1 = repo.load_page(first_leaf(repo, 0, "alpha"), 0, 100)
    alpha_leaf_3 = repo.load_page(first_leaf(repo, 2, "alpha"), 0, 100)
    chunk0, chunk10 = alpha_leaf_1[:32], alpha_leaf_3[10 * 32 : 11 * 32]
    loc0 = repo.index.get(chunk0)
    assert loc0 is not None
    beta_page = first_leaf(repo, 0, "beta")
    record = repo.body.sessions[1].record
    touched = {flip_blob(archive, repo, b) for b in (beta_page, record)}
    chunk_pack = flip_blob(archive, repo, chunk10)
    assert loc0.pack not in touched | {chunk_pack}, "the test needs these in other packs"
    object_path(archive, loc0.pack).unlink()
    return Damaged(
        archive, sessions, loc0.pack, beta_page.hex(), sessions[1], chunk10.hex(), chunk_pack
    )


def entry(result: dict[str, Any], text: str) -> dict[str, Any]:
    """The one damaged entry naming `text` (a pack: exactly; anything else: within its name)."""
    exact = text.startswith("pack ")
    found = [
        d for d in result["damaged"] if (d["object"] == text if exact else text in d["object"])
    ]
    assert len(found) == 1, (text, result["damaged"])
    return found[0]


def run_verify(qbhub: Qbhub, archive: Path, *extra: str) -> dict[str, Any]:
    result = qbhub.run("verify", "--dest", archive, "--json", *extra, check=False)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbhub: error: verify found"), result.stderr
    assert "Traceback" not in result.stderr
    # stdout: the report, then (as for every error under --json) {"error": ..., "code": 3}.
    report, end = json.JSONDecoder().raw_decode(result.stdout)
    assert json.loads(result.stdout[end:])["code"] == 3
    assert isinstance(report, dict)
    return report


@pytest.mark.parametrize("mode", ["full", "quick"])
def test_verify_lists_every_damaged_object_with_what_it_affects(
    damaged: Damaged, qbhub: Qbhub, mode: str
) -> None:
    s1, s2, s3 = damaged.sessions
    result = run_verify(qbhub, damaged.archive, *(["--quick"] if mode == "quick" else []))
    assert result["mode"] == mode

    lost = entry(result, f"pack {damaged.lost_pack}")
    assert "missing" in lost["problem"]
    assert lost["sessions"] == [s1, s3] and lost["volumes"] == ["alpha"]
    page = entry(result, damaged.beta_page)
    assert page["sessions"] == [s1] and page["volumes"] == ["beta"]
    record = entry(result, f"session record {s2}")
    assert record["sessions"] == [s2] and record["volumes"] == []
    if mode == "full":
        chunk = entry(result, damaged.chunk)
        assert chunk["sessions"] == [s3] and chunk["volumes"] == ["alpha"]
        pack = entry(result, f"pack {damaged.chunk_pack}")
        assert "hash" in pack["problem"]
        assert result["damaged_count"] == len(result["damaged"]) >= 5
    else:
        assert not any(damaged.chunk in d["object"] for d in result["damaged"])
        assert result["damaged_count"] == len(result["damaged"]) == 3


def test_verify_text_lists_damage_and_exits_3(damaged: Damaged, qbhub: Qbhub) -> None:
    result = qbhub.run("verify", "--dest", damaged.archive, check=False)
    assert result.returncode == 3
    assert damaged.lost_pack in result.stdout and "DAMAGED" in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_clean_archive_verifies_with_an_empty_report(tmp_path: Path, qbhub: Qbhub) -> None:
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "a.img", 20, seed=3)
    qbhub.run("init", "--dest", archive)
    qbhub.run("volume", "backup", "--dest", archive, f"{image}=a")
    for extra in ([], ["--quick"]):
        result = qbhub.json("verify", "--dest", archive, *extra)
        assert result["damaged"] == [] and result["damaged_count"] == 0


def test_bad_index_object_is_reported_with_what_lacks_it(damaged: Damaged, tmp_path: Path) -> None:
    """A damaged index object: the tolerant opening records it; verify maps it to sessions."""
    repo = open_repo(damaged.archive, tmp_path / "state2")
    newest_index = repo.body.indexes[-1][0]
    path = object_path(damaged.archive, newest_index)
    data = bytearray(path.read_bytes())
    data[40] ^= 1
    path.write_bytes(bytes(data))
    tolerant = TolerantRepository.open(
        LocalDirStore(damaged.archive), lambda: PASSPHRASE.encode(), LocalState(tmp_path / "s3")
    )
    result = verify_archive(tolerant, quick=True, progress=Progress(io.StringIO(), enabled=False))
    index = entry(result, f"index object {newest_index}")
    assert damaged.sessions[2] in index["sessions"] or index["sessions"] == [], index


def test_report_is_bounded() -> None:
    report = DamageReport(limit=3)
    numbers = [report.add(k, f"object {k}", "bad") for k in range(10)]
    for k, number in enumerate(numbers):
        report.attach(number, f"s{k}", "v")
    assert report.add(0, "object 0", "bad") == numbers[0]
    out = report.result({})
    assert len(out["damaged"]) == 3 and out["damaged_count"] == 10  # type: ignore[arg-type]
    assert out["damaged_unlisted"]["count"] == 7  # type: ignore[index]
    assert len(out["damaged_unlisted"]["sessions"]) == 7  # type: ignore[index]


def test_shared_subtrees_carry_their_damage_to_every_session(tmp_path: Path) -> None:
    """Verify walks each volume against its previous tree and skips subtrees met before: damage
    under a shared leaf is still attached to every session holding it, damage under a changed
    leaf only to its sessions; the index from the cache (grouped by pack from sorted runs) gives
    the same report as the whole index in memory."""
    from test_prune import SMALL_CHUNK, InProcess

    arch = InProcess(tmp_path)
    rng = __import__("random").Random(3)
    disk = bytearray(rng.randbytes(600 * SMALL_CHUNK))  # 600 chunks: 3 leaves and a top page
    first = arch.backup({"disk": bytes(disk)})
    disk[:SMALL_CHUNK] = rng.randbytes(SMALL_CHUNK)
    second = arch.backup({"disk": bytes(disk)})
    arch.backup({"other": rng.randbytes(3 * SMALL_CHUNK)})
    repo = arch.repo()
    record = repo.session_record(repo.body.sessions[1])
    top = repo.load_page(record.volumes[0].tree_id, 1, 3)
    shared_leaf = repo.load_page(top[2 * 32 : 3 * 32], 0, 600 - 512)
    new_leaf = repo.load_page(top[:32], 0, 256)
    shared_chunk, new_chunk = shared_leaf[5 * 32 : 6 * 32], new_leaf[:32]
    for blob_id in (shared_chunk, new_chunk):
        loc = repo.locator.get(blob_id)
        assert loc is not None
        path = arch.store.path / "objects" / loc.pack[-2:] / loc.pack
        data = bytearray(path.read_bytes())
        data[loc.offset + loc.length // 2] ^= 1
        path.write_bytes(bytes(data))

    result = arch.fresh_engine().verify(arch.store, quick=False)
    assert entry(result, f"chunk {shared_chunk.hex()}")["sessions"] == [first, second]
    assert entry(result, f"chunk {new_chunk.hex()}")["sessions"] == [second]
    assert result["tree_pages"] == 4 + 2 + 1 and result["chunks_referenced"] == 601 + 3

    tolerant = TolerantRepository.open(arch.store, lambda: b"", LocalState(tmp_path / "s2"),
                                       allow_unencrypted=True)  # fmt: skip
    in_memory = verify_archive(tolerant, quick=False, progress=Progress(enabled=False))
    for key in ("damaged_count", "tree_pages", "chunks_referenced", "packs",
                "unreferenced_objects", "blobs_verified", "bytes_verified"):  # fmt: skip
        assert in_memory[key] == result[key], key
    key_of = lambda d: (d["object"], d["problem"], tuple(d["sessions"]), tuple(d["volumes"]))  # noqa: E731
    assert sorted(map(key_of, in_memory["damaged"])) == sorted(map(key_of, result["damaged"]))


@pytest.mark.parametrize("damage", ["missing", "shorter", "longer", "flipped"])
def test_damaged_index_object_is_reported_though_the_cache_covers_it(
    tmp_path: Path, qbhub: Qbhub, damage: str
) -> None:
    """The local index cache still knows what a lost index object held, so no blob lookup shows
    the damage; verify checks the objects themselves (quick: stored, with a possible size; full:
    read and authenticated) and attaches the damage to every session: on a machine without the
    cache the archive no longer opens."""
    archive = tmp_path / "archive"
    image = write_image(tmp_path / "a.img", 20, seed=4)
    qbhub.run("init", "--dest", archive)
    qbhub.run("volume", "backup", "--dest", archive, f"{image}=a")
    rewrite_blocks(image, [3])
    qbhub.run("volume", "backup", "--dest", archive, f"{image}=a")
    assert qbhub.json("verify", "--dest", archive)["damaged"] == []  # the cache is now whole
    repo = open_repo(archive, tmp_path / "state2")
    sessions = [ref.session_id for ref in repo.body.sessions]
    name = repo.body.indexes[-1][0]
    path = object_path(archive, name)
    data = bytearray(path.read_bytes())
    if damage == "missing":
        path.unlink()
    elif damage == "shorter":
        path.write_bytes(bytes(data[:-1]))
    elif damage == "longer":
        path.write_bytes(bytes(data) + bytes(4096))
    else:
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))

    # Quick reads no index object: it sees one missing or longer than possible (older archives
    # may hold compressed index objects, so a shorter one is possible); full reads each.
    quick_sees = damage in ("missing", "longer")
    modes = [[], ["--quick"]] if quick_sees else [[]]
    for extra in modes:
        result = run_verify(qbhub, archive, *extra)
        found = entry(result, f"index object {name}")
        assert found["sessions"] == sessions, found
        assert result["damaged_count"] == 1, result["damaged"]
    if not quick_sees:
        assert qbhub.json("verify", "--dest", archive, "--quick")["damaged"] == []
