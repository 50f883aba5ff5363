"""QubesPlatform and the qbhub CLI against the REAL qubesd of Qubes 4.2 and 4.3.

The server is qubes-core-admin's own Admin API code, served by ../shared/qubes-reference/
serve-qubesd (one per version, started once per test session; see tests/real_qubesd.py for what
is real and what is not), and volume imports go through the real admin.vm.volume.ImportWithSize
script. FAKE here, because Xen and qrexec cannot run: libvirt (inside serve-qubesd: VMs read as
halted); admin.vm.Start (it needs Xen and qmemman: a proxy answers it, real_qubesd.StartProxy,
and passes every other call through); and the qrexec client, a stand-in that runs the VM's qbhub
service as a local process (real_qubesd.QREXEC_STANDIN). Every test skips, saying why, where
the servers cannot run.
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import real_qubesd
from conftest import PASSPHRASE, Qbhub

from qubes_backup_hub.platform.base import VMSettings
from qubes_backup_hub.platform.qubes.adminapi import Assignment
from qubes_backup_hub.platform.qubes.platform import QubesPlatform
from qubes_backup_hub.platform.qubes.wire import QubesApiError

MIB = 1 << 20


def _server(version: str) -> Iterator[real_qubesd.RealQubesd]:
    why = real_qubesd.missing(version)
    if why:
        pytest.skip(f"real qubesd {version} unavailable: {why}")
    server = real_qubesd.start(version)
    server.proxy = real_qubesd.StartProxy(server)
    try:
        yield server
    finally:
        server.proxy.close()
        real_qubesd.cleanup(server)


@pytest.fixture(scope="session", params=real_qubesd.VERSIONS, ids=lambda v: f"qubes{v}")
def qubesd(request: pytest.FixtureRequest) -> Iterator[real_qubesd.RealQubesd]:
    """A seeded real qubesd of each version, for the whole session."""
    yield from _server(request.param)


@dataclass
class World:
    """A seeded server with small volumes of known content, a backup VM, and a qbhub CLI."""

    server: real_qubesd.RealQubesd
    qp: QubesPlatform
    q: Qbhub
    qrexec_log: Path
    vms_dir: Path
    data: dict[str, bytes]

    def archive_dir(self) -> Path:
        return self.vms_dir / "sys-backup" / "qbhub-archives" / "main"


def platform_for(server: real_qubesd.RealQubesd, client: Path) -> QubesPlatform:
    return QubesPlatform(
        server.admin_socket, qrexec_client=str(client), import_service=(server.import_service,)
    )


def cli_env(server: real_qubesd.RealQubesd, client: Path) -> dict[str, str]:
    """The CLI's settings that point it at this server (the same CLI as in dom0)."""
    return {
        "QBHUB_PLATFORM": "qubes",
        "QBHUB_QUBESD_SOCKET": server.admin_socket,
        "QBHUB_QREXEC_CLIENT": str(client),
        "QBHUB_QUBES_IMPORT_SERVICE": server.import_service,
    }


def seeded_volumes(qp: QubesPlatform, seed: int, sizes: dict[str, int]) -> dict[str, bytes]:
    """Import random data of the given sizes into VM:VOLUME (the real ImportWithSize; it
    also shrinks the 2 GiB seeded volumes, so backups and restores stay quick)."""
    out = {}
    rng = __import__("random").Random(seed)
    for key, size in sizes.items():
        vm, volume = key.split(":")
        data = rng.randbytes(size)
        qp.import_volume(vm, volume, size, io.BytesIO(data))
        out[key] = data
    return out


VOLUME_SIZES = {
    "fedora-40-xfce:root": 3 * MIB,
    "fedora-40-xfce:private": 1 * MIB,
    "sys-net:private": 1 * MIB,
    "sys-firewall:private": 1 * MIB,
    "default-dvm:private": 1 * MIB,
    "work:private": 4 * MIB,
    "personal:private": 2 * MIB,
    "vault:private": 2 * MIB,
}


@pytest.fixture(scope="session")
def world(qubesd: real_qubesd.RealQubesd, tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp(f"world{qubesd.version}")
    client, log = real_qubesd.write_qrexec_standin(base / "qrexec")
    qp = platform_for(qubesd, client)
    data = seeded_volumes(qp, 7, VOLUME_SIZES)
    # The backup VM: not in `backup --all` (include_in_backups off, as qvm-backup honours it).
    qp.api.vm_create("AppVM", "sys-backup", "gray", "fedora-40-xfce")
    qp.api.property_set("sys-backup", "include_in_backups", "False")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBHUB_")}
    env.update({"QBHUB_HOME": str(base / "home"), "QBHUB_PASSPHRASE": PASSPHRASE})
    env.update(cli_env(qubesd, client))
    return World(qubesd, qp, Qbhub(base / "home", env), log, base / "qrexec" / "vms", data)


def volume_file(server: real_qubesd.RealQubesd, qp: QubesPlatform, vm: str, volume: str) -> Path:
    (info,) = [v for v in qp.vm_volumes(vm) if v.name == volume]
    return Path(info.path)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- reading: version, device classes, settings of every class ------------------------------


def test_version_and_device_classes_come_from_the_server(world: World) -> None:
    qp = world.qp
    assert qp.api_version == world.server.version
    # Only what is installed: no USB proxy, no microphone extension on this dom0.
    assert qp.device_classes == ["block", "pci"]
    assert world.server.startup_seconds < 30


def test_settings_of_an_appvm(world: World) -> None:
    s = world.qp.vm_settings("work")
    assert s.klass == "AppVM"
    assert s.properties["label"] == "blue" and s.properties["template"] == "fedora-40-xfce"
    assert s.properties["maxmem"] == 8000
    # netvm follows default_netvm here: recording it would pin it on restore.
    assert "netvm" not in s.properties
    assert "memory" not in s.properties and "ip" not in s.properties
    assert s.features == {"qrexec": "1", "gui": "1"}
    assert "work-stuff" in s.tags
    assert s.firewall == [
        "action=accept dsthost=qubes-os.org proto=tcp dstports=443-443",
        "action=accept specialtarget=dns",
        "action=drop",
    ]
    assert s.devices == [] and s.notes == ""
    vault = world.qp.vm_settings("vault")
    assert vault.properties["netvm"] == ""  # set to none explicitly: recorded
    assert vault.features["service.crond"] == ""


def test_devices_of_a_netvm_in_either_api(world: World) -> None:
    net = world.qp.vm_settings("sys-net")
    in_43 = {"device_id": "*", "mode": "required"} if world.server.version != "4.2" else {}
    assert net.devices == [
        {"class": "pci", "backend": "dom0", "ident": "00_14.3",
         "options": {"no-strict-reset": "True"}, "required": True, **in_43},
        {"class": "pci", "backend": "dom0", "ident": "00_1f.6", "options": {}, "required": True,
         **in_43},
    ]  # fmt: skip
    assert net.properties["provides_network"] is True and net.properties["memory"] == 425


def test_settings_of_template_dvm_template_standalone_and_named_dispvm(world: World) -> None:
    qp = world.qp
    tpl = qp.vm_settings("fedora-40-xfce")
    assert tpl.klass == "TemplateVM" and tpl.properties["label"] == "black"
    assert [v.name for v in qp.vm_volumes("fedora-40-xfce")] == ["root", "private"]
    assert qp.vm_settings("default-dvm").properties["template_for_dispvms"] is True
    if "standalone" not in {v.name for v in qp.list_vms()}:
        qp.create_vm(VMSettings("standalone", "StandaloneVM", {"label": "purple"}))
        qp.create_vm(VMSettings("named-disp", "DispVM", {"label": "red"}))
    assert qp.vm_settings("standalone").klass == "StandaloneVM"
    assert [v.name for v in qp.vm_volumes("standalone")] == ["root", "private"]
    disp = qp.vm_settings("named-disp")
    assert disp.klass == "DispVM" and disp.properties["template"] == "default-dvm"
    assert qp.vm_volumes("named-disp") == []  # a DispVM's private is not kept


def test_recorded_properties_like_qvm_backup(world: World) -> None:
    """Non-default properties are recorded, ip/ip6/mac/stubdom_mem/keyboard_layout included,
    and 4.3's bootmode and devices_denied; what follows a default is not."""
    qp = world.qp
    if "props" not in {v.name for v in qp.list_vms()}:
        qp.create_vm(VMSettings("props", "AppVM", {"label": "green"}))
        for name, value in (
            ("ip", "10.137.0.99"),
            ("mac", "00:16:3e:5e:6c:99"),
            ("keyboard_layout", "de++"),
            ("virt_mode", "hvm"),
            ("stubdom_mem", "123"),
            ("ip6", "fd09:24ef:4179::a89:63"),
        ):
            qp.api.property_set("props", name, value)
        if world.server.version != "4.2":
            qp.api.property_set("props", "devices_denied", "p0201**")
            qp.api.feature_set("props", "boot-mode.kernelopts.quiet", "quiet")
            qp.api.property_set("props", "bootmode", "quiet")
    props = qp.vm_settings("props").properties
    assert props["ip"] == "10.137.0.99" and props["mac"] == "00:16:3e:5e:6c:99"
    assert props["keyboard_layout"] == "de++" and props["stubdom_mem"] == 123
    assert props["ip6"] == "fd09:24ef:4179::a89:63"
    if world.server.version != "4.2":
        assert props["devices_denied"] == "p0201**" and props["bootmode"] == "quiet"
    for runtime in ("qid", "uuid", "xid", "visible_ip", "dns", "icon", "netvm", "start_time"):
        assert runtime not in props


# -- the import: the real ImportWithSize script ---------------------------------------------


@pytest.mark.parametrize("delta", [-1, +1, -(1 * MIB)])
def test_refused_import_leaves_nothing_pending(world: World, delta: int) -> None:
    """A short or long import is refused by the script itself (qubesd discards it); the volume
    keeps its content and the next import of it works (nothing left pending in qubesd)."""
    qp, size = world.qp, 1 * MIB
    path = volume_file(world.server, qp, "vault", "private")
    before = path.read_bytes()
    with pytest.raises(QubesApiError, match="SizeMismatch") as e:
        qp.import_volume("vault", "private", size, io.BytesIO(os.urandom(size + delta)))
    assert "discarded" in str(e.value)
    assert path.read_bytes() == before
    again = os.urandom(size)
    qp.import_volume("vault", "private", size, io.BytesIO(again))
    assert path.read_bytes() == again
    qp.import_volume("vault", "private", len(before), io.BytesIO(before))  # as the world had it


def test_failing_reader_aborts_the_import_cleanly(world: World) -> None:
    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self.sent = 0

        def read(self, n: int = -1) -> bytes:
            if self.sent > 300_000:
                raise OSError("the restore worker went away")
            self.sent += 100_000
            return b"x" * 100_000

    qp = world.qp
    path = volume_file(world.server, qp, "vault", "private")
    before = path.read_bytes()
    with pytest.raises(OSError, match="went away"):
        qp.import_volume("vault", "private", 1 * MIB, Broken())  # type: ignore[arg-type]
    assert path.read_bytes() == before
    qp.import_volume("vault", "private", len(before), io.BytesIO(before))
    assert path.read_bytes() == before


def test_seeded_volumes_read_back(world: World) -> None:
    for key, data in world.data.items():
        vm, volume = key.split(":")
        if key == "vault:private":
            continue  # the import tests rewrite it
        assert volume_file(world.server, world.qp, vm, volume).read_bytes() == data, key


def test_services_get_qrexec_timeout(world: World) -> None:
    """call_service/dispvm_service pass `-w qrexec_timeout` as qubesadmin does; the DispVM is
    created from default_dispvm with its network cut, and removed when the service ends."""
    qp = world.qp
    qp.api.property_set("sys-backup", "qrexec_timeout", "77")
    proc = qp.call_service("sys-backup", "qbhub.Storage", ["probe"])
    proc.stdin.close()
    proc.wait(30)
    calls = world.qrexec_log.read_text().splitlines()
    assert calls[-1] == repr(
        ["-d", "sys-backup", "-w", "77", "DEFAULT:QUBESRPC qbhub.Storage+probe dom0"]
    )
    before = {v.name for v in qp.list_vms()}
    proc = qp.dispvm_service("qbhub.RestoreWorker")
    disp = ({v.name for v in qp.list_vms()} - before).pop()
    assert qp.api.property_get(disp, "netvm").value == ""
    proc.stdin.close()
    proc.wait(30)
    last = ast.literal_eval(world.qrexec_log.read_text().splitlines()[-1])
    assert last[:3] == ["-d", disp, "-w"] and last[4].startswith("DEFAULT:QUBESRPC qbhub.Rest")
    assert disp not in {v.name for v in qp.list_vms()}


def test_startup_time(qubesd: real_qubesd.RealQubesd) -> None:
    print(f"serve-qubesd {qubesd.version} started in {qubesd.startup_seconds:.2f}s")
    assert qubesd.startup_seconds > 0


# -- the CLI: backup --all, incremental, restores ---------------------------------------------


@pytest.fixture(scope="session")
def backed_up(world: World) -> dict[str, Any]:
    """`qbhub init` and `backup --all` to the backup VM, then an incremental after a change."""
    q = world.q
    q.run("init", "--dest", "qubes://sys-backup/main")
    first = q.json("backup", "--all", "--dest", "qubes://sys-backup/main")
    work_first = world.data["work:private"]
    changed = bytearray(work_first)
    changed[100_000:100_010] = b"0123456789"
    world.qp.import_volume("work", "private", len(changed), io.BytesIO(bytes(changed)))
    world.data["work:private"] = bytes(changed)
    second = q.json("backup", "work", "vault", "--dest", "qubes://sys-backup/main")
    return {"first": first, "second": second, "work_first": work_first}


def test_backup_all_and_incremental(world: World, backed_up: dict[str, Any]) -> None:
    first, second = backed_up["first"], backed_up["second"]
    assert "sys-backup" not in first["vms"]  # include_in_backups is off
    assert {"fedora-40-xfce", "sys-net", "sys-firewall", "default-dvm", "work", "personal",
            "vault"} <= set(first["vms"])  # fmt: skip
    assert "named-disp" not in first["vms"]  # DispVMs only when named
    assert second["vms"] == ["work", "vault"]
    calls = world.qrexec_log.read_text()
    assert "qbhub.Storage+main dom0" in calls and "'-w'" in calls


def restore(world: World, *args: str, check: bool = True) -> Any:
    return world.q.run("restore", *args, "--dest", "qubes://sys-backup/main", "--json",
                       check=check)  # fmt: skip


def test_restore_renamed_into_another_pool(world: World, backed_up: dict[str, Any]) -> None:
    r = restore(world, "work", "--rename", "work:work-copy", "--pool", "personal-pool").json
    assert r["vms"] == ["work-copy"]
    qp = world.qp
    s = qp.vm_settings("work-copy")
    assert s.properties["maxmem"] == 8000 and "netvm" not in s.properties  # still follows
    assert qp.api.property_get("work-copy", "netvm").is_default
    assert s.firewall == qp.vm_settings("work").firewall and "work-stuff" in s.tags
    (vol,) = qp.vm_volumes("work-copy")
    assert vol.pool == "personal-pool"
    assert Path(vol.path).read_bytes() == world.data["work:private"]
    qp.remove_vm("work-copy")


def test_restore_settings_only_then_data_only(world: World, backed_up: dict[str, Any]) -> None:
    qp = world.qp
    restore(world, "vault", "--rename", "vault:vault2", "--settings-only")
    assert qp.vm_settings("vault2").properties["netvm"] == ""
    (vol,) = qp.vm_volumes("vault2")
    assert vol.size >= len(world.data["vault:private"])
    # --data-only restores into the existing VM; the old name must be renamed again
    restore(world, "vault", "--rename", "vault:vault2", "--data-only")
    (vol,) = qp.vm_volumes("vault2")
    assert sha(Path(vol.path).read_bytes()) == sha(world.data["vault:private"])
    qp.remove_vm("vault2")


def test_restore_replace(world: World, backed_up: dict[str, Any]) -> None:
    qp = world.qp
    path = volume_file(world.server, qp, "personal", "private")
    qp.import_volume("personal", "private", 4096, io.BytesIO(b"z" * 4096))
    first = backed_up["first"]["session"]  # personal is not in the incremental session
    r = restore(world, "personal", "--replace", "--session", first).json
    assert r["vms"] == ["personal"]
    path = volume_file(world.server, qp, "personal", "private")
    assert path.read_bytes() == world.data["personal:private"]
    assert "qbk-personal" not in {v.name for v in qp.list_vms()}


def test_missing_template_falls_back_to_the_default(
    world: World, backed_up: dict[str, Any]
) -> None:
    """qvm-backup-restore's rule: a missing template becomes the default template (for a DispVM
    the default DispVM template), with a notice; named DispVMs are created with Create.DispVM."""
    qp, q = world.qp, world.q
    qp.create_vm(VMSettings("tpl2", "TemplateVM", {"label": "black"}))
    qp.create_vm(VMSettings("app2", "AppVM", {"label": "green", "template": "tpl2"}))
    qp.create_vm(VMSettings("dvm2", "AppVM", {"label": "red", "template": "tpl2"}))
    qp.api.property_set("dvm2", "template_for_dispvms", "True")
    qp.create_vm(VMSettings("disp2", "DispVM", {"label": "red", "template": "dvm2"}))
    q.run("backup", "app2", "disp2", "--dest", "qubes://sys-backup/main")
    for vm in ("disp2", "app2", "dvm2", "tpl2"):
        qp.remove_vm(vm)
    r = restore(world, "app2", "disp2")
    assert "template tpl2 does not exist" in r.stderr or "tpl2" in r.stderr, r.stderr
    assert qp.vm_settings("app2").properties["template"] == "fedora-40-xfce"
    disp = qp.vm_settings("disp2")
    assert disp.klass == "DispVM" and disp.properties["template"] == "default-dvm"
    qp.remove_vm("disp2")
    qp.remove_vm("app2")


@pytest.fixture(scope="session")
def empty(
    qubesd: real_qubesd.RealQubesd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[real_qubesd.RealQubesd]:
    """A second real qubesd of the same version, as freshly installed: dom0, one template and
    its DispVM template (the restore worker's), none of them in the archive."""
    server = real_qubesd.start(qubesd.version, seed=False)
    server.proxy = real_qubesd.StartProxy(server)
    qp = QubesPlatform(server.admin_socket)
    qp.create_vm(VMSettings("debian-12-xfce", "TemplateVM", {"label": "black"}))
    qp.create_vm(
        VMSettings("debian-12-dvm", "AppVM", {"label": "red", "template": "debian-12-xfce"})
    )
    qp.api.property_set("debian-12-dvm", "template_for_dispvms", "True")
    qp.api._call("admin.property.Set", "dom0", "default_dispvm", b"debian-12-dvm")
    qp.api._call("admin.property.Set", "dom0", "default_template", b"debian-12-xfce")
    try:
        yield server
    finally:
        server.proxy.close()
        real_qubesd.cleanup(server)


def test_restore_all_onto_an_empty_system(
    world: World, backed_up: dict[str, Any], empty: real_qubesd.RealQubesd
) -> None:
    """The archive read as a directory (the backup VM's disk, carried over), every VM of the
    newest session restored onto a dom0 with no other VM."""
    client, _ = real_qubesd.write_qrexec_standin(empty.root / "qrexec")
    env = cli_env(empty, client)
    q = Qbhub(world.q.home.parent / "home-empty", {**world.q.env, **env,
              "QBHUB_HOME": str(world.q.home.parent / "home-empty")})  # fmt: skip
    first = backed_up["first"]["session"]
    r = q.run("restore", "--all", "--session", first, "--dest", str(world.archive_dir()), "--json")
    qp = platform_for(empty, client)
    names = {v.name for v in qp.list_vms()}
    assert {"fedora-40-xfce", "sys-net", "work", "vault"} <= names, r.stderr
    for key in ("work:private", "vault:private", "fedora-40-xfce:root"):
        vm, volume = key.split(":")
        want = backed_up["work_first"] if key == "work:private" else world.data[key]
        assert volume_file(empty, qp, vm, volume).read_bytes() == want, key
    assert qp.vm_settings("work").properties["template"] == "fedora-40-xfce"


def test_device_assignments_are_written_in_the_servers_api(world: World) -> None:
    """4.3: admin.vm.device.pci.Assign with the serialised assignment, read back through
    .Assigned. 4.2: .Attach with persistent=True reaches qubesd, which checks that the PCI device
    exists; there is no PCI hardware here, so its refusal is what the real 4.2 says."""
    qp = world.qp
    qp.create_vm(VMSettings("devs", "AppVM", {"label": "red"}))
    pci = {"class": "pci", "backend": "dom0", "ident": "00_14.3",
           "options": {"no-strict-reset": "True"}, "required": True}  # fmt: skip
    usb = {"class": "usb", "backend": "sys-net", "ident": "2-1", "options": {}, "required": True}
    failed = qp.apply_settings(VMSettings("devs", "AppVM", {"label": "red"}, devices=[pci, usb]))
    assert "device usb:sys-net+2-1: this dom0 has no usb device class" in failed
    if world.server.version == "4.2":
        assert any("Invalid PCI device: 00_14.3" in f for f in failed), failed
    else:
        assert len(failed) == 1
        assert qp.vm_settings("devs").devices == [{**pci, "device_id": "*", "mode": "required"}]
    qp.remove_vm("devs")


# Qubes 4.3 assignments: a named device on a port, a named device on any port ("*"), any device
# on a port, in each mode 4.3 can assign; the unknown interface "?******" goes as "_______".
ASSIGNMENTS_43 = [
    Assignment("block", "sys-net", "sda", {"read-only": "yes"}, True,
               "0x1234:0x5678::b000000", "auto-attach"),
    Assignment("block", "sys-net", "*", {}, True, "Disk_S3Z9NB0K123456", "ask-to-attach"),
    Assignment("block", "sys-net", "sdb", {}, True, "*", "auto-attach"),
    Assignment("pci", "dom0", "00_1f.6", {}, True, "0x8086:0x15bb::?******", "required"),
]  # fmt: skip


def test_43_device_ids_and_modes_survive_backup_and_restore(
    world: World, backed_up: dict[str, Any]
) -> None:
    """Backup records each 4.3 assignment's device_id and mode; restore re-assigns them with
    admin.vm.device.CLASS.Assign, read back through .Assigned exactly as they were."""
    if world.server.version == "4.2":
        pytest.skip("Qubes 4.2 assignments have no device_id or mode")
    qp = world.qp
    qp.create_vm(VMSettings("devvm", "AppVM", {"label": "orange"}))
    qp.import_volume("devvm", "private", 65536, io.BytesIO(b"d" * 65536))
    for a in ASSIGNMENTS_43:
        qp.api.device_assign("devvm", a)
    recorded = qp.vm_settings("devvm").devices
    assert {(d["ident"], d["device_id"], d["mode"]) for d in recorded} == {
        (a.ident, a.device_id, a.mode) for a in ASSIGNMENTS_43
    }
    world.q.run("backup", "devvm", "--dest", "qubes://sys-backup/main")
    r = restore(world, "devvm", "--rename", "devvm:devvm2", "--allow", "pci-devices")
    assert "block device sys-net:* (device Disk_S3Z9NB0K123456, ask-to-attach)" in r.stderr
    assert qp.vm_settings("devvm2").devices == recorded
    qp.remove_vm("devvm2")
    qp.remove_vm("devvm")


def test_43_records_restored_on_42(world: World) -> None:
    """A 4.3 archive restored on 4.2: an assignment is attached persistently by its port; one
    that asks before attaching, or names a device on any port, is reported, not attached
    (4.2 would attach it without asking, or cannot). Each gets `read-only`: 4.2's block
    extension reads the device's own mode otherwise, and for a device it does not see (its
    backend is not running) fails with an AttributeError, which qubesd answers with nothing."""
    if world.server.version != "4.2":
        pytest.skip("about Qubes 4.2")
    qp = world.qp
    records = [
        {"class": a.devclass, "backend": a.backend, "ident": a.ident,
         "options": {"read-only": "yes"}, "required": a.mode == "required",
         "device_id": a.device_id, "mode": a.mode}
        for a in ASSIGNMENTS_43 if a.devclass == "block"
    ]  # fmt: skip
    qp.create_vm(VMSettings("devs42", "AppVM", {"label": "red"}))
    failed = qp.apply_settings(VMSettings("devs42", "AppVM", {"label": "red"}, devices=records))
    assert failed == [
        "device block:sys-net+*: Qubes 4.2 cannot ask before attaching (ask-to-attach); "
        "not assigned"
    ]
    assert [d["ident"] for d in qp.vm_settings("devs42").devices] == ["sda", "sdb"]
    qp.remove_vm("devs42")
