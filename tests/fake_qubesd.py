"""A FAKE qubesd for tests: it stands in for the real Qubes daemon, which cannot run here.

It listens on a unix socket and speaks the real qubesd wire protocol of Qubes 4.1+ (request
``METHOD+ARG dom0 name DEST\\0PAYLOAD`` then EOF; response ``0\\0DATA`` or
``2\\0EXC_TYPE\\0TRACEBACK\\0MESSAGE\\0``; unknown methods get the connection closed with no
answer, exactly as qubesd does for its ProtocolError). Its answers come from an in-memory model
seeded with responses in the formats recorded from a Qubes 4.2 dom0: a TemplateVM, AppVMs, a
DispVM template, net VMs, dom0, a file-reflink and an lvm_thin pool, realistic volume ids and
sizes. It supports the mutations qbhub performs and records every request and every import.

Run as ``python fake_qubesd.py import-service VOLUME`` it plays the dom0 qrexec service
/etc/qubes-rpc/admin.vm.volume.ImportWithSize as the real script behaves: reads the size line,
asks the fake qubesd (internal.vm.volume.ImportBegin) for a file, copies at most SIZE bytes,
checks that exactly SIZE came and nothing follows, then calls internal.vm.volume.ImportEnd with
"ok" or "fail\\nREASON" (qubesd discards a failed import) and prints its response. Like qubesd,
the fake refuses a new ImportBegin while an import of that volume is still pending (what killing
the script mid-import used to cause). The socket path comes from $FAKE_QUBESD_SOCKET.

Where the real qubesd can run (tests/test_real_qubesd.py, ../shared/qubes-reference) the tests use
it; this fake remains for what it cannot do there: running VMs (Xen), LVM thin pools, VM notes
(4.3's Set needs libqubes-pure), a hostile qubesd, and requests recorded byte for byte. It
speaks Qubes 4.2 (the default: device .List/.Attach) or 4.3 (`start(..., version="4.3")`:
.Assigned/.Assign, notes, uuid in admin.vm.List, 4.3's properties). Its formats are checked
against the real 4.2 and 4.3 servers call by call by tests/test_fake_vs_real_qubesd.py.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
from pathlib import Path

from fake_qubesd_world import (
    CLASS_DEFAULTS,
    CLASS_LACKS,
    DEFAULT_PROPS,
    DEFAULT_TEMPLATE,
    POOLS,
    PROPS_43,
    VM,
    as_43,
    make_vm,
    seed,
)

MiB = 1024**2


class QubesError(Exception):
    """An exception the fake sends in qubesd's exception frame."""

    def __init__(self, exc_type: str, message: str) -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.message = message


class Refuse(Exception):
    """qubesd's ProtocolError: the connection is dropped without an answer."""


class FakeQubesd:
    """The fake daemon: a threaded unix-socket server over the in-memory model."""

    def __init__(self, path: str, workdir: Path, version: str = "4.2") -> None:
        self.path = path
        self.workdir = workdir
        self.version = version
        self.device_classes = ["block", "mic", "pci", "usb"]  # with USB proxy and audio
        self.props = PROPS_43 if version == "4.3" else DEFAULT_PROPS
        self.vms = seed()
        if version == "4.3":
            for vm in self.vms.values():
                vm.devices = {c: as_43(vm.name, c, lines) for c, lines in vm.devices.items()}
        self.pools = copy.deepcopy(POOLS)
        self.requests: list[tuple[str, str, str, bytes]] = []
        self.imports: dict[tuple[str, str], bytes] = {}
        self.pending: dict[tuple[str, str], Path] = {}
        self.clone_tokens: dict[str, tuple[str, str]] = {}
        self.overrides: dict[tuple[str, str], bytes] = {}  # (method, dest) -> raw response
        self.dispid = 4711
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the server thread
        self.sock.close()
        self.thread.join(timeout=5)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(os.path.dirname(self.path))

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle_safely, args=(conn,), daemon=True).start()

    def _handle_safely(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the client went away mid-answer
            self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while len(buf) <= 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                buf += chunk
            if len(buf) > 65536:
                return  # qubesd: "request too long", connection aborted
            try:
                header, payload = buf.split(b"\0", 1)
                meth_arg, src, dest_type, dest = header.decode("ascii").split(" ", 3)
                if src != "dom0" or dest_type != "name":
                    return
                method, _, arg = meth_arg.partition("+")
            except ValueError:
                return  # framing error: dropped
            with self.lock:
                self.requests.append((method, dest, arg, payload))
                override = self.overrides.get((method, dest))
                if override is not None:
                    conn.sendall(override)
                    return
                try:
                    result = self.dispatch(method, dest, arg, payload)
                except Refuse:
                    return
                except QubesError as e:
                    conn.sendall(
                        b"2\0" + e.exc_type.encode() + b"\0\0" + e.message.encode() + b"\0"
                    )
                    return
            conn.sendall(b"0\0" + result.encode())

    # the model
    def vm(self, name: str) -> VM:
        if name not in self.vms:
            raise QubesError("QubesVMNotFoundError", f"No such domain: {name!r}")
        return self.vms[name]

    def dispatch(self, method: str, dest: str, arg: str, payload: bytes) -> str:
        vm = self.vm(dest)
        if method.startswith("admin.vm.device."):
            _, _, _, devclass, op = method.split(".")
            if devclass not in self.device_classes:
                raise Refuse  # the extension is not installed: no such method
            return self.device_call(vm, devclass, op, arg, payload)
        if method.startswith(("admin.vm.Create.", "admin.vm.CreateInPool.")):
            return self.create(method.rsplit(".", 1)[1], arg, payload.decode())
        handler = getattr(self, "m_" + method.replace(".", "_"), None)
        if handler is None:
            raise Refuse  # qubesd: ProtocolError("no such method")
        return str(handler(vm, arg, payload))

    def device_call(self, vm: VM, devclass: str, op: str, arg: str, payload: bytes) -> str:
        """4.2: List (assigned and attached, `persistent=yes|no`) and Attach; 4.3: Assigned and
        Assign (qubes/device_protocol.py formats); any other call goes unanswered."""
        lines = vm.devices.setdefault(devclass, [])
        if (self.version, op) == ("4.2", "List"):
            return "".join(line + "\n" for line in sorted(lines))
        if (self.version, op) == ("4.2", "Attach"):  # listed: options, then persistent
            words = payload.decode().split(" ")
            persistent = "yes" if "persistent=True" in words else "no"
            options = [w for w in words if w and not w.startswith("persistent=")]
            lines.append(" ".join([arg, *options, f"persistent={persistent}"]))
            return ""
        if (self.version, op) == ("4.3", "Assigned"):
            return "".join(line + "\n" for line in sorted(lines))
        if (self.version, op) == ("4.3", "Assign"):
            lines.append(self.assignment_line(vm, devclass, arg, payload.decode("ascii")))
            return ""
        raise Refuse

    def assignment_line(self, vm: VM, devclass: str, arg: str, serialised: str) -> str:
        """An .Assigned line for admin.vm.device.CLASS.Assign+ARG (VirtualDevice.from_qarg and
        DeviceAssignment.deserialize, as far as qbhub's assignments need)."""
        backend, _, identity = arg.partition("+")
        port, _, device_id = identity.replace("+", ":").partition(":")
        port = "*" if port == "_" else port
        device_id = "*" if device_id in ("", "_") else device_id.replace("_" * 7, "?******")
        words = dict(re.findall(r"(\S+?)='((?:[^'\\]|\\')*)'", serialised))
        self.vm(backend)
        expected = {"device_id": device_id, "port_id": port, "devclass": devclass,
                    "backend_domain": backend}  # fmt: skip
        if any(words.get(k, v) != v for k, v in expected.items()):
            raise QubesError("ProtocolError", "unexpected device property")
        key = f"{backend}+{port}:{device_id}"
        if any(line.split(" ")[0] == key for line in vm.devices[devclass]):
            raise QubesError(
                "DeviceAlreadyAssigned",
                f"{devclass} device {backend}:{port}:{device_id} already assigned to {vm.name}",
            )
        options = " ".join(f"{k}='{v}'" for k, v in words.items() if k.startswith("_"))
        mode = words.get("mode", "auto-attach")
        return (
            f"{key} device_id='{device_id}' port_id='{port}' devclass='{devclass}' "
            f"backend_domain='{backend}' mode='{mode}'" + (f" {options}" if options else "")
        )  # fmt: skip (no frontend_domain: as qubesd)

    def m_admin_vm_notes_Get(self, vm: VM, arg: str, payload: bytes) -> str:
        if self.version == "4.2":
            raise Refuse  # notes are 4.3's
        return vm.notes

    def m_admin_vm_notes_Set(self, vm: VM, arg: str, payload: bytes) -> str:
        if self.version == "4.2":
            raise Refuse
        vm.notes = payload.decode("utf-8")
        return ""

    def m_admin_deviceclass_List(self, vm: VM, arg: str, payload: bytes) -> str:
        if vm.name != "dom0" or arg:
            raise Refuse
        return "".join(f"{c}\n" for c in sorted(self.device_classes))

    def m_admin_vm_property_Get(self, vm: VM, arg: str, payload: bytes) -> str:
        for line in self.m_admin_vm_property_GetAll(vm, "", b"").splitlines():
            name, _, rest = line.partition(" ")
            if name == arg:
                return rest
        raise QubesError("QubesNoSuchPropertyError", f"Invalid property {arg!r} of {vm.name}")

    def m_admin_vm_List(self, vm: VM, arg: str, payload: bytes) -> str:
        def uuid(v: VM) -> str:  # listed from 4.3 on
            return f" uuid={v.props.get('uuid', DEFAULT_PROPS['uuid'])[1]}"

        return "".join(
            f"{v.name} class={v.klass} state={v.state}{uuid(v) if self.version == '4.3' else ''}\n"
            for v in sorted(self.vms.values(), key=lambda v: v.name)
        )

    def m_admin_vm_property_GetAll(self, vm: VM, arg: str, payload: bytes) -> str:
        out = []
        names = set(self.props) | set(vm.props)
        names -= CLASS_LACKS.get(vm.klass, set())
        if vm.klass == "AdminVM":
            names = set(vm.props)
        if (vm.klass, self.version) == ("TemplateVM", "4.3"):
            names.add("appvm_default_bootmode")
        if (vm.klass, self.version) == ("DispVM", "4.3"):
            names.add("is_preload")
        for name in sorted(names):
            if name in vm.props:
                ptype, value = vm.props[name]
                is_default = False
            else:
                ptype, value = self.props.get(name) or CLASS_DEFAULTS[name]
                is_default = True
            value = value.replace("\\", "\\\\").replace("\n", "\\n")
            out.append(f"{name} default={is_default} type={ptype} {value}\n")
        return "".join(out)

    def m_admin_vm_property_Set(self, vm: VM, arg: str, payload: bytes) -> str:
        if arg not in self.props and arg != "template":
            raise QubesError("QubesNoSuchPropertyError", f"Invalid property {arg!r} of {vm.name}")
        ptype = self.props.get(arg, ("vm", ""))[0]
        value = payload.decode()
        if ptype == "vm" and value:
            self.vm(value)
        if ptype == "label" and value not in (
            "red",
            "orange",
            "yellow",
            "green",
            "gray",
            "blue",
            "purple",
            "black",
        ):
            raise QubesError("QubesLabelNotFoundError", f"Label does not exist: {value}")
        vm.props[arg] = (ptype, value)
        return ""

    def m_admin_vm_feature_List(self, vm: VM, arg: str, payload: bytes) -> str:
        return "".join(f"{k}\n" for k in vm.features)

    def m_admin_vm_feature_Get(self, vm: VM, arg: str, payload: bytes) -> str:
        if arg not in vm.features:
            raise QubesError(
                "QubesFeatureNotFoundError", f"Feature not set for domain {vm.name}: {arg}"
            )
        return vm.features[arg]

    def m_admin_vm_feature_Set(self, vm: VM, arg: str, payload: bytes) -> str:
        vm.features[arg] = payload.decode("ascii")
        return ""

    def m_admin_vm_tag_List(self, vm: VM, arg: str, payload: bytes) -> str:
        return "".join(f"{t}\n" for t in sorted(vm.tags))

    def m_admin_vm_tag_Set(self, vm: VM, arg: str, payload: bytes) -> str:
        if arg not in vm.tags:
            vm.tags.append(arg)
        return ""

    def m_admin_vm_firewall_Get(self, vm: VM, arg: str, payload: bytes) -> str:
        return "".join(f"{r}\n" for r in vm.firewall)

    def m_admin_vm_firewall_Set(self, vm: VM, arg: str, payload: bytes) -> str:
        vm.firewall = payload.decode().splitlines()
        return ""

    def m_admin_vm_volume_List(self, vm: VM, arg: str, payload: bytes) -> str:
        return "".join(f"{v}\n" for v in vm.volumes)

    def m_admin_vm_volume_Info(self, vm: VM, arg: str, payload: bytes) -> str:
        if arg not in vm.volumes:
            raise Refuse  # qubesd: enforce(arg in volumes) -> ProtocolError
        return "".join(f"{k}={v}\n" for k, v in vm.volumes[arg].items())

    def m_admin_vm_volume_Resize(self, vm: VM, arg: str, payload: bytes) -> str:
        if arg not in vm.volumes:
            raise Refuse
        size = int(payload.decode("ascii"))
        if size < int(vm.volumes[arg]["size"]):
            raise QubesError(
                "QubesValueError", "For your own safety, shrinking of private is disabled."
            )
        vm.volumes[arg]["size"] = str(size)
        return ""

    def m_admin_vm_volume_CloneFrom(self, vm: VM, arg: str, payload: bytes) -> str:
        if arg not in vm.volumes:
            raise Refuse
        token = secrets.token_hex(16)  # qubesd: a random one-time token
        self.clone_tokens[token] = (vm.name, arg)
        return token

    def m_admin_vm_volume_CloneTo(self, vm: VM, arg: str, payload: bytes) -> str:
        if arg not in vm.volumes:
            raise Refuse
        source = self.clone_tokens.pop(payload.decode("ascii", "replace").strip(), None)
        if source is None or source[0] not in self.vms:
            raise Refuse  # unknown or used token, or the source VM is gone
        src_vm, src_volume = self.vms[source[0]], source[1]
        vm.volumes[arg]["size"] = src_vm.volumes[src_volume]["size"]
        if source in self.imports:
            self.imports[(vm.name, arg)] = self.imports[source]
        else:
            self.imports.pop((vm.name, arg), None)
        return ""

    def m_admin_pool_List(self, vm: VM, arg: str, payload: bytes) -> str:
        return "".join(f"{p}\n" for p in self.pools)

    def m_admin_pool_Info(self, vm: VM, arg: str, payload: bytes) -> str:
        if arg not in self.pools:
            raise Refuse
        return "".join(f"{k}={v}\n" for k, v in sorted(self.pools[arg].items()))

    def m_admin_vm_Start(self, vm: VM, arg: str, payload: bytes) -> str:
        if vm.state == "Running":
            raise QubesError("QubesVMNotHaltedError", f"Domain is powered on: {vm.name!r}")
        vm.state = "Running"
        return ""

    def m_admin_vm_Kill(self, vm: VM, arg: str, payload: bytes) -> str:
        if vm.state != "Running":
            raise QubesError("QubesVMNotStartedError", f"Domain is powered off: {vm.name!r}")
        vm.state = "Halted"
        if vm.klass == "DispVM":
            del self.vms[vm.name]  # auto_cleanup
        return ""

    def m_admin_vm_Remove(self, vm: VM, arg: str, payload: bytes) -> str:
        if vm.klass == "AdminVM":
            raise QubesError("QubesVMInUseError", "'dom0' cannot be removed")
        if vm.state != "Halted":
            raise QubesError("QubesVMNotHaltedError", f"Domain is powered on: {vm.name!r}")
        del self.vms[vm.name]
        return ""

    def m_admin_vm_CreateDisposable(self, vm: VM, arg: str, payload: bytes) -> str:
        base = self.vm(vm.props["default_dispvm"][1]) if vm.klass == "AdminVM" else vm
        if base.props.get("template_for_dispvms", ("bool", "False"))[1] != "True":
            raise QubesError(
                "QubesException",
                "Refusing to create DispVM out of this AppVM, because template_for_dispvms=False",
            )
        self.dispid += 1
        name = f"disp{self.dispid}"
        disp = make_vm(name, "DispVM", "vm-pool", base.name, label="red")
        disp.props["auto_cleanup"] = ("bool", "True")
        disp.props["dispid"] = ("int", str(self.dispid))
        disp.tags.append("disp-created-by-dom0")
        disp.features = dict(base.features)  # qubesd copies the DispVM template's features
        disp.devices = {}
        self.vms[name] = disp
        return name

    def create(self, klass: str, template: str, params: str) -> str:
        kwargs = dict(p.split("=", 1) for p in params.split(" "))
        name = kwargs.get("name", "")
        if name in self.vms:
            raise QubesError("QubesValueError", f"VM {name} already exists")
        if template:
            self.vm(template)
        elif klass == "AppVM":
            template = DEFAULT_TEMPLATE  # qubesd: the default template, as if named
        elif klass == "DispVM":
            template = self.vms["dom0"].props["default_dispvm"][1]
        vm = make_vm(name, klass, kwargs.get("pool", "vm-pool"), template, label=kwargs["label"])
        vm.features = {}  # a new VM has none (the seeded ones got theirs from their templates)
        self.vms[name] = vm
        return ""

    # import, as the ImportWithSize service drives it
    def m_internal_vm_volume_ImportBegin(self, vm: VM, arg: str, payload: bytes) -> str:
        if arg not in vm.volumes:
            raise Refuse
        if vm.state != "Halted":
            raise QubesError("QubesVMNotHaltedError", f"Domain is powered on: {vm.name!r}")
        if (vm.name, arg) in self.pending:  # qubesd: the previous import never ended
            raise QubesError("QubesException", f"Volume {arg} of {vm.name} is being imported")
        size = int(payload.decode())
        path = self.workdir / f"import-{vm.name}-{arg}.img"
        path.write_bytes(b"")
        os.truncate(path, size)
        self.pending[(vm.name, arg)] = path
        return f"{size} {path}"

    def m_internal_vm_volume_ImportEnd(self, vm: VM, arg: str, payload: bytes) -> str:
        path = self.pending.pop((vm.name, arg))
        if payload != b"ok":
            path.unlink()
            reason = payload.decode("ascii").partition("\n")[2]
            raise QubesError("QubesException", f"Data import failed: {reason}")
        data = path.read_bytes()
        self.imports[(vm.name, arg)] = data
        vm.volumes[arg]["size"] = str(len(data))
        return ""


def client(sock_path: str, method: str, dest: str, arg: str, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        s.sendall(f"{method}+{arg} dom0 name {dest}\0".encode() + payload)
        s.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: s.recv(65536), b""))


def import_service(volume_name: str) -> int:
    """The fake /etc/qubes-rpc/admin.vm.volume.ImportWithSize."""
    sock_path = os.environ["FAKE_QUBESD_SOCKET"]
    vm = os.environ["QREXEC_REQUESTED_TARGET"]
    stdin = sys.stdin.buffer
    size_line = stdin.readline(32).strip()
    begin = client(sock_path, "internal.vm.volume.ImportBegin", vm, volume_name, size_line)
    if not begin.startswith(b"0\0"):
        sys.stdout.buffer.write(begin)
        return 1
    size_text, path = begin[2:].decode().split(" ", 1)
    size = remaining = int(size_text)
    with open(path, "r+b") as out:
        while remaining:
            chunk = stdin.read1(min(remaining, MiB)) if hasattr(stdin, "read1") else b""
            if not chunk:
                break  # dd: end of input ends the copy; the count is checked below
            out.write(chunk)
            remaining -= len(chunk)
    status = "ok"
    if remaining:
        status = f"fail\nnot enough data (copied {size - remaining} bytes, expected {size} bytes)"
    elif stdin.read(1):
        status = f"fail\ntoo much data (expected {size} bytes)"
    end = client(sock_path, "internal.vm.volume.ImportEnd", vm, volume_name, status.encode())
    sys.stdout.buffer.write(end)
    return 0


def start(workdir: Path, version: str = "4.2") -> FakeQubesd:
    """Start a fake qubesd of Qubes `version` on a fresh socket under a short temp dir (unix
    paths are short)."""
    sockdir = tempfile.mkdtemp(prefix="fq")
    workdir.mkdir(parents=True, exist_ok=True)
    return FakeQubesd(os.path.join(sockdir, "qubesd.sock"), workdir, version)


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "import-service":
        return import_service(argv[1])
    print("usage: fake_qubesd.py import-service VOLUME", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
