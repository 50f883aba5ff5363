"""Thin typed Admin API calls and strict parsers for their text formats (Qubes 4.2 and 4.3).

Each method is one qubesd call (see `wire.py` for the framing). Parsers treat every answer as
untrusted: names are checked against Qubes' own name rules, and anything that does not parse is a
QubesApiError("Malformed"), never a traceback. Formats, as qubes-core-admin `qubes/api/admin.py`
produces them:

- admin.vm.List: ``NAME class=CLASS state=STATE[ uuid=UUID]\\n`` per VM (uuid from 4.3 on).
- admin.vm.property.GetAll: ``NAME default=True|False type=TYPE VALUE\\n`` per property, with
  `\\` and newline escaped as `\\\\` and `\\n`; TYPE is str, int, bool, vm or label.
- admin.vm.feature.List / tag.List / volume.List / pool.List: one name per line.
- admin.vm.volume.Info / pool.Info: ``key=value\\n`` lines.
- admin.deviceclass.List (4.1+): one device class per line (those whose extension is installed).
- admin.vm.device.CLASS.List (4.2 only): ``BACKEND+IDENT key=value ...\\n``, where the options
  include `persistent=yes|no`; attach with admin.vm.device.CLASS.Attach+BACKEND+IDENT and payload
  ``persistent=True key=value ...``.
- admin.vm.device.CLASS.Assigned (4.3 only; .List is gone): ``BACKEND+PORT:DEVID SERIALISED\\n``
  (PORT may be `*`, any port, for a named device; DEVID `*`, any device, for a port),
  SERIALISED being ``key='value'`` words (``\\'`` escapes a quote; device options start with
  ``_``): device_id, port_id, devclass, backend_domain, mode (required, auto-attach,
  ask-to-attach), frontend_domain. Assign with admin.vm.device.CLASS.Assign+BACKEND+PORT+DEVID
  (the qrexec form: `:` as `+`, `*` as `_`) and the serialised assignment as payload
  (qubes/device_protocol.py DeviceAssignment.serialize/deserialize).
- admin.vm.firewall.Get/Set: one rule per line (``action=accept dsthost=... proto=tcp ...``).
- admin.vm.notes.Get/Set exist only from Qubes 4.3 on; on 4.2 qubesd drops the call unanswered.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from .wire import QubesApiError, shown

VM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
SIMPLE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}")
PROPERTY_TYPES = ("str", "int", "bool", "vm", "label")
DEVICE_MODES = ("required", "auto-attach", "ask-to-attach")
MAX_LINES = 10000


class Transport(Protocol):
    def call(self, method: str, dest: str, arg: str = "", payload: bytes = b"") -> bytes: ...


@dataclass(frozen=True)
class Property:
    """One VM property as qubesd reports it."""

    name: str
    is_default: bool
    type: str
    value: str


@dataclass(frozen=True)
class Assignment:
    """A device assigned to a VM: backend VM, port (4.2: ident), options, persistence.

    `device_id` and `mode` are Qubes 4.3's (4.2 has neither: "*" and "required").
    """

    devclass: str
    backend: str
    ident: str
    options: dict[str, str]
    persistent: bool
    device_id: str = "*"
    mode: str = "required"


def malformed(call: str, what: str) -> QubesApiError:
    return QubesApiError(call, "Malformed", what)


def check_vm_name(call: str, name: str) -> str:
    if not VM_NAME.fullmatch(name) or name in (".", ".."):
        raise malformed(call, f"invalid VM name {shown(name.encode())}")
    return name


def lines(call: str, data: bytes) -> list[str]:
    """Decode a newline-terminated ASCII listing."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise malformed(call, "non-ASCII data") from None
    if text and not text.endswith("\n"):
        raise malformed(call, "listing not newline-terminated")
    out = text.splitlines()
    if len(out) > MAX_LINES:
        raise malformed(call, f"more than {MAX_LINES} lines")
    if any(not line or "\r" in line or "\0" in line for line in out):
        raise malformed(call, "empty or binary line in listing")
    return out


def names(call: str, data: bytes, pattern: re.Pattern[str] = SIMPLE) -> list[str]:
    out = lines(call, data)
    for name in out:
        if not pattern.fullmatch(name):
            raise malformed(call, f"invalid name {shown(name.encode())}")
    return out


def key_values(call: str, data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines(call, data):
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[a-z_][a-z0-9_]{0,63}", key) or key in out:
            raise malformed(call, f"bad key=value line {shown(line.encode())}")
        out[key] = value
    return out


def unescape(call: str, text: str) -> str:
    out: list[str] = []
    chars = iter(text)
    for c in chars:
        if c != "\\":
            out.append(c)
            continue
        nxt = next(chars, "")
        if nxt == "n":
            out.append("\n")
        elif nxt == "\\":
            out.append("\\")
        else:
            raise malformed(call, "bad escape in property value")
    return "".join(out)


def parse_vm_list(data: bytes) -> list[tuple[str, str, str]]:
    call = "admin.vm.List"
    out = []
    for line in lines(call, data):
        name, _, rest = line.partition(" ")
        check_vm_name(call, name)
        fields = dict(f.partition("=")[::2] for f in rest.split(" ") if f)
        klass, state = fields.get("class", ""), fields.get("state", "")
        if not re.fullmatch(r"[A-Za-z]{1,32}", klass) or not re.fullmatch(r"[A-Za-z]{1,32}", state):
            raise malformed(call, f"bad VM line {shown(line.encode())}")
        out.append((name, klass, state))
    if len({n for n, _, _ in out}) != len(out):
        raise malformed(call, "duplicate VM names")
    return out


def parse_properties(call: str, data: bytes) -> dict[str, Property]:
    out: dict[str, Property] = {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise malformed(call, "property values are not UTF-8") from None
    if text and not text.endswith("\n"):
        raise malformed(call, "listing not newline-terminated")
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_][a-z0-9_]{0,63}) default=(True|False) type=([a-z]+) (.*)", line)
        if not m or m.group(3) not in PROPERTY_TYPES or m.group(1) in out:
            raise malformed(call, f"bad property line {shown(line.encode(), 80)}")
        name, default, ptype, raw = m.groups()
        value = unescape(call, raw)
        if ptype == "vm" and value:
            check_vm_name(call, value)
        if ptype == "bool" and value not in ("True", "False", ""):
            raise malformed(call, f"bad bool for {name}")
        if ptype == "int" and value and not re.fullmatch(r"-?[0-9]{1,19}", value):
            raise malformed(call, f"bad int for {name}")
        out[name] = Property(name, default == "True", ptype, value)
    return out


def parse_assignments(call: str, devclass: str, data: bytes) -> list[Assignment]:
    out = []
    for line in lines(call, data):
        ident_part, _, opts = line.partition(" ")
        backend, sep, ident = ident_part.partition("+")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", ident):
            raise malformed(call, f"bad device line {shown(line.encode())}")
        check_vm_name(call, backend)
        options: dict[str, str] = {}
        for item in opts.split(" ") if opts else ():
            key, eq, value = item.partition("=")
            if not eq or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key):
                raise malformed(call, f"bad device option {shown(item.encode())}")
            options[key] = value.strip("'")
        persistent = options.pop("persistent", "False") in ("True", "yes")
        out.append(Assignment(devclass, backend, ident, options, persistent))
    return out


DEVICE_WORD = re.compile(r"([A-Za-z0-9_-]{1,64})='((?:[^'\\]|\\')*)'")
PORT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
DEVICE_ID = re.compile(r"[A-Za-z0-9_.:*?-]{1,256}")


def parse_serialised(call: str, text: str) -> dict[str, str]:
    """The ``key='value' ...`` words of a 4.3 serialised device or assignment."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = DEVICE_WORD.match(text, pos)
        if not m or m.group(1) in out:
            raise malformed(call, f"bad device word at {shown(text[pos:].encode(), 60)}")
        out[m.group(1)] = m.group(2).replace("\\'", "'")
        pos = m.end()
        if pos < len(text):
            if text[pos] != " ":
                raise malformed(call, "device words not separated by spaces")
            pos += 1
    return out


def parse_assigned(call: str, devclass: str, data: bytes) -> list[Assignment]:
    """admin.vm.device.CLASS.Assigned (Qubes 4.3)."""
    out = []
    for line in lines(call, data):
        key, _, rest = line.partition(" ")
        backend, sep, port_dev = key.partition("+")
        port, sep2, device_id = port_dev.partition(":")
        if not sep or not sep2:
            raise malformed(call, f"bad device line {shown(line.encode())}")
        check_vm_name(call, backend)
        words = parse_serialised(call, rest)
        options = {k[1:]: v for k, v in words.items() if k.startswith("_")}
        mode = words.get("mode", "")
        if (
            not (PORT_ID.fullmatch(port) or (port == "*" and device_id != "*"))
            or not DEVICE_ID.fullmatch(device_id)
            or mode not in DEVICE_MODES
            or words.get("port_id", port) != port
            or words.get("device_id", device_id) != device_id
            or words.get("backend_domain", backend) != backend
            or words.get("devclass", devclass) != devclass
            or any(not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", k) for k in options)
        ):
            raise malformed(call, f"bad device line {shown(line.encode())}")
        out.append(Assignment(devclass, backend, port, options, True, device_id, mode))
    return out


UNKNOWN_INTERFACE = "?******"  # Qubes 4.3's DeviceInterface.unknown()


def qarg(text: str) -> str:
    """A 4.3 device reference in qrexec argument form (VirtualDevice.repr_for_qarg: the unknown
    interface as seven `_`, then `:` as `+` and `*` as `_`)."""
    text = text.replace(UNKNOWN_INTERFACE, "_" * len(UNKNOWN_INTERFACE))
    return text.replace(":", "+").replace("*", "_")


def serialise_assignment(a: Assignment) -> bytes:
    """The payload of admin.vm.device.CLASS.Assign (DeviceAssignment.serialize)."""

    def word(key: str, value: str) -> str:
        return f"{key}='{value.replace(chr(39), chr(92) + chr(39))}'"

    words = [
        word("device_id", a.device_id),
        word("port_id", a.ident),
        word("devclass", a.devclass),
        word("backend_domain", a.backend),
        word("mode", a.mode),
        *(word("_" + k, v) for k, v in sorted(a.options.items())),
    ]
    return " ".join(words).encode("ascii")


class AdminApi:
    """The Admin API calls qbhub makes, over any Transport (the qubesd socket in dom0)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def _call(self, method: str, dest: str, arg: str = "", payload: bytes = b"") -> bytes:
        return self.transport.call(method, dest, arg, payload)

    # VMs
    def vm_list(self) -> list[tuple[str, str, str]]:
        return parse_vm_list(self._call("admin.vm.List", "dom0"))

    def vm_create(
        self, klass: str, name: str, label: str, template: str = "", pool: str = ""
    ) -> None:
        payload = f"name={name} label={label}" + (f" pool={pool}" if pool else "")
        method = "admin.vm.CreateInPool." if pool else "admin.vm.Create."
        self._call(method + klass, "dom0", template, payload.encode("ascii"))

    def vm_remove(self, vm: str) -> None:
        self._call("admin.vm.Remove", vm)

    def vm_start(self, vm: str) -> None:
        self._call("admin.vm.Start", vm)

    def vm_kill(self, vm: str) -> None:
        self._call("admin.vm.Kill", vm)

    def create_disposable(self, dispvm_template: str = "dom0") -> str:
        """A new DispVM's name; "dom0" as destination means dom0's default_dispvm."""
        call = "admin.vm.CreateDisposable"
        data = self._call(call, dispvm_template)
        try:
            name = data.decode("ascii")
        except UnicodeDecodeError:
            raise malformed(call, "non-ASCII name") from None
        return check_vm_name(call, name)

    # properties
    def property_get_all(self, vm: str) -> dict[str, Property]:
        return parse_properties(
            "admin.vm.property.GetAll", self._call("admin.vm.property.GetAll", vm)
        )

    def property_get(self, vm: str, name: str) -> Property:
        call = "admin.vm.property.Get"
        line = self._call(call, vm, name)
        props = parse_properties(call, name.encode("ascii") + b" " + line + b"\n")
        return props[name]

    def property_set(self, vm: str, name: str, value: str) -> None:
        self._call("admin.vm.property.Set", vm, name, value.encode("utf-8"))

    # features and tags
    def feature_list(self, vm: str) -> list[str]:
        return names("admin.vm.feature.List", self._call("admin.vm.feature.List", vm))

    def feature_get(self, vm: str, name: str) -> str:
        data = self._call("admin.vm.feature.Get", vm, name)
        try:
            return data.decode("ascii")
        except UnicodeDecodeError:
            raise malformed("admin.vm.feature.Get", "non-ASCII value") from None

    def feature_set(self, vm: str, name: str, value: str) -> None:
        self._call("admin.vm.feature.Set", vm, name, value.encode("ascii"))

    def tag_list(self, vm: str) -> list[str]:
        return names("admin.vm.tag.List", self._call("admin.vm.tag.List", vm))

    def tag_set(self, vm: str, tag: str) -> None:
        self._call("admin.vm.tag.Set", vm, tag)

    # devices
    def deviceclass_list(self) -> list[str]:
        call = "admin.deviceclass.List"
        return names(call, self._call(call, "dom0"), re.compile(r"[a-z][a-z0-9_-]{0,31}"))

    def device_list(self, vm: str, devclass: str) -> list[Assignment]:
        """Qubes 4.2: assigned and attached devices (see `persistent`)."""
        method = f"admin.vm.device.{devclass}.List"
        return parse_assignments(method, devclass, self._call(method, vm))

    def device_assigned(self, vm: str, devclass: str) -> list[Assignment]:
        """Qubes 4.3: the VM's device assignments."""
        method = f"admin.vm.device.{devclass}.Assigned"
        return parse_assigned(method, devclass, self._call(method, vm))

    def device_assign(self, vm: str, a: Assignment) -> None:
        """Qubes 4.3: assign a device (persistently, in its mode)."""
        self._call(
            f"admin.vm.device.{a.devclass}.Assign",
            vm,
            qarg(f"{a.backend}+{a.ident}:{a.device_id}"),
            serialise_assignment(a),
        )

    def device_attach(self, vm: str, a: Assignment) -> None:
        opts = " ".join(f"{k}={v}" for k, v in sorted(a.options.items()))
        payload = f"persistent={a.persistent}" + (f" {opts}" if opts else "")
        self._call(
            f"admin.vm.device.{a.devclass}.Attach",
            vm,
            f"{a.backend}+{a.ident}",
            payload.encode("ascii"),
        )

    # firewall and notes
    def firewall_get(self, vm: str) -> list[str]:
        return lines("admin.vm.firewall.Get", self._call("admin.vm.firewall.Get", vm))

    def firewall_set(self, vm: str, rules: Iterable[str]) -> None:
        self._call("admin.vm.firewall.Set", vm, "", "".join(f"{r}\n" for r in rules).encode())

    def notes_get(self, vm: str) -> str:
        return self._call("admin.vm.notes.Get", vm).decode("utf-8", errors="replace")

    def notes_set(self, vm: str, text: str) -> None:
        self._call("admin.vm.notes.Set", vm, "", text.encode("utf-8"))

    # volumes and pools
    def volume_list(self, vm: str) -> list[str]:
        return names("admin.vm.volume.List", self._call("admin.vm.volume.List", vm))

    def volume_info(self, vm: str, volume: str) -> dict[str, str]:
        return key_values("admin.vm.volume.Info", self._call("admin.vm.volume.Info", vm, volume))

    def volume_resize(self, vm: str, volume: str, size: int) -> None:
        self._call("admin.vm.volume.Resize", vm, volume, str(size).encode("ascii"))

    def volume_clone(self, src_vm: str, dst_vm: str, volume: str) -> None:
        """admin.vm.volume.CloneFrom on the source, then CloneTo with its one-time token."""
        token = self._call("admin.vm.volume.CloneFrom", src_vm, volume).strip()
        if not token or len(token) > 128 or not token.isascii():
            raise QubesApiError("admin.vm.volume.CloneFrom", "Malformed", "no usable token")
        self._call("admin.vm.volume.CloneTo", dst_vm, volume, token)

    def pool_list(self) -> list[str]:
        return names("admin.pool.List", self._call("admin.pool.List", "dom0"))

    def pool_info(self, pool: str) -> dict[str, str]:
        return key_values("admin.pool.Info", self._call("admin.pool.Info", "dom0", pool))
