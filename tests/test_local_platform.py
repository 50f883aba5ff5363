"""LocalPlatform: the state file, VM classes and volumes, settings, exact-size imports, and the
`qbhub local` commands end to end."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import pytest
from conftest import Qbhub

from qubes_backup_hub.errors import IntegrityError, NotFoundError, QbhubError, UsageError
from qubes_backup_hub.platform.base import VMSettings
from qubes_backup_hub.platform.local.platform import LocalPlatform
from qubes_backup_hub.platform.local.pools import Pools, parse_size
from qubes_backup_hub.platform.local.sandbox import Sandbox
from qubes_backup_hub.platform.local.statefile import check_vm_name

MIB = 1 << 20


@pytest.fixture
def platform(tmp_path: Path) -> LocalPlatform:
    return LocalPlatform(tmp_path / "home", sandbox=Sandbox(bwrap=None, warn_to=io.StringIO()))


def settings(name: str, klass: str, **properties: object) -> VMSettings:
    return VMSettings(name, klass, properties={"label": "red", **properties})


def make_world(platform: LocalPlatform) -> None:
    platform.create_vm(settings("debian", "TemplateVM", label="black"), size=4 * MIB)
    platform.create_vm(settings("work", "AppVM", template="debian"), size=2 * MIB)


def test_state_round_trip(platform: LocalPlatform, tmp_path: Path) -> None:
    make_world(platform)
    full = VMSettings(
        "work",
        "AppVM",
        properties={"label": "blue", "netvm": "", "memory": 800, "debug": True, "vcpus": "2"},
        features={"service.cups": "1", "os": "Linux"},
        tags=["audit", "created-by-test"],
        devices=[
            dict(options={}, required=True, backend="dom0", ident="2-1", **{"class": "usb"}),
            # as Qubes 4.3 records it: a named device on any port, auto-attached
            {
                "class": "usb",
                "backend": "dom0",
                "ident": "*",
                "device_id": "0781:5581:SanDisk",
                "mode": "auto-attach",
                "options": {},
            },
        ],
        firewall=["action=accept dsthost=example.com", "action=drop"],
        notes="my notes\nline two",
    )
    assert platform.apply_settings(full) == []
    again = LocalPlatform(tmp_path / "home").vm_settings("work")
    assert again.properties == {
        "label": "blue",
        "template": "debian",
        "netvm": "",
        "memory": "800",
        "debug": "True",
        "vcpus": "2",
    }
    assert again.features == full.features and again.tags == full.tags
    assert again.devices == full.devices and again.firewall == full.firewall
    assert again.notes == full.notes
    doc = json.loads((tmp_path / "home" / "local" / "state.json").read_text())
    assert doc["version"] == 1 and sorted(doc["vms"]) == ["debian", "work"]
    assert not list((tmp_path / "home" / "local").glob(".*tmp*"))


@pytest.mark.parametrize(
    "name",
    ["", "1abc", "a" * 32, "dom0", "Dom0", "none", "default", "a/b", "a b", "..", "-x", "ä"],
)
def test_bad_vm_names_are_refused(platform: LocalPlatform, name: str) -> None:
    with pytest.raises(UsageError):
        check_vm_name(name)
    with pytest.raises(UsageError):
        platform.create_vm(settings(name, "StandaloneVM"))
    assert [vm.name for vm in platform.list_vms()] == ["dom0"]


@pytest.mark.parametrize("name", ["a", "a" * 31, "work-1.x_y", "Sys-Net"])
def test_good_vm_names_are_accepted(platform: LocalPlatform, name: str) -> None:
    platform.create_vm(settings(name, "StandaloneVM"), size=MIB)
    assert name in [vm.name for vm in platform.list_vms()]


def test_corrupt_or_tampered_state_is_refused(platform: LocalPlatform) -> None:
    make_world(platform)
    path = platform.state_file.path
    doc = json.loads(path.read_text())
    doc["vms"]["../../etc"] = doc["vms"].pop("work")
    path.write_text(json.dumps(doc))
    with pytest.raises(QbhubError, match="corrupt"):
        platform.list_vms()
    path.write_text("{not json")
    with pytest.raises(QbhubError, match="corrupt"):
        platform.vm_settings("debian")


def test_classes_own_their_persistent_volumes(platform: LocalPlatform) -> None:
    make_world(platform)
    platform.create_vm(settings("standalone", "StandaloneVM"), pool="fast", size=3 * MIB)
    platform.create_vm(settings("dvm", "DispVM", template="work"))
    platform.create_vm(settings("big", "TemplateVM"))
    vols = {vm: {v.name: v for v in platform.vm_volumes(vm)} for vm in ("debian", "work", "dvm")}
    assert sorted(vols["debian"]) == ["private", "root"]
    assert sorted(vols["work"]) == ["private"]  # its root is the template's
    assert sorted(vols["dvm"]) == ["private"]
    assert not (platform.pools.vm_dir("default", "work") / "root.img").exists()
    assert vols["work"]["private"].size == 2 * MIB
    standalone = {v.name: v for v in platform.vm_volumes("standalone")}
    assert {v.size for v in standalone.values()} == {3 * MIB}
    assert {v.pool for v in standalone.values()} == {"fast"}
    assert "/pools/fast/standalone/root.img" in standalone["root"].path
    big = {v.name: v.size for v in platform.vm_volumes("big")}
    assert big == {"root": 10 << 30, "private": 2 << 30}
    assert os.stat(platform.vm_volumes("big")[0].path).st_blocks == 0  # sparse
    assert platform.vm_volumes("dom0") == []
    first = platform.list_vms()[0]
    assert (first.name, first.klass, first.state) == ("dom0", "AdminVM", "Running")


@pytest.mark.parametrize(
    "klass, props, message",
    [
        ("AppVM", {}, "needs a template"),
        ("AppVM", {"template": "work"}, "must be an existing TemplateVM"),
        ("DispVM", {"template": "debian"}, "must be an existing AppVM"),
        ("TemplateVM", {"template": "debian"}, "has no template"),
        ("AppVM", {"template": "debian", "label": "pink"}, "label"),
        ("AdminVM", {}, "can't create"),
        ("HVM", {}, "can't create"),
    ],
)
def test_create_refuses_what_qubes_refuses(
    platform: LocalPlatform, klass: str, props: dict[str, str], message: str
) -> None:
    make_world(platform)
    with pytest.raises(UsageError, match=message):
        platform.create_vm(settings("new", klass, **props))
    assert "new" not in [vm.name for vm in platform.list_vms()]
    assert not platform.pools.vm_dir("default", "new").exists()


def test_create_twice_is_refused(platform: LocalPlatform) -> None:
    make_world(platform)
    with pytest.raises(UsageError, match="already exists"):
        platform.create_vm(settings("work", "StandaloneVM"))
    assert platform.vm_settings("work").klass == "AppVM"


def test_apply_settings_reports_what_failed_and_applies_the_rest(platform: LocalPlatform) -> None:
    make_world(platform)
    failed = platform.apply_settings(
        VMSettings(
            "work",
            "AppVM",
            properties={"label": "green", "netvm": "nosuchvm", "colour": "x", "memory": "-1"},
            features={"good": "1", "bad key": "1"},
            tags=["fine", "not fine"],
        )
    )
    assert len(failed) == 5
    assert any("netvm" in f for f in failed) and any("colour" in f for f in failed)
    assert any("memory" in f for f in failed) and any("bad key" in f for f in failed)
    assert any("tag" in f for f in failed)
    got = platform.vm_settings("work")
    assert got.properties["label"] == "green" and "netvm" not in got.properties
    assert got.features == {"good": "1"} and got.tags == ["fine"]


def test_update_is_all_or_nothing(platform: LocalPlatform) -> None:
    make_world(platform)
    with pytest.raises(UsageError, match="netvm"):
        platform.update_vm("work", properties={"label": "green", "netvm": "work"})
    assert platform.vm_settings("work").properties["label"] == "red"


def test_concurrent_writers_lose_nothing(platform: LocalPlatform) -> None:
    make_world(platform)

    def writer(prefix: str) -> None:
        other = LocalPlatform(platform.home)
        for i in range(15):
            other.update_vm("work", features={f"{prefix}{i}": "1"})

    threads = [threading.Thread(target=writer, args=(p,)) for p in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(platform.vm_settings("work").features) == 45


def test_remove_vm(platform: LocalPlatform) -> None:
    make_world(platform)
    with pytest.raises(UsageError, match="used by work"):
        platform.remove_vm("debian")
    with pytest.raises(UsageError):
        platform.remove_vm("dom0")
    home = platform.vm_home("work")
    (home / "file").write_text("x")
    platform.remove_vm("work")
    assert [vm.name for vm in platform.list_vms()] == ["dom0", "debian"]
    assert not platform.pools.vm_dir("default", "work").exists() and not home.exists()
    with pytest.raises(NotFoundError):
        platform.vm_settings("work")
    with pytest.raises(NotFoundError):
        platform.remove_vm("work")
    platform.remove_vm("debian")
    assert [vm.name for vm in platform.list_vms()] == ["dom0"]


def volume_bytes(size: int) -> bytes:
    data = bytearray(os.urandom(size))
    end = min(size, 2 * MIB)
    data[MIB:end] = bytes(max(0, end - MIB))  # a zero run, which becomes a hole
    assert len(data) == size
    return bytes(data)


def test_import_writes_exactly_size_bytes(platform: LocalPlatform) -> None:
    make_world(platform)
    size = 3 * MIB + 123
    data = volume_bytes(size)
    platform.import_volume("debian", "root", size, io.BytesIO(data))
    (root,) = [v for v in platform.vm_volumes("debian") if v.name == "root"]
    assert root.size == size
    assert Path(root.path).read_bytes() == data
    platform.import_volume("debian", "root", 0, io.BytesIO(b""))
    assert Path(root.path).stat().st_size == 0


@pytest.mark.parametrize("delta", [-1, -MIB, 1, MIB])
def test_import_refuses_short_or_long_input_and_leaves_nothing(
    platform: LocalPlatform, delta: int
) -> None:
    make_world(platform)
    size = 2 * MIB
    before = volume_bytes(size)
    platform.import_volume("work", "private", size, io.BytesIO(before))
    data = volume_bytes(size + delta)
    with pytest.raises(IntegrityError, match=r"ended after|is longer than"):
        platform.import_volume("work", "private", size, io.BytesIO(data))
    vm_dir = platform.pools.vm_dir("default", "work")
    assert sorted(p.name for p in vm_dir.iterdir()) == ["private.img"]
    assert (vm_dir / "private.img").read_bytes() == before


def test_import_refuses_volumes_the_vm_does_not_own(platform: LocalPlatform) -> None:
    make_world(platform)
    with pytest.raises(NotFoundError):
        platform.import_volume("work", "root", 4, io.BytesIO(b"abcd"))
    with pytest.raises(NotFoundError):
        platform.import_volume("nobody", "private", 4, io.BytesIO(b"abcd"))
    assert not (platform.pools.vm_dir("default", "work") / "root.img").exists()


@pytest.mark.parametrize(
    "text, size",
    [("512", 512), ("64K", 64 << 10), ("64M", 64 * MIB), ("2G", 2 << 30), ("1GiB", 1 << 30),
     ("3MB", 3 * MIB), ("1t", 1 << 40)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "-1", "1X", "1.5G", "2 G B", "9999999P"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_cli_builds_and_lists_a_platform(qbhub: Qbhub) -> None:
    created = qbhub.json(
        "local", "vm-create", "debian-12", "--class", "TemplateVM", "--label", "black",
        "--size", "8M",
    )  # fmt: skip
    assert [(v["name"], v["size"]) for v in created["volumes"]] == [
        ("root", 8 * MIB),
        ("private", 8 * MIB),
    ]
    qbhub.run("local", "vm-create", "work", "--class", "AppVM", "--template", "debian-12",
              "--label", "blue", "--size", "4M", "--pool", "fast")  # fmt: skip
    qbhub.run("local", "vm-set", "work", "netvm", "")
    qbhub.run("local", "vm-set", "work", "memory", "600")
    qbhub.run("local", "feature-set", "work", "service.cups", "1")
    tagged = qbhub.json("local", "tag-add", "work", "audit")
    assert tagged["tags"] == ["audit"]
    listing = qbhub.json("local", "list")
    vms = {vm["name"]: vm for vm in listing["vms"]}
    assert list(vms) == ["dom0", "debian-12", "work"]
    assert vms["dom0"]["class"] == "AdminVM"
    work = vms["work"]
    assert work["properties"] == {
        "label": "blue",
        "template": "debian-12",
        "netvm": "",
        "memory": "600",
    }
    assert work["features"] == {"service.cups": "1"} and work["pool"] == "fast"
    assert [(v["name"], v["size"], v["pool"]) for v in work["volumes"]] == [
        ("private", 4 * MIB, "fast")
    ]
    assert Path(work["volumes"][0]["path"]).is_relative_to(qbhub.home / "local" / "pools" / "fast")
    human = qbhub.run("local", "list").stdout
    assert "work" in human and "memory=600" in human and "audit" in human
    removed = qbhub.json("local", "vm-remove", "work")
    assert removed == {"removed": "work", "volumes": ["private"]}
    assert [vm["name"] for vm in qbhub.json("local", "list")["vms"]] == ["dom0", "debian-12"]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["vm-create", "dom0", "--class", "AppVM", "--label", "red"], 2, "reserved"),
        (["vm-create", "x", "--class", "Foo", "--label", "red"], 2, "class"),
        (["vm-create", "x", "--class", "StandaloneVM", "--label", "red", "--size", "2Q"], 2,
         "size"),
        (["vm-create", "x", "--class", "AppVM", "--label", "red"], 2, "template"),
        (["vm-set", "nobody", "label", "red"], 7, "no VM"),
        (["vm-set", "base", "label", "pink"], 2, "label"),
        (["vm-set", "base", "frobnicate", "1"], 2, "unknown property"),
        (["feature-set", "base", "bad key", "1"], 2, "feature"),
        (["tag-add", "base", "bad tag"], 2, "tag"),
        (["vm-remove", "nobody"], 7, "no VM"),
        (["vm-remove", "dom0"], 2, "dom0"),
    ],
)  # fmt: skip
def test_cli_errors_are_one_line(qbhub: Qbhub, args: list[str], code: int, message: str) -> None:
    qbhub.run("local", "vm-create", "base", "--class", "StandaloneVM", "--label", "red",
              "--size", "1M")  # fmt: skip
    result = qbhub.run("local", *args, check=False)
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbhub: error:") and message in lines[0]
    assert [vm["name"] for vm in qbhub.json("local", "list")["vms"]] == ["dom0", "base"]


def test_resize_grows_and_shrinks_only_a_hole(tmp_path: Path) -> None:
    pools = Pools(tmp_path / "pools")
    pools.create_volumes("default", "vm1", {"private": 1 << 20})
    pools.resize_volume("default", "vm1", "private", 4 << 20)
    assert pools.volume_size("default", "vm1", "private") == 4 << 20
    pools.resize_volume("default", "vm1", "private", 2 << 20)  # all hole: nothing is lost
    assert pools.volume_size("default", "vm1", "private") == 2 << 20
    with open(pools.volume_path("default", "vm1", "private"), "r+b") as f:
        f.seek((2 << 20) - 4096)
        f.write(b"data" * 1024)
    with pytest.raises(UsageError, match="holds data"):
        pools.resize_volume("default", "vm1", "private", 1 << 20)
    assert pools.volume_size("default", "vm1", "private") == 2 << 20
