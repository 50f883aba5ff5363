"""What a valid VM looks like to dom0: names, labels, typed property whitelist, feature and tag
syntax, device and firewall records. Used by the restore-validate hooks on untrusted headers."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import ValidationError
from ..platform.base import LABELS, PERSISTENT_VOLUMES

VM_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9_.-]{0,30}")
RESERVED_NAMES = {"dom0", "none", "default", "@adminvm"}
FEATURE_KEY = re.compile(r"[a-zA-Z0-9_.-]{1,128}")
TAG = re.compile(r"[a-zA-Z0-9_-]{1,64}")
SAFE_TEXT = re.compile(r"[\x20-\x7e]*")
RESTORABLE_CLASSES = ("AppVM", "TemplateVM", "StandaloneVM", "DispVM")
DEVICE_CLASSES = {"pci", "usb", "block", "mic", "audio", "webcam", "input"}
MAX_FEATURE_VALUE = 4096
MAX_FIREWALL_RULES = 1000
MAX_NOTES = 256 * 1024

VM_REF = "vm-or-empty"
# property name -> expected kind
PROPERTIES: dict[str, object] = {
    "label": LABELS,
    "template": VM_REF,
    "netvm": VM_REF,
    "default_dispvm": VM_REF,
    "management_dispvm": VM_REF,
    "audiovm": VM_REF,
    "guivm": VM_REF,
    "template_for_dispvms": bool,
    "provides_network": bool,
    "include_in_backups": bool,
    "autostart": bool,
    "debug": bool,
    "memory": int,
    "maxmem": int,
    "vcpus": int,
    "qrexec_timeout": int,
    "shutdown_timeout": int,
    "virt_mode": ("pv", "pvh", "hvm"),
    "kernel": re.compile(r"[a-zA-Z0-9._-]{0,64}"),
    "kernelopts": re.compile(r"[\x20-\x7e]{0,1024}"),
    "default_user": re.compile(r"[a-z_][a-z0-9_-]{0,31}"),
}


def refuse(where: str, what: str) -> ValidationError:
    return ValidationError(f"restore refused: {where}: {what}")


def check_vm_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not VM_NAME.fullmatch(name) or name in RESERVED_NAMES:
        shown = repr(name)[:60]
        raise refuse(where, f"invalid VM name {shown}")
    return name


def check_property(vm: str, key: str, value: Any) -> None:
    kind = PROPERTIES.get(key)
    where = f"VM {vm}, property {key!r}"
    if kind is None:
        raise refuse(f"VM {vm}", f"unknown property {key!r}")
    # Platforms report properties as strings ("True", "800"), as the Admin API does.
    if kind is bool:
        ok = isinstance(value, bool) or value in ("True", "False")
    elif kind is int:
        if isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}", value):
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 40
    elif kind == VM_REF:
        ok = value == "" or (isinstance(value, str) and bool(VM_NAME.fullmatch(value)))
    elif isinstance(kind, tuple):
        ok = value in kind
    else:
        assert isinstance(kind, re.Pattern)
        ok = isinstance(value, str) and bool(kind.fullmatch(value))
    if not ok:
        raise refuse(where, f"bad value {repr(value)[:60]}")


def check_settings(vm: str, klass: str, settings: Any) -> None:
    """Check one VM's settings document field by field."""
    if not isinstance(settings, dict):
        raise refuse(f"VM {vm}", "settings are not a document")
    unknown = set(settings) - {"properties", "features", "tags", "devices", "firewall", "notes"}
    if unknown:
        raise refuse(f"VM {vm}", f"unknown settings {sorted(unknown)[:3]}")
    properties = settings.get("properties", {})
    if not isinstance(properties, dict) or "label" not in properties:
        raise refuse(f"VM {vm}", "properties missing or without a label")
    for key, value in properties.items():
        check_property(vm, key, value)
    features = settings.get("features", {})
    if not isinstance(features, dict):
        raise refuse(f"VM {vm}", "features are not a mapping")
    for key, value in features.items():
        if not FEATURE_KEY.fullmatch(key):
            raise refuse(f"VM {vm}", f"bad feature name {key[:60]!r}")
        if (
            not isinstance(value, str)
            or len(value) > MAX_FEATURE_VALUE
            or not SAFE_TEXT.fullmatch(value)
        ):
            raise refuse(f"VM {vm}, feature {key}", "bad value")
    tags = settings.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and TAG.fullmatch(t) for t in tags):
        raise refuse(f"VM {vm}", "bad tag")
    _check_devices(vm, settings.get("devices", []))
    firewall = settings.get("firewall", [])
    if (
        not isinstance(firewall, list)
        or len(firewall) > MAX_FIREWALL_RULES
        or not all(
            isinstance(r, str) and len(r) <= 1024 and SAFE_TEXT.fullmatch(r) for r in firewall
        )
    ):
        raise refuse(f"VM {vm}", "bad firewall rules")
    notes = settings.get("notes", "")
    if not isinstance(notes, str) or len(notes) > MAX_NOTES:
        raise refuse(f"VM {vm}", "bad notes")
    if klass not in RESTORABLE_CLASSES:
        raise refuse(f"VM {vm}", f"class {klass!r} can't be restored")


def _check_devices(vm: str, devices: Any) -> None:
    if not isinstance(devices, list):
        raise refuse(f"VM {vm}", "devices are not a list")
    for device in devices:
        if (
            not isinstance(device, dict)
            or device.get("class") not in DEVICE_CLASSES
            or not isinstance(device.get("backend"), str)
            or not VM_NAME.fullmatch(device["backend"])
            or not isinstance(device.get("ident"), str)
            or not re.fullmatch(r"[a-zA-Z0-9:._-]{1,64}", device["ident"])
        ):
            raise refuse(f"VM {vm}", f"bad device assignment {repr(device)[:80]}")


def check_vm_volumes(vm: str, klass: str, volumes: list[tuple[str, int]], max_size: int) -> None:
    allowed = PERSISTENT_VOLUMES.get(klass, ())
    seen: set[str] = set()
    for name, size in volumes:
        if name not in allowed or name in seen:
            raise refuse(f"VM {vm}", f"unexpected volume {name!r} for a {klass}")
        seen.add(name)
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= max_size:
            raise refuse(f"VM {vm}, volume {name}", f"impossible size {size!r}")


VM = TypeVar("VM")
ORDERING_REFERENCES = ("template", "netvm", "default_dispvm")


def dependency_order(
    vms: Sequence[VM], name: Callable[[VM], str], properties: Callable[[VM], Mapping[str, Any]]
) -> list[VM]:
    """`vms` with each VM after those of them it names as template, netvm or default_dispvm.

    Creating VMs in this order lets each one's template exist first; a reference cycle (netvms
    pointing at each other) is broken at the VM where the walk re-enters it.
    """
    by_name = {name(vm): vm for vm in vms}
    ordered: list[VM] = []
    seen: set[str] = set()

    def visit(vm: VM, path: tuple[str, ...]) -> None:
        if name(vm) in seen or name(vm) in path:
            return
        props = properties(vm)
        for key in ORDERING_REFERENCES:
            ref = props.get(key)
            if isinstance(ref, str) and ref in by_name:
                visit(by_name[ref], (*path, name(vm)))
        seen.add(name(vm))
        ordered.append(vm)

    for vm in vms:
        visit(vm, ())
    return ordered
