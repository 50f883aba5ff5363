"""The restore worker's index: dom0's index cache handed over read-only (LocalPlatform), used only
when valid for the root dom0 pinned, never written; otherwise the worker builds its own in its
scratch directory. Every case restores bit-exact through the real worker in its sandbox, and the
index objects the worker reads through dom0's relay show which index it used."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import PASSPHRASE, Qbhub
from qbhub_native.index_cache import build_cache, cache_path
from qbhub_native.repository import Repository
from test_vm_backup_restore import scribble, sha256, vm_docs

from qubes_backup_hub.engine import EngineContext
from qubes_backup_hub.jobs.restore import RestoreRequest, WorkerChannel, restore_vms
from qubes_backup_hub.passphrase import PassphraseSource
from qubes_backup_hub.platform.local.platform import RESTORE_WORKER, LocalPlatform
from qubes_backup_hub.platform.local.sandbox import Sandbox
from qubes_backup_hub.progress import Progress
from qubes_backup_hub.registry import load_registry
from qubes_backup_hub.safety.rollback import LocalState
from qubes_backup_hub.store.local import LocalDirStore
from qubes_backup_hub.store.qrexec import OP

TESTS = Path(__file__).resolve().parent
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")


class WorkerReads:
    """Counts the index objects the worker asks dom0's relay for (dom0's own reads aside)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.index_reads = 0
        answer = WorkerChannel._answer

        def counting(channel: WorkerChannel, query: bytes) -> bytes:
            if query[:1] == bytes((OP["get"],)) and query[1:2] == b"i":
                self.index_reads += 1
            return answer(channel, query)

        monkeypatch.setattr(WorkerChannel, "_answer", counting)


class World:
    def __init__(self, q: Qbhub, archive: Path) -> None:
        self.q, self.archive = q, archive
        self.hashes: dict[str, str] = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("seed-world")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBHUB_")}
    home = tmp / "home"
    q = Qbhub(home, {**env, "QBHUB_HOME": str(home), "QBHUB_PASSPHRASE": PASSPHRASE})
    q.run("local", "vm-create", "solo", "--class", "StandaloneVM", "--label", "green",
          "--size", "8M")  # fmt: skip
    w = World(q, tmp / "archive")
    q.run("init", "--dest", w.archive)
    for step in range(3):  # three sessions: three index objects in the root
        for volume in vm_docs(q)["solo"]["volumes"]:
            scribble(volume["path"], 100 * step + len(volume["name"]))
        q.json("backup", "solo", "--dest", w.archive)
    w.hashes = {v["name"]: sha256(v["path"]) for v in vm_docs(q)["solo"]["volumes"]}
    return w


def root_indexes(home: Path, archive: Path) -> tuple[Repository, list[tuple[str, int]]]:
    repo = Repository.open(LocalDirStore(archive), lambda: PASSPHRASE.encode(), LocalState(home))
    return repo, list(repo.body.indexes)


def dom0_cache(home: Path, archive: Path, covering: slice) -> Path:
    """Write dom0's index cache file covering `indexes[covering]` (as dom0's engine would)."""
    repo, indexes = root_indexes(home, archive)
    path = cache_path(home / "index-cache", repo.header.archive_id)
    path.unlink(missing_ok=True)
    build_cache(path, repo.header.archive_id, indexes[covering], repo.index_object_tables)
    return path


def files_under(directory: Path) -> dict[str, str]:
    if not directory.exists():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def restore_copy(
    home: Path, archive: Path, monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox | None = None
) -> int:
    """Restore VM solo as solo-copy through the worker; return the index objects it read.

    dom0's engine keeps its own state (rollback memory, index cache) elsewhere, so that what
    the worker is handed is exactly the file the test wrote (dom0 would otherwise bring its own
    file up to date when it reads the session before starting the worker)."""
    registry = load_registry()
    reads = WorkerReads(monkeypatch)
    context = EngineContext(
        hook=registry.pm.hook,
        passphrase=PassphraseSource(env_var=None, value=PASSPHRASE.encode()),
        state_dir=home.parent / "dom0-engine-state",
        progress=Progress(enabled=False),
    )
    engine = registry.engine("native").create(context)
    platform = LocalPlatform(home, sandbox=sandbox)
    request = RestoreRequest(vms=["solo"], renames={"solo": "solo-copy"})
    restore_vms(platform, LocalDirStore(archive), registry.pm.hook, engine, request)
    return reads.index_reads


def restored_hashes(q: Qbhub, home: Path) -> dict[str, str]:
    docs = vm_docs(Qbhub(home, {**q.env, "QBHUB_HOME": str(home)}))
    return {v["name"]: sha256(v["path"]) for v in docs["solo-copy"]["volumes"]}


def copy_home(world: World, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(world.q.home, home, symlinks=True)
    shutil.rmtree(home / "index-cache", ignore_errors=True)
    return home


# (what dom0's cache covers, index objects the worker must read itself): the whole list, a
# prefix (the sessions since are read), another list than the root's (as after a prune made
# elsewhere: stale, rebuilt by the worker), none at all.
CASES = {
    "covers-all": (slice(None), 0),
    "covers-prefix": (slice(0, 2), 1),
    "stale": (slice(1, None), 3),
}


@needs_bwrap
@pytest.mark.parametrize("case", sorted(CASES))
def test_worker_uses_dom0_cache_only_when_valid(
    world: World, tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = copy_home(world, tmp_path)
    covering, reads = CASES[case]
    dom0_cache(home, world.archive, covering)
    before = files_under(home / "index-cache")
    index_reads = restore_copy(home, world.archive, monkeypatch)
    assert index_reads == reads
    assert restored_hashes(world.q, home) == world.hashes
    assert files_under(home / "index-cache") == before  # never written by the worker


@needs_bwrap
def test_worker_without_dom0_cache(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = copy_home(world, tmp_path)
    index_reads = restore_copy(home, world.archive, monkeypatch)
    assert index_reads == 3  # every index object, into the worker's own cache
    assert restored_hashes(world.q, home) == world.hashes
    assert not (home / "index-cache").exists()


@needs_bwrap
def test_worker_with_a_damaged_dom0_cache(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A truncated file or one with a flipped record is never trusted into a wrong restore."""
    home = copy_home(world, tmp_path)
    path = dom0_cache(home, world.archive, slice(None))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 7)
    index_reads = restore_copy(home, world.archive, monkeypatch)
    assert index_reads == 3
    assert restored_hashes(world.q, home) == world.hashes


def test_unsandboxed_worker_reads_the_host_path(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without bwrap the worker is told the host path of dom0's cache and still only reads it."""
    home = copy_home(world, tmp_path)
    dom0_cache(home, world.archive, slice(None))
    before = files_under(home / "index-cache")
    index_reads = restore_copy(home, world.archive, monkeypatch, Sandbox(bwrap=None))
    assert index_reads == 0
    assert restored_hashes(world.q, home) == world.hashes
    assert files_under(home / "index-cache") == before


@needs_bwrap
def test_worker_sandbox_cannot_write_dom0_cache(world: World, tmp_path: Path) -> None:
    """The worker's sandbox sees dom0's cache files read-only: reading works, every way of
    changing, replacing, removing or adding to them fails, and the host files are unchanged."""
    home = copy_home(world, tmp_path)
    path = dom0_cache(home, world.archive, slice(None))
    before = files_under(home / "index-cache")
    platform = LocalPlatform(home)
    platform.services.register(RESTORE_WORKER, "index_seed_probe", [TESTS])
    assert platform.sandbox.sandboxed
    process = platform.dispvm_service(RESTORE_WORKER)
    line = process.stdout.readline()
    assert process.wait(timeout=60) == 0, line
    result = json.loads(line)
    assert result["seed"] == "/run/qbhub/index-cache"
    assert result["names"] == [path.name]
    tried = result["files"][path.name]
    assert tried.pop("head") == path.read_bytes()[:12].hex()
    assert tried.pop("read") == "ok"
    assert tried and all(v.startswith("failed") for v in tried.values()), tried
    assert result["create"].startswith("failed")
    assert files_under(home / "index-cache") == before
