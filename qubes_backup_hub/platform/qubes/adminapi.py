"""Thin typed Admin API calls and strict parsers for their text formats (Qubes 4.2).

Each method is one qubesd call (see `wire.py` for the framing). Parsers treat every answer as
untrusted: names are checked against Qubes' own name rules, and anything that does not parse is a
QubesApiError("Malformed"), never a traceback. Formats, as qubes-core-admin `qubes/api/admin.py`
produces them:

- admin.vm.List: ``NAME class=CLASS state=STATE[ uuid=UUID]\\n`` per VM (uuid from 4.3 on).
- admin.vm.property.GetAll: ``NAME default=True|False type=TYPE VALUE\\n`` per property, with
  `\\` and newline escaped as `\\\\` and `\\n`; TYPE is str, int, bool, vm or label.
- admin.vm.feature.List / tag.List / volume.List / pool.List: one name per line.
- admin.vm.volume.Info / pool.Info: ``key=value\\n`` lines.
- admin.vm.device.CLASS.List (4.2): ``BACKEND+IDENT key=value ...\\n``, where the options include
  `persistent=True|False`; attach with admin.vm.device.CLASS.Attach+BACKEND+IDENT and payload
  ``persistent=True key=value ...``. (Qubes 4.3 renamed these to .Assigned/.Assign/.Unassign.)
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
DEVICE_CLASSES_42 = ("pci", "usb", "block", "mic")
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
    """A device assigned to a VM: backend VM, device ident, options, persistence."""

    devclass: str
    backend: str
    ident: str
    options: dict[str, str]
    persistent: bool


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

    # devices (Qubes 4.2 names)
    def device_list(self, vm: str, devclass: str) -> list[Assignment]:
        method = f"admin.vm.device.{devclass}.List"
        return parse_assignments(method, devclass, self._call(method, vm))

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
