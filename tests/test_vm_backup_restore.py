"""VM-level backup and restore end to end, through the real CLI on the LocalPlatform.

One module-wide "world" is built once: a platform with a template, a net VM, an AppVM with many
settings, a StandaloneVM, a backup VM and a DispVM, random data in their volumes, and an archive
in a plain directory with two sessions (the AppVM's data changed in between). Each test restores
from that archive onto an empty platform (a fresh QBHUB_HOME) or onto its own copy of the world,
and compares settings and the SHA-256 of every volume file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import PASSPHRASE, Qbhub

from qubes_backup_hub.engine import EngineContext
from qubes_backup_hub.errors import StoreError
from qubes_backup_hub.jobs.replace_guard import holder_name
from qubes_backup_hub.jobs.restore import RestoreRequest, restore_vms
from qubes_backup_hub.passphrase import PassphraseSource
from qubes_backup_hub.platform.base import VMSettings
from qubes_backup_hub.platform.local.platform import LocalPlatform
from qubes_backup_hub.progress import Progress
from qubes_backup_hub.registry import load_registry

SIZE = "8M"
MIB = 1 << 20
SETTINGS_KEYS = ("class", "pool", "properties", "features", "tags", "devices", "firewall", "notes")
BACKED_UP = ["backupvm", "fedora", "net", "standalone", "work"]  # --all: every VM but the DispVM


def sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def scribble(path: Path | str, seed: int, blocks: int = 24) -> None:
    """Write `blocks` random 64 KiB blocks at random offsets of the volume file `path`."""
    rng = random.Random(seed)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for _ in range(blocks):
            f.seek(rng.randrange(size // 65536) * 65536)
            f.write(rng.randbytes(65536))


def vm_docs(q: Qbhub) -> dict[str, dict[str, Any]]:
    """`qbhub local list --json` by VM name (dom0 left out)."""
    return {d["name"]: d for d in q.json("local", "list")["vms"] if d["name"] != "dom0"}


def settings_of(doc: dict[str, Any]) -> dict[str, Any]:
    """What a restore must bring back besides the data: class, pool and every setting."""
    return {k: doc[k] for k in SETTINGS_KEYS}


def volume_hashes(q: Qbhub) -> dict[str, str]:
    """SHA-256 of every volume, by `VM:VOLUME`."""
    return {
        f"{name}:{v['name']}": sha256(v["path"])
        for name, doc in vm_docs(q).items()
        for v in doc["volumes"]
    }


def files_of(root: Path) -> dict[str, str]:
    """Every file under a platform home with the SHA-256 of its content (logs and locks aside)."""
    return {
        str(p.relative_to(root)): sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "logs" not in p.parts and not p.name.endswith(".lock")
    }


def with_home(q: Qbhub, home: Path) -> Qbhub:
    """The same CLI runner, on another QBHUB_HOME."""
    return Qbhub(home, {**q.env, "QBHUB_HOME": str(home)})


def has_no_data(path: str) -> bool:
    """True if the file holds nothing but zeros (checked via holes, else by reading it)."""
    if os.stat(path).st_blocks == 0:
        return True
    with open(path, "rb") as f:
        return all(not any(block) for block in iter(lambda: f.read(MIB), b""))


class World:
    """The source platform, its archive, and what each session holds."""

    def __init__(self, q: Qbhub, archive: Path, tmp: Path) -> None:
        self.q, self.archive, self.tmp = q, archive, tmp
        self.sessions: list[str] = []
        self.hashes: list[dict[str, str]] = []  # per session, volumes of BACKED_UP VMs
        self.settings: dict[str, dict[str, Any]] = {}

    def copy(self, tmp_path: Path) -> Qbhub:
        """A private copy of the source platform (the archive itself is shared, read-only)."""
        home = tmp_path / "copy-home"
        shutil.copytree(self.q.home, home, symlinks=True)
        return with_home(self.q, home)

    def empty(self, tmp_path: Path, name: str = "empty-home") -> Qbhub:
        """A brand-new platform that knows nothing but the passphrase."""
        return with_home(self.q, tmp_path / name)


def create_vm(q: Qbhub, name: str, klass: str, label: str, template: str | None = None) -> None:
    """`qbhub local vm-create` with the small test size."""
    args = ["--template", template] if template else []
    q.run("local", "vm-create", name, "--class", klass, "--label", label, "--size", SIZE, *args)


def build_platform(q: Qbhub) -> None:
    """Create the sample VMs with the CLI, give `work` every kind of setting, write data."""
    create_vm(q, "fedora", "TemplateVM", "black")
    create_vm(q, "net", "AppVM", "red", "fedora")
    q.run("local", "vm-set", "net", "provides_network", "True")
    create_vm(q, "work", "AppVM", "blue", "fedora")
    # only settings the restore policy restores without --allow (safety/policy.py)
    for prop, value in (("netvm", "net"), ("memory", "800"), ("vcpus", "2"), ("maxmem", "1600")):
        q.run("local", "vm-set", "work", prop, value)
    q.run("local", "feature-set", "work", "service.cups", "1")
    q.run("local", "feature-set", "work", "os", "Linux")
    q.run("local", "tag-add", "work", "audit")
    q.run("local", "tag-add", "work", "project-x")
    create_vm(q, "standalone", "StandaloneVM", "green")
    create_vm(q, "backupvm", "AppVM", "gray", "fedora")
    create_vm(q, "dvm", "DispVM", "red", "work")
    # Settings the CLI has no command for yet, set the way a restore sets them.
    platform = LocalPlatform(q.home)
    usb = {"class": "usb", "backend": "net", "ident": "2-1", "options": {}, "required": True}
    extra = VMSettings(
        "work",
        "AppVM",
        properties=platform.vm_settings("work").properties,
        devices=[usb],
        firewall=["action=accept dsthost=example.com", "action=drop"],
        notes="the work VM\nsecond line",
    )
    assert platform.apply_settings(extra) == []
    for seed, (name, doc) in enumerate(sorted(vm_docs(q).items())):
        for volume in doc["volumes"]:
            if name != "backupvm" or volume["name"] != "private":
                scribble(volume["path"], seed * 10 + len(volume["name"]))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("world")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBHUB_")}
    q = Qbhub(
        tmp / "home", {**env, "QBHUB_HOME": str(tmp / "home"), "QBHUB_PASSPHRASE": PASSPHRASE}
    )
    build_platform(q)
    w = World(q, tmp / "archive", tmp)
    q.run("init", "--dest", w.archive)
    for step in range(2):
        if step:
            scribble(vm_docs(q)["work"]["volumes"][0]["path"], 1000)
        result = q.json("backup", "--all", "--dest", w.archive)
        assert result["vms"] == BACKED_UP
        w.sessions.append(result["session"])
        w.hashes.append({k: v for k, v in volume_hashes(q).items() if not k.startswith("dvm:")})
    assert w.hashes[0]["work:private"] != w.hashes[1]["work:private"]
    w.settings = {name: settings_of(doc) for name, doc in vm_docs(q).items()}
    return w


def test_everything_onto_an_empty_platform(world: World, tmp_path: Path) -> None:
    """Only the archive and the passphrase: every VM back with all its settings, bit-exact."""
    fresh = world.empty(tmp_path)
    assert not fresh.home.exists()
    result = fresh.json("restore", "--all", "--dest", world.archive)
    assert result["session"] == world.sessions[1]
    assert sorted(result["vms"]) == BACKED_UP and result["settings_failed"] == []
    docs = vm_docs(fresh)
    assert sorted(docs) == BACKED_UP
    for name in BACKED_UP:
        assert settings_of(docs[name]) == world.settings[name], name
    assert docs["work"]["properties"]["netvm"] == "net"
    assert docs["work"]["devices"] and docs["work"]["notes"]
    assert volume_hashes(fresh) == world.hashes[1]


def test_one_vm_leaves_the_others_alone(world: World, tmp_path: Path) -> None:
    q = world.copy(tmp_path)
    q.run("local", "vm-remove", "standalone")
    others = files_of(q.home / "local" / "pools")
    other_docs = vm_docs(q)
    result = q.json("restore", "standalone", "--dest", world.archive)
    assert result["vms"] == ["standalone"]
    hashes = volume_hashes(q)
    for volume in ("standalone:root", "standalone:private"):
        assert hashes[volume] == world.hashes[1][volume]
    after = files_of(q.home / "local" / "pools")
    assert {k: v for k, v in after.items() if "/standalone/" not in k} == others
    docs = vm_docs(q)
    assert {n: d for n, d in docs.items() if n != "standalone"} == other_docs
    assert settings_of(docs["standalone"]) == world.settings["standalone"]


def test_older_session(world: World, tmp_path: Path) -> None:
    fresh = world.empty(tmp_path)
    result = fresh.json("restore", "--all", "--session", world.sessions[0], "--dest", world.archive)
    assert result["session"] == world.sessions[0]
    assert volume_hashes(fresh) == world.hashes[0]


def test_rename_points_references_at_the_new_names(world: World, tmp_path: Path) -> None:
    q = world.copy(tmp_path)
    before = volume_hashes(q)
    q.run(
        "restore",
        "fedora",
        "work",
        "--dest",
        world.archive,
        "--rename",
        "fedora:fedora-b",
        "--rename",
        "work:work-b",
    )
    docs = vm_docs(q)
    assert docs["work-b"]["properties"]["template"] == "fedora-b"
    assert docs["work-b"]["properties"]["netvm"] == "net"
    assert docs["work-b"]["features"] == world.settings["work"]["features"]
    assert docs["work"]["properties"]["template"] == "fedora"  # the original is untouched
    hashes = volume_hashes(q)
    assert hashes["work-b:private"] == world.hashes[1]["work:private"]
    assert hashes["fedora-b:root"] == world.hashes[1]["fedora:root"]
    assert {k: v for k, v in hashes.items() if not k.split(":")[0].endswith("-b")} == before


def test_pool(world: World, tmp_path: Path) -> None:
    fresh = world.empty(tmp_path)
    fresh.run("restore", "fedora", "net", "--pool", "fast", "--dest", world.archive)
    docs = vm_docs(fresh)
    pool_dir = fresh.home / "local" / "pools" / "fast"
    for name in ("fedora", "net"):
        assert docs[name]["pool"] == "fast"
        for volume in docs[name]["volumes"]:
            assert Path(volume["path"]).parent.parent == pool_dir
            assert sha256(volume["path"]) == world.hashes[1][f"{name}:{volume['name']}"]
    assert not (fresh.home / "local" / "pools" / "default").exists()


def test_settings_only(world: World, tmp_path: Path) -> None:
    fresh = world.empty(tmp_path)
    result = fresh.json(
        "restore", "--settings-only", "fedora", "standalone", "--dest", world.archive
    )
    assert result["bytes_imported"] == 0 and result["settings_failed"] == []
    docs = vm_docs(fresh)
    for name in ("fedora", "standalone"):
        assert settings_of(docs[name]) == world.settings[name]
        for volume in docs[name]["volumes"]:
            assert has_no_data(volume["path"]), volume
            assert os.path.getsize(volume["path"]) == 8 * MIB  # the archived size, not 2/10 GiB


def test_data_only_replaces_data_and_keeps_settings(world: World, tmp_path: Path) -> None:
    q = world.copy(tmp_path)
    q.run("local", "vm-set", "work", "label", "purple")
    q.run("local", "feature-set", "work", "os", "Other")
    work_private = vm_docs(q)["work"]["volumes"][0]["path"]
    scribble(work_private, 4242)
    settings_before = settings_of(vm_docs(q)["work"])
    q.run("restore", "work", "--data-only", "--dest", world.archive)
    assert sha256(work_private) == world.hashes[1]["work:private"]
    after = settings_of(vm_docs(q)["work"])
    assert after == settings_before and after["properties"]["label"] == "purple"


@pytest.mark.parametrize("order", [["work", "net", "fedora"], ["fedora", "net", "work"]])
def test_dependency_order(world: World, tmp_path: Path, order: list[str]) -> None:
    """A template, a net VM and the AppVM using both, in either command-line order."""
    fresh = world.empty(tmp_path)
    result = fresh.json("restore", *order, "--dest", world.archive)
    assert result["vms"].index("fedora") < result["vms"].index("net") < result["vms"].index("work")
    assert result["settings_failed"] == []
    docs = vm_docs(fresh)
    assert sorted(docs) == ["fedora", "net", "work"]
    for name in docs:
        assert settings_of(docs[name]) == world.settings[name]
    assert volume_hashes(fresh) == {
        k: v for k, v in world.hashes[1].items() if k.split(":")[0] in docs
    }


def test_existing_vm_is_refused_unless_replace(world: World, tmp_path: Path) -> None:
    q = world.copy(tmp_path)
    q.run("local", "vm-set", "standalone", "label", "orange")
    scribble(vm_docs(q)["standalone"]["volumes"][1]["path"], 77)
    before = files_of(q.home / "local")
    refused = q.run("restore", "standalone", "--dest", world.archive, check=False)
    assert refused.returncode == 2 and "already exists" in refused.stderr
    assert files_of(q.home / "local") == before
    q.run("restore", "standalone", "--replace", "--dest", world.archive)
    docs = vm_docs(q)
    assert settings_of(docs["standalone"]) == world.settings["standalone"]
    hashes = volume_hashes(q)
    assert hashes["standalone:private"] == world.hashes[1]["standalone:private"]
    assert hashes["standalone:root"] == world.hashes[1]["standalone:root"]


def test_replace_all_refuses_up_front_when_a_vm_outside_still_needs_one(
    world: World, tmp_path: Path
) -> None:
    """`dvm` (not in the archive) uses `work`: nothing may be removed, not even `backupvm`."""
    q = world.copy(tmp_path)
    scribble(vm_docs(q)["work"]["volumes"][0]["path"], 5)
    before = files_of(q.home / "local")
    refused = q.run("restore", "--all", "--replace", "--dest", world.archive, check=False)
    assert files_of(q.home / "local") == before
    assert refused.returncode == 2 and "used by dvm" in refused.stderr
    q.run("local", "vm-remove", "dvm")
    result = q.json("restore", "--all", "--replace", "--dest", world.archive)
    assert sorted(result["vms"]) == BACKED_UP
    assert volume_hashes(q) == world.hashes[1]
    assert {n: settings_of(d) for n, d in vm_docs(q).items()} == {
        n: s for n, s in world.settings.items() if n != "dvm"
    }


def test_backup_through_a_backup_vm(world: World, tmp_path: Path) -> None:
    q = world.copy(tmp_path)
    url = "qubes://backupvm/arch"
    q.run("init", "--dest", url)
    result = q.json("backup", "work", "standalone", "--dest", url)
    assert result["vms"] == ["work", "standalone"]
    stored = q.home / "local" / "vms" / "backupvm" / "qbhub-archives" / "arch"
    assert (stored / "root").is_file() and any((stored / "objects").iterdir())
    q.run(
        "restore",
        "work",
        "standalone",
        "--dest",
        url,
        "--rename",
        "work:work-q",
        "--rename",
        "standalone:standalone-q",
    )
    hashes = volume_hashes(q)
    assert hashes["work-q:private"] == world.hashes[1]["work:private"]
    assert hashes["standalone-q:root"] == world.hashes[1]["standalone:root"]
    assert vm_docs(q)["work-q"]["tags"] == world.settings["work"]["tags"]
    # --all leaves out the VM that serves the archive, and says so; named, it is backed up.
    everything = q.run("backup", "--all", "--dest", url, "--json")
    assert "backupvm" not in json.loads(everything.stdout)["vms"]
    assert "leaving out backupvm: it stores this archive" in everything.stderr
    # The VM that serves the archive can't be replaced by a restore reading from it.
    q.run("backup", "backupvm", "--dest", url)
    refused = q.run("restore", "backupvm", "--replace", "--dest", url, check=False)
    assert refused.returncode == 2 and "holds the archive" in refused.stderr
    assert (stored / "root").is_file()


def test_dispvms_exclude_and_list(world: World, tmp_path: Path) -> None:
    q = world.copy(tmp_path)
    archive = tmp_path / "archive"
    q.run("init", "--dest", archive)
    first = q.json("backup", "--all", "--exclude", "standalone", "--dest", archive)
    assert first["vms"] == ["backupvm", "fedora", "net", "work"]
    second = q.json("backup", "dvm", "--dest", archive)
    assert second["vms"] == ["dvm"]
    listing = q.json("list", "--dest", archive)
    sessions = {s["session"]: sorted(v["name"] for v in s["volumes"]) for s in listing["sessions"]}
    assert sessions == {
        first["session"]: [
            "backupvm:private",
            "fedora:private",
            "fedora:root",
            "net:private",
            "work:private",
        ],
        second["session"]: ["dvm:private"],
    }
    sizes = {v["name"]: v["size"] for s in listing["sessions"] for v in s["volumes"]}
    assert set(sizes.values()) == {8 * MIB}


def test_demo_is_bit_exact(qbhub: Qbhub, tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    report = qbhub.json("demo", "--size-mib", "8", "--workdir", workdir, timeout=120)
    assert report["checks"] and all(c["bit_exact"] for c in report["checks"]), report["checks"]
    assert {"restore-renamed", "restore-all"} <= {c["kind"] for c in report["checks"]}
    assert not qbhub.home.exists()  # the user's own QBHUB_HOME is never touched
    assert report["workdir"] == str(workdir) and report["workdir_bytes"] > 8 * MIB
    text = qbhub.run("demo", "--size-mib", "4", "--workdir", workdir, timeout=120)
    assert "qbhub demo: full backup --all ..." in text.stderr  # each step said as it starts
    assert "`qbhub demo --clean` removes it" in text.stdout
    cleaned = qbhub.run("demo", "--clean", "--workdir", workdir)
    assert not workdir.exists() and f"removed {workdir}" in cleaned.stdout


class ImportFailsAfter(LocalPlatform):
    """The LocalPlatform, but the storage fails once `good` volumes were imported."""

    def __init__(self, home: Path, good: int) -> None:
        super().__init__(home)
        self.good = good

    def import_volume(self, vm: str, volume: str, size: int, data: IO[bytes]) -> None:
        if self.good == 0:
            raise StoreError(f"test: the pool is full while importing {vm}:{volume}")
        self.good -= 1
        super().import_volume(vm, volume, size, data)


def restore_in_process(q: Qbhub, world: World, platform: LocalPlatform, vms: list[str]) -> None:
    """`qbhub restore VMS --replace`, called the way cmd_hub calls it, on `platform`."""
    registry = load_registry()
    store = registry.open_store(str(world.archive))
    try:
        context = EngineContext(
            hook=registry.pm.hook,
            passphrase=PassphraseSource(env_var=None, value=PASSPHRASE.encode()),
            state_dir=q.home,
            progress=Progress(enabled=False),
        )
        engine = registry.engine("native").create(context)
        request = RestoreRequest(vms=vms, replace=True)
        restore_vms(platform, store, registry.pm.hook, engine, request)
    finally:
        store.close()


def test_failed_replace_brings_the_replaced_vms_back(world: World, tmp_path: Path) -> None:
    """Pass 2 of --replace fails after removing the VMs: they come back as they were."""
    q = world.copy(tmp_path)
    q.run("local", "vm-set", "standalone", "label", "orange")
    q.run("local", "vm-remove", "dvm")  # it uses `work`, which this restore replaces
    scribble(vm_docs(q)["standalone"]["volumes"][1]["path"], 78)
    scribble(vm_docs(q)["work"]["volumes"][0]["path"], 79)
    docs, hashes = vm_docs(q), volume_hashes(q)
    assert hashes["standalone:private"] != world.hashes[1]["standalone:private"]
    platform = ImportFailsAfter(q.home, good=2)  # fails on the third of the four volumes
    with pytest.raises(StoreError, match="pool is full"):
        restore_in_process(q, world, platform, ["standalone", "work"])
    assert vm_docs(q) == docs  # same VMs (no holders left), same settings, same volume files
    assert volume_hashes(q) == hashes


def test_replace_leaves_no_holder_behind(world: World, tmp_path: Path) -> None:
    q = world.copy(tmp_path)
    q.run("local", "vm-remove", "dvm")
    restore_in_process(q, world, LocalPlatform(q.home), ["standalone", "work"])
    docs = vm_docs(q)
    assert sorted(docs) == sorted(n for n in world.settings if n != "dvm")
    hashes = volume_hashes(q)
    assert hashes["work:private"] == world.hashes[1]["work:private"]
    assert hashes["standalone:root"] == world.hashes[1]["standalone:root"]


def test_holder_names() -> None:
    assert holder_name("work", set()) == "qbk-work"
    assert holder_name("work", {"qbk-work"}) == "qbk1-work"
    long = "a" * 31
    assert holder_name(long, set()) == ("qbk-" + long)[:31]
