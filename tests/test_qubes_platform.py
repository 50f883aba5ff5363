"""QubesPlatform against a fake qubesd that speaks the real socket protocol (tests/fake_qubesd.py).

Qubes cannot run here; the fake answers from recorded-format responses, applies mutations, and
plays the ImportWithSize qrexec service so imports go through the same code path as in dom0.
"""

from __future__ import annotations

import io
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fake_qubesd

from qubes_backup_hub.errors import NotFoundError, QbhubError, UsageError
from qubes_backup_hub.jobs.replace_guard import bring_back, hold_vms
from qubes_backup_hub.platform.base import VMSettings
from qubes_backup_hub.platform.qubes.platform import QubesPlatform
from qubes_backup_hub.platform.qubes.wire import (
    QubesApiError,
    QubesdSocket,
    encode_request,
)

FAKE = str(Path(__file__).parent / "fake_qubesd.py")


@pytest.fixture
def qubesd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[fake_qubesd.FakeQubesd]:
    server = fake_qubesd.start(tmp_path)
    monkeypatch.setenv("FAKE_QUBESD_SOCKET", server.path)
    yield server
    server.close()


@pytest.fixture
def qp(qubesd: fake_qubesd.FakeQubesd, tmp_path: Path) -> QubesPlatform:
    client = tmp_path / "qrexec-client"
    client.write_text('#!/bin/sh\necho "args: $*"\ncat\n')
    client.chmod(client.stat().st_mode | stat.S_IXUSR)
    return QubesPlatform(
        qubesd.path,
        qrexec_client=str(client),
        import_service=(sys.executable, FAKE, "import-service"),
        import_sudo=False,
    )


def test_request_framing_is_qubes_41_header() -> None:
    assert encode_request("admin.vm.property.Get", "work", "label") == (
        b"admin.vm.property.Get+label dom0 name work\0"
    )
    assert encode_request("admin.vm.List", "dom0") == b"admin.vm.List+ dom0 name dom0\0"


def test_list_vms(qp: QubesPlatform, qubesd: fake_qubesd.FakeQubesd) -> None:
    vms = {v.name: v for v in qp.list_vms()}
    assert set(vms) == {
        "dom0",
        "fedora-40-xfce",
        "sys-net",
        "sys-firewall",
        "default-dvm",
        "work",
        "personal",
        "vault",
    }
    assert vms["fedora-40-xfce"].klass == "TemplateVM"
    assert vms["dom0"].klass == "AdminVM"
    assert vms["work"].state == "Running" and vms["vault"].state == "Halted"
    assert qubesd.requests[0][:3] == ("admin.vm.List", "dom0", "")


def test_settings_of_appvm(qp: QubesPlatform) -> None:
    s = qp.vm_settings("work")
    assert s.klass == "AppVM"
    assert s.properties["label"] == "blue"
    assert s.properties["template"] == "fedora-40-xfce"
    assert "netvm" not in s.properties  # follows default_netvm: not recorded (not pinned)
    assert s.properties["maxmem"] == 8000  # non-default int, typed
    assert "memory" not in s.properties  # default: left out
    assert "uuid" not in s.properties and "name" not in s.properties
    assert s.features == {"qrexec": "1", "gui": "1"}
    assert "work-stuff" in s.tags and "created-by-dom0" in s.tags
    assert s.devices == []  # the usb device is attached, not persistently assigned
    assert s.firewall[0] == "action=accept dsthost=qubes-os.org proto=tcp dstports=443-443"
    assert s.firewall[-1] == "action=drop"
    assert s.notes == ""  # Qubes 4.2: no notes API, qubesd drops the call


def test_settings_devices_netvm_and_dispvm_template(qp: QubesPlatform) -> None:
    net = qp.vm_settings("sys-net")
    assert {d["ident"] for d in net.devices} == {"00_14.3", "00_1f.6"}
    dev = next(d for d in net.devices if d["ident"] == "00_14.3")
    assert dev == {
        "class": "pci",
        "backend": "dom0",
        "ident": "00_14.3",
        "options": {"no-strict-reset": "True"},
        "required": True,
    }
    assert net.properties["provides_network"] is True
    assert qp.vm_settings("vault").properties["netvm"] == ""
    assert qp.vm_settings("default-dvm").properties["template_for_dispvms"] is True


def test_persistent_volumes_per_class_and_paths(qp: QubesPlatform) -> None:
    work = qp.vm_volumes("work")
    assert [v.name for v in work] == ["private"]
    assert work[0].path == "/dev/qubes_dom0/vm-work-private"
    assert work[0].pool == "vm-pool" and work[0].pool_driver == "lvm_thin"
    assert work[0].size == 2 * 1024**3
    tpl = qp.vm_volumes("fedora-40-xfce")
    assert [v.name for v in tpl] == ["root", "private"]
    assert tpl[0].path == "/dev/qubes_dom0/vm-fedora-40-xfce-root"
    personal = qp.vm_volumes("personal")
    assert [(v.name, v.path, v.pool_driver) for v in personal] == [
        ("private", "/var/lib/qubes/appvms/personal/private.img", "file-reflink")
    ]


def test_create_apply_import_and_remove(qp: QubesPlatform, qubesd: fake_qubesd.FakeQubesd) -> None:
    src = qp.vm_settings("work")
    settings = VMSettings(
        name="work-restored",
        klass="AppVM",
        properties=dict(src.properties),
        features={"qrexec": "1", "service.cups": "1"},
        tags=["work-stuff", "created-by-sys-evil"],
        firewall=src.firewall,
        devices=[
            {"class": "usb", "backend": "sys-usb", "ident": "2-1", "options": {}, "required": True}
        ],
    )
    qp.create_vm(settings, pool="varlibqubes")
    method, dest, arg, payload = qubesd.requests[-1]
    assert (method, dest, arg) == ("admin.vm.CreateInPool.AppVM", "dom0", "fedora-40-xfce")
    assert payload == b"name=work-restored label=blue pool=varlibqubes"
    assert qp.apply_settings(settings) == []
    vm = qubesd.vms["work-restored"]
    assert vm.props["maxmem"] == ("int", "8000")
    assert vm.features["service.cups"] == "1"
    assert "work-stuff" in vm.tags and "created-by-sys-evil" not in vm.tags
    assert vm.firewall == src.firewall
    assert vm.devices["usb"] == ["sys-usb+2-1 persistent=yes"]
    data = os.urandom(300_000)
    qp.import_volume("work-restored", "private", len(data), io.BytesIO(data))
    assert qubesd.imports[("work-restored", "private")] == data
    qp.remove_vm("work-restored")
    assert "work-restored" not in qubesd.vms


def test_apply_reports_failures(qp: QubesPlatform) -> None:
    qp.create_vm(VMSettings("scratch", "AppVM", {"label": "green", "template": "fedora-40-xfce"}))
    failed = qp.apply_settings(
        VMSettings("scratch", "AppVM", {"label": "chartreuse", "memory": 512})
    )
    assert len(failed) == 1 and "label" in failed[0] and "QubesLabelNotFoundError" in failed[0]


@pytest.mark.parametrize("delta", [-1, +1, -300_000])
def test_import_refuses_wrong_length(
    qp: QubesPlatform, qubesd: fake_qubesd.FakeQubesd, delta: int
) -> None:
    size = 300_000
    data = os.urandom(max(0, size + delta))
    with pytest.raises(QubesApiError, match="SizeMismatch"):
        qp.import_volume("vault", "private", size, io.BytesIO(data))
    assert ("vault", "private") not in qubesd.imports  # never committed
    assert not qubesd.pending  # the service ended the import itself: nothing left pending
    good = os.urandom(size)
    qp.import_volume("vault", "private", size, io.BytesIO(good))
    assert qubesd.imports[("vault", "private")] == good


def test_import_into_running_vm_reports_qubesd_error(qp: QubesPlatform) -> None:
    with pytest.raises(QubesApiError) as e:
        qp.import_volume("work", "private", 10, io.BytesIO(b"0123456789"))
    assert e.value.exc_type == "QubesVMNotHaltedError"


def test_errors_map_to_one_typed_error(qp: QubesPlatform) -> None:
    with pytest.raises(NotFoundError):
        qp.vm_volumes("nosuchvm")
    with pytest.raises(QubesApiError) as e:
        qp.api.feature_list("nosuchvm")
    assert e.value.exc_type == "QubesVMNotFoundError"
    assert str(e.value) == (
        "Qubes Admin API admin.vm.feature.List on nosuchvm: "
        "QubesVMNotFoundError: No such domain: 'nosuchvm'"
    )
    assert isinstance(e.value, QbhubError)
    with pytest.raises(QubesApiError, match="NoResponse"):
        qp.api.transport.call("admin.vm.NoSuchMethod", "work")
    with pytest.raises(QubesApiError, match="Connection"):
        QubesdSocket("/nonexistent/qubesd.sock").call("admin.vm.List", "dom0")


@pytest.mark.parametrize(
    "response",
    [
        b"0\0" + b"x class=AppVM state=Halted\n" * 1_200_000,  # > 16 MiB
        b"0\0work class=AppVM state=Halted",  # no final newline
        b"0\0../etc class=AppVM state=Halted\n",
        b"0\0a/b class=AppVM state=Halted\n",
        b"0\0work klass=AppVM\n",
        b"2\0QubesVMNotFoundError\0\0only three fields",
        b"2\0Bad Type!\0\0msg\0",
        b"7\0what",
        b"1\0event\0",
    ],
)
def test_hostile_responses_are_typed_errors(
    qp: QubesPlatform, qubesd: fake_qubesd.FakeQubesd, response: bytes
) -> None:
    qubesd.overrides[("admin.vm.List", "dom0")] = response
    with pytest.raises(QubesApiError):
        qp.list_vms()


def test_hostile_vid_and_property_lines(qp: QubesPlatform, qubesd: fake_qubesd.FakeQubesd) -> None:
    qubesd.vms["personal"].volumes["private"]["vid"] = "appvms/../../etc/shadow"
    with pytest.raises(QubesApiError, match="refused volume id"):
        qp.vm_volumes("personal")
    qubesd.vms["work"].volumes["private"]["vid"] = "other_vg/vm-work-private"
    with pytest.raises(QubesApiError, match="not in the pool's VG"):
        qp.vm_volumes("work")
    qubesd.overrides[("admin.vm.property.GetAll", "vault")] = (
        b"0\0netvm default=False type=vm ../sys-net\n"
    )
    with pytest.raises(QubesApiError, match="invalid VM name"):
        qp.vm_settings("vault")


def test_refuses_bad_names_before_sending(
    qp: QubesPlatform, qubesd: fake_qubesd.FakeQubesd
) -> None:
    before = len(qubesd.requests)
    with pytest.raises(QubesApiError, match="invalid destination"):
        qp.api.volume_list("a b\0c")
    with pytest.raises(UsageError):
        qp.call_service("sys-backup", "qbhub.Storage", ["../x"])
    assert len(qubesd.requests) == before


def test_call_service_uses_qrexec_client(qp: QubesPlatform, qubesd: fake_qubesd.FakeQubesd) -> None:
    proc = qp.call_service("vault", "qbhub.Storage", ["archive1"])
    proc.stdin.write(b"ping\n")
    proc.stdin.close()
    data = proc.stdout.read()
    assert proc.wait(10) == 0
    assert data == b"args: -d vault -w 60 DEFAULT:QUBESRPC qbhub.Storage+archive1 dom0\nping\n"
    assert qubesd.vms["vault"].state == "Running"  # started first


def test_dispvm_service_creates_and_kills(
    qp: QubesPlatform, qubesd: fake_qubesd.FakeQubesd
) -> None:
    proc = qp.dispvm_service("qbhub.RestoreWorker")
    name = next(n for n in qubesd.vms if n.startswith("disp"))
    assert qubesd.vms[name].state == "Running"
    # the worker parses hostile data: its network is cut before it starts
    sets = [r for r in qubesd.requests if r[0] == "admin.vm.property.Set" and r[1] == name]
    assert sets and sets[0][2] == "netvm" and qubesd.vms[name].props["netvm"][1] == ""
    starts = [i for i, r in enumerate(qubesd.requests) if r[0] == "admin.vm.Start"]
    assert qubesd.requests.index(sets[0]) < starts[-1]
    proc.stdin.close()
    assert proc.stdout.read().startswith(f"args: -d {name} -w 60 DEFAULT:QUBESRPC".encode())
    assert proc.wait(10) == 0
    assert name not in qubesd.vms  # killed, auto-cleaned


def test_replaced_vm_is_held_and_brought_back_through_clone_tokens(
    qp: QubesPlatform, qubesd: fake_qubesd.FakeQubesd
) -> None:
    """replace_guard on the Admin API: CloneFrom/CloneTo into a holder, then back again."""
    data = os.urandom(200_000)
    qp.import_volume("vault", "private", len(data), io.BytesIO(data))
    before = qp.vm_settings("vault")
    (held,) = hold_vms(qp, ["vault"])
    assert held.holder == "qbk-vault" and held.volumes == ("private",)
    assert qubesd.vms["qbk-vault"].klass == "StandaloneVM"
    clone_calls = [r for r in qubesd.requests if r[0].startswith("admin.vm.volume.Clone")]
    (frm, to) = clone_calls
    assert frm[:3] == ("admin.vm.volume.CloneFrom", "vault", "private")
    assert to[:3] == ("admin.vm.volume.CloneTo", "qbk-vault", "private")
    assert qubesd.imports[("qbk-vault", "private")] == data
    with pytest.raises(QubesApiError):  # a token works once
        qp.api._call("admin.vm.volume.CloneTo", "qbk-vault", "private", to[3])
    qp.remove_vm("vault")
    assert bring_back(qp, [held]) == []
    assert "qbk-vault" not in qubesd.vms
    assert qubesd.imports[("vault", "private")] == data
    assert qp.vm_settings("vault") == before


def test_resize_grows_and_never_shrinks(qp: QubesPlatform, qubesd: fake_qubesd.FakeQubesd) -> None:
    size = int(qubesd.vms["vault"].volumes["private"]["size"])
    qp.resize_volume("vault", "private", size + (1 << 30))
    assert qubesd.requests[-1][:4] == (
        "admin.vm.volume.Resize", "vault", "private", str(size + (1 << 30)).encode()
    )  # fmt: skip
    assert int(qubesd.vms["vault"].volumes["private"]["size"]) == size + (1 << 30)
    calls = len(qubesd.requests)
    with pytest.raises(UsageError, match="shrinking"):
        qp.resize_volume("vault", "private", size)
    assert not any(r[0] == "admin.vm.volume.Resize" for r in qubesd.requests[calls:])
