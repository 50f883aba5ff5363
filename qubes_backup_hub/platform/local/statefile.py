"""The LocalPlatform's state file: every VM with its class, settings and pool, as one JSON document.

Readers load the file without a lock (writes are atomic: temp file, fsync, rename, fsync of the
directory); writers hold an exclusive flock on a lock file beside it for the whole
load-modify-save cycle, so concurrent `qbhub local` commands never lose each other's changes.
Every name and value is validated on the way in and again when the file is read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import NotFoundError, QbhubError, UsageError
from ...safety.vm_rules import (
    FEATURE_KEY,
    MAX_NOTES,
    PROPERTIES,
    RESERVED_NAMES,
    SAFE_TEXT,
    TAG,
    VM_NAME,
    VM_REF,
    device_record_ok,
)
from ..base import LABELS, VM_CLASSES, VMSettings

STATE_VERSION = 1
MAX_STATE = 64 * 1024 * 1024
POOL_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")
DEFAULT_POOL = "default"
ADMIN_VM = "dom0"
# Classes a user can create here (dom0 is built in; DispVMs are named ones based on an AppVM).
CREATABLE_CLASSES = tuple(k for k in VM_CLASSES if k != "AdminVM")
# Which class a VM's template must have, per class that takes a template.
TEMPLATE_CLASS = {"AppVM": "TemplateVM", "DispVM": "AppVM"}


def check_vm_name(name: object) -> str:
    """Return `name` if it is a valid, unreserved Qubes VM name, else raise UsageError."""
    if not isinstance(name, str) or not VM_NAME.fullmatch(name):
        raise UsageError(
            f"invalid VM name {str(name)[:40]!r}: use 1-31 of a-z A-Z 0-9 _ . -, "
            "starting with a letter"
        )
    if name.lower() in RESERVED_NAMES:
        raise UsageError(f"VM name {name!r} is reserved")
    return name


def check_pool_name(name: object) -> str:
    """Return `name` if it is a valid pool name, else raise UsageError."""
    if not isinstance(name, str) or not POOL_NAME.fullmatch(name):
        raise UsageError(f"invalid pool name {str(name)[:40]!r}: use 1-64 of a-z A-Z 0-9 _ . -")
    return name


@dataclass
class VMRecord:
    """One VM as the state file keeps it; properties are strings ("" for None)."""

    name: str
    klass: str
    pool: str = DEFAULT_POOL
    properties: dict[str, str] = field(default_factory=dict)
    features: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    firewall: list[str] = field(default_factory=list)
    notes: str = ""

    def settings(self) -> VMSettings:
        """A copy of this record as the platform interface's VMSettings."""
        return VMSettings(
            name=self.name,
            klass=self.klass,
            properties=dict(self.properties),
            features=dict(self.features),
            tags=list(self.tags),
            devices=[dict(d) for d in self.devices],
            firewall=list(self.firewall),
            notes=self.notes,
        )

    def to_doc(self) -> dict[str, Any]:
        return {
            "class": self.klass,
            "pool": self.pool,
            "properties": self.properties,
            "features": self.features,
            "tags": self.tags,
            "devices": self.devices,
            "firewall": self.firewall,
            "notes": self.notes,
        }


@dataclass
class VMState:
    """Every VM of the local platform, by name (dom0 is implicit and never stored)."""

    vms: dict[str, VMRecord] = field(default_factory=dict)

    def get(self, name: str) -> VMRecord:
        """The VM named `name`, or NotFoundError."""
        record = self.vms.get(name)
        if record is None:
            raise NotFoundError(f"no VM named {name!r}")
        return record

    def dependents(self, name: str) -> list[str]:
        """VMs whose properties refer to `name` (as template, netvm, default_dispvm, ...)."""
        return sorted(
            other.name
            for other in self.vms.values()
            if other.name != name
            and any(
                PROPERTIES.get(key) == VM_REF and value == name
                for key, value in other.properties.items()
            )
        )

    def to_doc(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "vms": {name: self.vms[name].to_doc() for name in sorted(self.vms)},
        }

    @classmethod
    def from_doc(cls, doc: Any) -> VMState:
        """Parse and fully validate a state document; raise ValueError on anything wrong."""
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise ValueError(f"not a version {STATE_VERSION} state document")
        vms = doc.get("vms")
        if not isinstance(vms, dict):
            raise ValueError("no VM table")
        state = cls()
        for name, entry in vms.items():
            if not isinstance(entry, dict):
                raise ValueError(f"VM {name!r} is not a record")
            state.vms[check_vm_name(name)] = VMRecord(
                name=name,
                klass=_check_class(entry.get("class")),
                pool=check_pool_name(entry.get("pool")),
                properties=_str_map(entry.get("properties"), f"{name} properties"),
                features=_str_map(entry.get("features"), f"{name} features"),
                tags=[check_tag(t) for t in _list(entry.get("tags"), f"{name} tags")],
                devices=check_devices(entry.get("devices")),
                firewall=check_firewall(entry.get("firewall")),
                notes=check_notes(entry.get("notes")),
            )
        for record in state.vms.values():
            for key, value in record.properties.items():
                if normalize_property(state, record, key, value) != value:
                    raise ValueError(f"VM {record.name}: property {key} is not normalized")
            for key, value in record.features.items():
                check_feature(key, value)
        return state


class StateFile:
    """The state document at `path`, with its lock file beside it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    def load(self) -> VMState:
        """The current state (empty when there is no file yet); no lock needed."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_STATE + 1)
        except FileNotFoundError:
            return VMState()
        try:
            if len(raw) > MAX_STATE:
                raise ValueError("too large")
            return VMState.from_doc(json.loads(raw))
        except (ValueError, UsageError) as exc:
            raise QbhubError(f"local platform state {self.path} is corrupt: {exc}") from None

    @contextlib.contextmanager
    def edit(self) -> Iterator[VMState]:
        """Lock, load, let the caller change the state, save it atomically (unless it raised)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                state = self.load()
                yield state
                self._save(state)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _save(self, state: VMState) -> None:
        data = json.dumps(state.to_doc(), indent=1, sort_keys=True).encode() + b"\n"
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def normalize_property(state: VMState, vm: VMRecord, key: str, value: Any) -> str:
    """Check `key=value` for `vm` against the whitelist and the other VMs; return the string form.

    Raises UsageError with the reason when the property is unknown or the value is not allowed.
    """
    kind = PROPERTIES.get(key)
    if kind is None:
        raise UsageError(f"unknown property {key[:40]!r}")
    text = _as_text(value)
    if kind is bool:
        flag = {"true": "True", "1": "True", "false": "False", "0": "False"}.get(text.lower())
        if flag is None:
            raise UsageError(f"{key} must be True or False, not {text[:40]!r}")
        return flag
    if kind is int:
        if not text.isascii() or not text.isdigit() or int(text) >= 1 << 40:
            raise UsageError(f"{key} must be a non-negative integer, not {text[:40]!r}")
        return str(int(text))
    if kind == VM_REF:
        return _check_vm_ref(state, vm, key, text)
    if isinstance(kind, tuple):
        if text not in kind:
            raise UsageError(f"{key} must be one of {', '.join(kind)}, not {text[:40]!r}")
        return text
    if not isinstance(kind, re.Pattern) or not kind.fullmatch(text):
        raise UsageError(f"bad value {text[:40]!r} for {key}")
    return text


def _check_vm_ref(state: VMState, vm: VMRecord, key: str, text: str) -> str:
    if key == "template":
        wanted = TEMPLATE_CLASS.get(vm.klass)
        if wanted is None:
            raise UsageError(f"{_a(vm.klass)} has no template")
        target = state.vms.get(text)
        if target is None or target.klass != wanted:
            raise UsageError(
                f"the template of {_a(vm.klass)} must be an existing {wanted}, not {text[:40]!r}"
            )
        return text
    if text == "":
        return text
    if text == vm.name:
        raise UsageError(f"{key} can't be the VM itself")
    if text == ADMIN_VM and key != "netvm":
        return text
    if text not in state.vms:
        raise UsageError(f"{key}: no VM named {text[:40]!r}")
    return text


def check_label(label: str) -> str:
    if label not in LABELS:
        raise UsageError(f"unknown label {label[:40]!r}: use one of {', '.join(LABELS)}")
    return label


def check_feature(key: object, value: object) -> tuple[str, str]:
    """Return (key, value) if both are valid feature syntax, else raise UsageError."""
    if not isinstance(key, str) or not FEATURE_KEY.fullmatch(key):
        raise UsageError(f"invalid feature name {str(key)[:40]!r}")
    if not isinstance(value, str) or len(value) > 4096 or not SAFE_TEXT.fullmatch(value):
        raise UsageError(f"invalid value for feature {key}: printable ASCII, up to 4096 chars")
    return key, value


def check_tag(tag: object) -> str:
    """Return `tag` if it is valid tag syntax, else raise UsageError."""
    if not isinstance(tag, str) or not TAG.fullmatch(tag):
        raise UsageError(f"invalid tag {str(tag)[:40]!r}: use 1-64 of a-z A-Z 0-9 _ -")
    return tag


def check_devices(devices: object) -> list[dict[str, Any]]:
    """Return the device assignments if each is a well-formed record, else raise UsageError."""
    checked: list[dict[str, Any]] = []
    for device in _list(devices, "devices"):
        # The record as Qubes 4.2 (`required`) or 4.3 (`device_id`, `mode`) writes it, checked
        # by the same rule the restore validator applies.
        if not device_record_ok(device):
            raise UsageError(f"bad device assignment {str(device)[:80]}")
        _str_map(device.get("options", {}), "device options")
        checked.append(dict(device))
    return checked


def check_firewall(rules: object) -> list[str]:
    """Return the firewall rules if each is a printable rule string, else raise UsageError."""
    checked = _list(rules, "firewall")
    if len(checked) > 1000 or not all(
        isinstance(r, str) and len(r) <= 1024 and SAFE_TEXT.fullmatch(r) for r in checked
    ):
        raise UsageError("bad firewall rules")
    return [str(r) for r in checked]


def check_notes(notes: object) -> str:
    if not isinstance(notes, str) or len(notes) > MAX_NOTES:
        raise UsageError("notes must be text of at most 256 KiB")
    return notes


def _check_class(klass: object) -> str:
    if klass not in CREATABLE_CLASSES:
        known = ", ".join(CREATABLE_CLASSES)
        raise UsageError(f"unknown VM class {str(klass)[:40]!r}: use {known}")
    return str(klass)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int | str):
        return str(value)
    raise UsageError(f"bad property value type {type(value).__name__}")


def _str_map(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise UsageError(f"{what} must map strings to strings")
    return dict(value)


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise UsageError(f"{what} must be a list")
    return list(value)


def _a(klass: str) -> str:
    return f"an {klass}" if klass[0] in "AEIOU" else f"a {klass}"
