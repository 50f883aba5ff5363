"""The fake qubesd, call by call against the REAL qubesd of Qubes 4.2 and 4.3.

The same qbhub run (`init`, `backup` of one VM, `restore` of it under another name, through the
CLI) is driven once against tests/fake_qubesd.py and once against the real server
(tests/real_qubesd.py: qubes-core-admin's own handlers). A recording proxy in front of each
server keeps every Admin API call qbhub makes (method, destination, argument, payload) and the
answer. The test asserts that both runs make the same calls and that the fake answers each the
way the real server does: the same success or failure class (an answer, which exception type, or
no answer at all) and the same shape of answer (the lines, names, keys and property types, with
values that differ by nature, such as UUIDs, qids, sizes, DispVM numbers and volume paths,
normalized). The real server is the reference; where they disagree, the fake is wrong.

STAND-INS on both sides alike, because Xen and qrexec cannot run here: admin.vm.Start is
answered by the recording proxy (success when the VM exists, as real_qubesd.StartProxy does; on
the real server a start needs Xen and qmemman), so no VM runs on either side and the fake's VMs
start halted, as every VM reads on the real server (libvirt is mocked there); the qrexec client
is real_qubesd's stand-in, running the storage agent and the restore worker as local processes.
The fake's seed is brought to the real seed's state (`like_the_real_seed`; its device classes
to what the real server has installed: no USB proxy, no microphone extension): state, not
formats. The fake reads volume data from files in a temporary pool directory (its own lvm_thin
paths do not exist here).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fake_qubesd
import real_qubesd
from conftest import PASSPHRASE, Qbhub

from qubes_backup_hub.platform.base import VMSettings
from qubes_backup_hub.platform.qubes.adminapi import Assignment
from qubes_backup_hub.platform.qubes.platform import QubesPlatform

DATA = bytes(range(256)) * 256  # the backed-up VM's private volume (64 KiB)
VM = "personal"
COPY = "personal2"


@dataclass(frozen=True)
class Call:
    """One Admin API request and its raw answer (b"" when the connection closed unanswered)."""

    method: str
    dest: str
    arg: str
    payload: bytes
    answer: bytes


class Recorder(real_qubesd.UnixProxy):
    """A unix socket in front of a qubesd that forwards each request unchanged and records it
    with the answer. admin.vm.Start is answered here (STAND-IN, see the module docstring)."""

    def __init__(self, upstream: str, path: str) -> None:
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        super().__init__(upstream, path)

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            request = b"".join(iter(lambda: conn.recv(65536), b""))
            header, _, payload = request.partition(b"\0")
            call, _, _, dest = header.decode("ascii").split(" ", 3)
            method, _, arg = call.partition("+")
            if method == "admin.vm.Start" and self._exists(dest):
                answer = b"0\0"
            else:
                answer = self.forward(request)
            with self.lock:
                self.calls.append(Call(method, dest, arg, payload, answer))
            conn.sendall(answer)

    def _exists(self, vm: str) -> bool:
        listing = self.forward(b"admin.vm.List+ dom0 name dom0\0")
        return any(line.split(" ")[0] == vm for line in listing[2:].decode().splitlines())


# -- normalizing answers to their shape ----------------------------------------------------

DISPVM = re.compile(r"\bdisp[0-9]+\b")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Properties whose values differ between two systems by nature (identity, runtime, host).
VARYING_PROPERTIES = {"qid", "uuid", "xid", "stubdom_xid", "start_time", "kernel", "ip", "ip6",
                      "mac", "visible_ip", "visible_ip6", "visible_gateway", "visible_gateway6",
                      "gateway", "gateway6", "dns", "icon", "memory", "maxmem",
                      "backup_timestamp", "dispid"}  # fmt: skip
VARYING_KEYS = {"vid", "size", "usage", "path", "pool", "dir_path", "revisions_to_keep",
                "usage_details", "source", "driver", "ephemeral_volatile", "setup_check",
                "thin_pool", "volume_group"}  # fmt: skip


def names_of(text: str) -> str:
    return DISPVM.sub("dispN", UUID.sub("UUID", text))


def error_class(answer: bytes) -> str:
    """ "ok", "no answer", or the exception type qubesd sent."""
    if not answer:
        return "no answer"
    if answer.startswith(b"0\0"):
        return "ok"
    if answer.startswith(b"2\0"):
        return answer.split(b"\0")[1].decode()
    return f"unframed {answer[:20]!r}"


def shape(call: Call) -> object:
    """What of a successful answer must agree: per method, its structure with values that
    differ by nature normalized."""
    text = names_of(call.answer[2:].decode("utf-8", "replace"))
    lines = text.splitlines()
    if call.method == "admin.vm.property.GetAll":
        return property_shape(lines)
    if call.method == "admin.vm.property.Get":
        default, ptype, value = text.split(" ", 2)
        return default, ptype, "V" if call.arg in VARYING_PROPERTIES else value
    if call.method in ("admin.vm.volume.Info", "admin.pool.Info"):
        pairs = dict(line.partition("=")[::2] for line in lines)
        return {k: ("V" if k in VARYING_KEYS else v) for k, v in pairs.items()}
    if call.method == "admin.vm.volume.CloneFrom":
        return "token" if text else ""
    if call.method == "admin.pool.List":
        return len(lines)
    if call.method == "admin.vm.List":
        return sorted(re.sub(r" uuid=\S+", " uuid=U", line) for line in lines)
    return sorted(lines) if call.method.endswith(("List", "Assigned")) else text


def property_shape(lines: list[str]) -> dict[str, object]:
    """GetAll: every property's type and whether it is at its default, and the values of those
    that are set (those qbhub records), but for values that differ by nature."""
    out: dict[str, object] = {}
    for line in lines:
        name, default, ptype, value = [*line.split(" ", 3), ""][:4]
        shown = value if default == "default=False" and name not in VARYING_PROPERTIES else "V"
        out[name] = (default, ptype, shown)
    return out


def request_of(call: Call) -> tuple[str, str, str, str]:
    payload = call.payload.decode("utf-8", "replace")
    if call.method == "admin.vm.volume.CloneTo":
        payload = "token"
    if call.method.startswith("admin.vm.CreateInPool."):
        payload = re.sub(r" pool=\S+", " pool=P", payload)
    return call.method, names_of(call.dest), names_of(call.arg), names_of(payload)


def shape_difference(fake: object, real: object) -> str:
    """The part of two answer shapes that differs, readably."""
    if isinstance(fake, dict) and isinstance(real, dict):
        keys = sorted(set(fake) | set(real))
        diff = {k: (fake.get(k, "-"), real.get(k, "-")) for k in keys if fake.get(k) != real.get(k)}
        return f"(fake, real) differ at {diff}"
    if isinstance(fake, list) and isinstance(real, list):
        only_fake, only_real = sorted(set(fake) - set(real)), sorted(set(real) - set(fake))
        return f"only the fake has {only_fake}, only the real {only_real}"
    return f"fake {fake!r}, real {real!r}"


def differences(fake: list[Call], real: list[Call]) -> list[str]:
    """Where the fake's run departs from the real one, call by call (empty if nowhere)."""
    out = []
    for i, (f, r) in enumerate(zip(fake, real, strict=False)):
        if request_of(f) != request_of(r):
            out.append(f"#{i}: qbhub asked the fake {request_of(f)} but the real {request_of(r)}")
            break  # the runs went apart: what follows is not comparable
        where = f"#{i} {f.method}+{f.arg} on {f.dest}"
        if error_class(f.answer) != error_class(r.answer):
            out.append(f"{where}: fake {error_class(f.answer)}, real {error_class(r.answer)}")
        elif error_class(f.answer) == "ok" and shape(f) != shape(r):
            out.append(f"{where}: {shape_difference(shape(f), shape(r))}")
    if len(fake) != len(real) and not out:
        out.append(f"the fake run made {len(fake)} calls, the real one {len(real)}")
    return out


# -- the two runs --------------------------------------------------------------------------


@dataclass
class Side:
    """One server (fake or real) behind a recorder, and the CLI environment pointing at it."""

    name: str
    recorder: Recorder
    env: dict[str, str]
    qp: QubesPlatform


def run_qbhub(side: Side, home: Path) -> None:
    """The recorded run: init, backup of VM, restore of it as COPY, as a settings-only copy
    (its volume resized), then in place of itself (--replace: held in a clone, removed,
    restored, the holder removed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBHUB_")}
    env.update(side.env, QBHUB_HOME=str(home), QBHUB_PASSPHRASE=PASSPHRASE)
    q = Qbhub(home, env)
    dest = "qubes://sys-backup/main"
    q.run("init", "--dest", dest)
    q.run("backup", VM, "--dest", dest)
    q.run("restore", VM, "--rename", f"{VM}:{COPY}", "--dest", dest)
    q.run("restore", VM, "--rename", f"{VM}:{VM}3", "--settings-only", "--dest", dest)
    q.run("restore", VM, "--replace", "--dest", dest)


def set_up(qp: QubesPlatform) -> None:
    """Before the recorded run, on either side: the backup VM (not in `backup --all`), and a
    block device from sys-net assigned to VM (4.3: a named device in auto-attach mode; 4.2: a
    persistent attachment)."""
    qp.create_vm(VMSettings("sys-backup", "AppVM", {"label": "gray"}))
    qp.api.property_set("sys-backup", "include_in_backups", "False")
    device = Assignment("block", "sys-net", "sda", {"read-only": "yes"}, True,
                        "0x1234:0x5678::b000000", "auto-attach")  # fmt: skip
    if qp.api_version == "4.2":
        qp.api.device_attach(VM, device)
    else:
        qp.api.device_assign(VM, device)


@pytest.fixture(params=real_qubesd.VERSIONS, ids=lambda v: f"qubes{v}")
def real_side(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Side]:
    version = request.param
    why = real_qubesd.missing(version)
    if why:
        pytest.skip(f"real qubesd {version} unavailable: {why}")
    server = real_qubesd.start(version)
    client, _ = real_qubesd.write_qrexec_standin(tmp_path / "real-qrexec")
    qp = QubesPlatform(server.socket, qrexec_client=str(client),
                       import_service=(server.import_service,))  # fmt: skip
    recorder = Recorder(server.socket, str(server.root / "sock" / "rec.sock"))
    try:
        set_up(qp)
        qp.import_volume(VM, "private", len(DATA), io.BytesIO(DATA))
        env = {
            "QBHUB_PLATFORM": "qubes",
            "QBHUB_QUBESD_SOCKET": recorder.path,
            "QBHUB_QREXEC_CLIENT": str(client),
            "QBHUB_QUBES_IMPORT_SERVICE": server.import_service,
        }
        yield Side(f"real {version}", recorder, env, qp)
    finally:
        recorder.close()
        real_qubesd.cleanup(server)


REAL_SEED_FEATURES = {"work": {"qrexec": "1", "gui": "1"}, "personal": {"qrexec": "1", "gui": "1"},
                      "vault": {"service.crond": "", "qrexec": "1", "gui": "1"},
                      "default-dvm": {"appmenus-dispvm": "1"}}  # fmt: skip


def like_the_real_seed(fake: fake_qubesd.FakeQubesd) -> None:
    """The fake's seed brought to the real seed's state: nothing runs, nothing was created
    through admin.vm.Create (no created-by-dom0 tag), features only where serve-qubesd sets
    them, the template's netvm at its default, the personal VM in a second file-reflink pool,
    varlibqubes of the `file` driver."""
    for vm in fake.vms.values():
        if vm.klass != "AdminVM":
            vm.state = "Halted"
            vm.tags.remove("created-by-dom0")
            vm.features = dict(REAL_SEED_FEATURES.get(vm.name, {}))
    del fake.vms["fedora-40-xfce"].props["netvm"]  # a template's netvm is none by default
    fake.pools["varlibqubes"]["driver"] = "file"
    fake.pools["personal-pool"] = {
        **{k: v for k, v in fake.pools["varlibqubes"].items() if k != "setup_check"},
        "driver": "file-reflink",
        "name": "personal-pool",
        "included_in": "varlibqubes",
    }
    for volume in fake.vms[VM].volumes.values():
        if volume["pool"] == "varlibqubes":
            volume["pool"] = "personal-pool"


def fake_side(version: str, classes: list[str], tmp_path: Path) -> Iterator[Side]:
    fake = fake_qubesd.start(tmp_path / "fake-work", version=version)
    fake.device_classes = list(classes)
    like_the_real_seed(fake)
    pool = tmp_path / "fake-pool"
    fake.pools["personal-pool"]["dir_path"] = str(pool)
    image = Path(f"{pool}/{fake.vms[VM].volumes['private']['vid']}.img")
    image.parent.mkdir(parents=True)
    image.write_bytes(DATA)
    fake.vms[VM].volumes["private"]["size"] = str(len(DATA))
    client, _ = real_qubesd.write_qrexec_standin(tmp_path / "fake-qrexec")
    service = tmp_path / "fake-import"
    service.write_text(
        f"#!/bin/sh\nFAKE_QUBESD_SOCKET={fake.path} exec {sys.executable} "
        f'{fake_qubesd.__file__} import-service "$@"\n'
    )
    service.chmod(0o755)
    recorder = Recorder(fake.path, fake.path + ".rec")
    qp = QubesPlatform(fake.path, qrexec_client=str(client), import_service=(str(service),))
    try:
        set_up(qp)
        env = {
            "QBHUB_PLATFORM": "qubes",
            "QBHUB_QUBESD_SOCKET": recorder.path,
            "QBHUB_QREXEC_CLIENT": str(client),
            "QBHUB_QUBES_IMPORT_SERVICE": str(service),
        }
        yield Side(f"fake {version}", recorder, env, qp)
    finally:
        recorder.close()
        fake.close()


def test_the_fake_answers_every_call_as_the_real_qubesd(real_side: Side, tmp_path: Path) -> None:
    version = real_side.name.split(" ")[1]
    classes = real_side.qp.device_classes
    for fake in fake_side(version, classes, tmp_path):
        run_qbhub(real_side, tmp_path / "home-real")
        run_qbhub(fake, tmp_path / "home-fake")
        real_calls, fake_calls = real_side.recorder.calls, fake.recorder.calls
        assert len(real_calls) > 40
        problems = differences(fake_calls, real_calls)
        print(f"{len(real_calls)} calls compared, {len({c.method for c in real_calls})} methods")
        assert not problems, "\n".join(problems)
        methods = {c.method for c in real_calls}
        device_api = {"4.2": {"admin.vm.device.block.List", "admin.vm.device.block.Attach"},
                      "4.3": {"admin.vm.device.block.Assigned", "admin.vm.device.block.Assign",
                              "admin.vm.notes.Get"}}  # fmt: skip
        assert {"admin.vm.property.GetAll", "admin.vm.CreateDisposable", "admin.vm.Create.AppVM",
                "admin.vm.volume.Info", "admin.pool.Info", "admin.vm.firewall.Set",
                "admin.vm.volume.CloneFrom", "admin.vm.volume.CloneTo", "admin.vm.Remove",
                *device_api[version]} <= methods  # fmt: skip
        assert real_side.qp.vm_settings(COPY).devices == real_side.qp.vm_settings(VM).devices


def test_the_comparison_sees_a_wrong_answer() -> None:
    """The comparison itself: a different failure class, property type or default flag, or a
    different request is reported; UUIDs, DispVM numbers and varying values are not."""
    getall = b"0\0name default=False type=str disp12\nxid default=True type=str -1\n"
    missing = b"2\0QubesFeatureNotFoundError\0"
    real = [Call("admin.vm.property.GetAll", "disp12", "", b"", getall),
            Call("admin.vm.feature.Get", "disp12", "x", b"", missing)]  # fmt: skip
    same = [Call("admin.vm.property.GetAll", "disp99", "", b"", getall.replace(b"12", b"99")),
            Call("admin.vm.feature.Get", "disp99", "x", b"", missing)]  # fmt: skip
    assert differences(same, real) == []
    typed = Call("admin.vm.property.GetAll", "disp99", "", b"",
                 getall.replace(b"type=str -1", b"type=int -1"))  # fmt: skip
    assert "xid" in differences([typed, same[1]], real)[0]
    unanswered = [same[0], Call("admin.vm.feature.Get", "disp99", "x", b"", b"")]
    assert "fake no answer, real QubesFeatureNotFoundError" in differences(unanswered, real)[0]
    other = [same[0], Call("admin.vm.feature.Get", "disp99", "y", b"", same[1].answer)]
    assert "asked the fake" in differences(other, real)[0]
