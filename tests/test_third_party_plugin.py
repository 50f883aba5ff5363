"""A separate third-party distribution extends qbhub through the entry-point group alone.

`tests/plugin_dist` (distribution `qbhub-example-plugin`) is built and installed with pip, the way
a user installs a plugin, into a directory of its own. The real CLI then finds it through
PYTHONPATH: its `mirror://` store holds a whole archive (init, backup, restore, verify, prune) and
its restore validator runs on every restore and can refuse one. Without that directory on the
path, none of it exists. The store's contract is also checked in-process, the way a plugin author
would unit-test a plugin: `load_registry(extra_plugins=(module,))`.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
from conftest import Qbhub, rewrite_blocks

from qubes_backup_hub.errors import StoreError, UsageError, ValidationError
from qubes_backup_hub.registry import load_registry
from qubes_backup_hub.safety.restore_header import RestoreHeader, RestoreVolume

DIST = Path(__file__).parent / "plugin_dist"
MODULE = "qbhub_example_plugin"
SESSION = "20261126T000000Z"


@pytest.fixture(scope="session")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build and install the example distribution into a fresh directory; return it.

    The source is copied first so the build leaves nothing in the repository. pip builds it in
    an isolated environment (fetching setuptools from the configured index, exactly as
    `scripts/bootstrap` installs qbhub itself) and installs module and `.dist-info` with
    `--target`: the test venv is left untouched.
    """
    base = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(DIST, base / "src")
    target = base / "site"
    proc = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--target", str(target), str(source),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, f"pip install of {DIST} failed:\n{proc.stdout}\n{proc.stderr}"
    assert len(list(target.glob("qbhub_example_plugin-*.dist-info"))) == 1
    return target


@pytest.fixture
def with_plugin(plugin_dir: Path, tmp_path: Path) -> dict[str, str]:
    """Extra environment for a qbhub run that sees the installed plugin and audits its validator."""
    return {"PYTHONPATH": str(plugin_dir), "QBHUB_EXAMPLE_AUDIT": str(tmp_path / "audit.log")}


def journal(archive: Path) -> Counter[str]:
    """How many times each store operation appears in the mirror store's journal."""
    lines = (archive / "journal").read_text().splitlines()
    return Counter(line.split()[0] for line in lines)


def test_the_mirror_scheme_exists_only_with_the_plugin_installed(
    tmp_path: Path, qbhub: Qbhub, with_plugin: dict[str, str]
) -> None:
    listed = qbhub.json("engines", env=with_plugin)
    schemes = {s["scheme"]: s["description"] for s in listed["stores"]}
    assert "example plugin" in schemes["mirror"]
    assert "file" in schemes and "native" in {e["name"] for e in listed["engines"]}
    assert listed["problems"] == []

    assert "mirror" not in {s["scheme"] for s in qbhub.json("engines")["stores"]}
    missing = qbhub.run("init", "--dest", f"mirror://{tmp_path / 'a'}", check=False)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "no store handles 'mirror' URLs" in missing.stderr
    assert not (tmp_path / "a").exists()


def test_backup_and_restore_go_through_the_plugin_store_and_validator(
    tmp_path: Path, qbhub: Qbhub, with_plugin: dict[str, str], image_factory
) -> None:
    archive = tmp_path / "mirror-archive"
    dest = f"mirror://{archive}"
    image = image_factory(blocks=48, tail=b"odd tail")
    qbhub.run("init", "--dest", dest, env=with_plugin)
    assert journal(archive)["put_root"] == 1

    first = qbhub.json("volume", "backup", "--dest", dest, f"{image}=disk", env=with_plugin)
    ops = journal(archive)
    assert ops["lock"] == 1 and ops["put"] >= 2 and ops["put_root"] == 2
    objects = sorted(p.name for p in (archive / "objects").iterdir())
    assert len(objects) == ops["put"]  # every object in the directory came through put()
    assert first["bytes_stored"] <= sum((archive / "objects" / n).stat().st_size for n in objects)

    before = journal(archive)
    out = tmp_path / "restored.img"
    qbhub.run("volume", "restore", "--dest", dest, "disk", "--to", out, env=with_plugin)
    assert out.read_bytes() == image.read_bytes()
    reads = journal(archive) - before
    # the root is read twice: once to find the archive's engine (no --engine), once to open it
    assert reads["get_root"] == 2 and reads["get_range"] + reads["get"] > 0
    assert not {"put", "put_root", "delete", "lock"} & set(reads)  # a restore only reads
    audit = Path(with_plugin["QBHUB_EXAMPLE_AUDIT"]).read_text().splitlines()
    assert audit == [f"allowed {first['session']} disk"]

    # The rest of the archive life cycle runs on the plugin store too.
    rewrite_blocks(image, [1, 30])
    qbhub.json("volume", "backup", "--dest", dest, f"{image}=disk", env=with_plugin)
    before = journal(archive)
    pruned = qbhub.json("prune", "--dest", dest, "--keep-last", "1", env=with_plugin)
    assert pruned["sessions_removed"] == [first["session"]]
    pruning = journal(archive) - before
    assert pruning["lock"] == 1 and pruning["remove_partial_uploads"] == 1
    assert pruning["delete"] >= 1 and pruning["put_root"] >= 1
    assert qbhub.json("verify", "--dest", dest, env=with_plugin)["blobs_verified"] > 0
    out2 = tmp_path / "restored2.img"
    qbhub.run("volume", "restore", "--dest", dest, "disk", "--to", out2, env=with_plugin)
    assert out2.read_bytes() == image.read_bytes()


def test_the_plugin_validator_refuses_a_denied_volume_and_nothing_is_written(
    tmp_path: Path, qbhub: Qbhub, with_plugin: dict[str, str], image_factory
) -> None:
    dest = f"mirror://{tmp_path / 'archive'}"
    image = image_factory(blocks=8)
    qbhub.run("init", "--dest", dest, env=with_plugin)
    qbhub.run("volume", "backup", "--dest", dest, f"{image}=secret", env=with_plugin)
    out = tmp_path / "restored.img"
    deny = {**with_plugin, "QBHUB_EXAMPLE_DENY": "other, secret"}
    refused = qbhub.run(
        "volume", "restore", "--dest", dest, "secret", "--to", out, env=deny, check=False
    )
    assert refused.returncode == 8, refused.stderr
    assert refused.stderr.count("\n") == 1
    assert "'secret' is on the deny list (QBHUB_EXAMPLE_DENY)" in refused.stderr
    assert refused.stdout == ""
    assert not out.exists() and list(tmp_path.glob("restored*")) == []
    audit = Path(with_plugin["QBHUB_EXAMPLE_AUDIT"]).read_text()
    assert audit.startswith("refused ") and audit.endswith(" secret\n")


# -- the plugin in-process: how a plugin author unit-tests a store and a validator ----------------


@pytest.fixture(scope="module")
def example() -> ModuleType:
    """The plugin module, imported from its source file (not installed in this interpreter)."""
    spec = importlib.util.spec_from_file_location(MODULE, DIST / f"{MODULE}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_store_keeps_the_store_contract(tmp_path: Path, example: ModuleType) -> None:
    registry = load_registry(extra_plugins=(example,))
    with pytest.raises(UsageError):
        registry.open_store("mirror://")
    store = registry.open_store(f"mirror://{tmp_path / 'a'}")
    assert not store.exists() and store.get_root(100) is None
    store.create()
    with pytest.raises(StoreError, match="not empty"):
        registry.open_store(f"mirror://{tmp_path}").create()

    store.put("obj-1", b"0123456789")
    with pytest.raises(StoreError, match="immutable"):
        store.put("obj-1", b"other")
    for bad in ("../root", "Upper", "", "a/b"):
        with pytest.raises(StoreError, match="refused object name"):
            store.put(bad, b"x")
        with pytest.raises(StoreError, match="refused object name"):
            store.get(bad, 10)
    assert store.get("obj-1", 10) == b"0123456789"
    with pytest.raises(StoreError, match="more than the 9 allowed"):
        store.get("obj-1", 9)
    assert store.get_range("obj-1", 2, 3) == b"234"
    with pytest.raises(StoreError, match="truncated"):
        store.get_range("obj-1", 8, 3)
    with pytest.raises(StoreError, match="missing"):
        store.get("obj-2", 10)
    assert list(store.list()) == [("obj-1", 10)]

    store.put_root(b"root-1")
    store.put_root(b"root-2")
    assert store.exists() and store.get_root(6) == b"root-2"
    with pytest.raises(StoreError, match="larger than 5"):
        store.get_root(5)

    with store.lock():
        with pytest.raises(StoreError, match="in use"), store.lock():
            pass
        (tmp_path / "a" / "partial" / "obj-3.dead").write_bytes(b"debris")
        assert store.remove_partial_uploads() == 1
    store.delete("obj-1")
    store.delete("obj-1")  # missing is not an error
    assert list(store.list()) == []
    assert not (tmp_path / "a" / "objects" / "obj-1").exists()


def test_the_validator_reads_its_deny_list_at_call_time(
    monkeypatch: pytest.MonkeyPatch, example: ModuleType
) -> None:
    hook = load_registry(extra_plugins=(example,)).pm.hook
    header = RestoreHeader(volumes=(RestoreVolume("private", 1 << 20),), session=SESSION)
    monkeypatch.delenv("QBHUB_EXAMPLE_AUDIT", raising=False)
    monkeypatch.setenv("QBHUB_EXAMPLE_DENY", "root,swap")
    hook.qbhub_validate_restore(header=header)
    monkeypatch.setenv("QBHUB_EXAMPLE_DENY", "root,private")
    with pytest.raises(ValidationError, match="'private' is on the deny list"):
        hook.qbhub_validate_restore(header=header)
