"""What a valid VM looks like to dom0, and how the settings policy is applied to it.

Two steps, both on untrusted restore headers. `check_settings` is structural (names, labels, the
typed value of every known property, feature and tag syntax, device and firewall records, size
bounds) and runs in the built-in restore-validate hook. `apply_policy` then decides, with what
dom0 knows of its own VMs, what is restored, what refuses the restore, and what is left at its
default (the verdicts are data, in `policy`). Reserved names are compared case-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import ValidationError
from ..platform.base import LABELS, PERSISTENT_VOLUMES
from . import policy
from .text import shown

VM_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9_.-]{0,30}")
RESERVED_NAMES = {"dom0", "none", "default", "@adminvm"}
PROPERTY_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
FEATURE_KEY = re.compile(r"[a-zA-Z0-9_.-]{1,128}")
TAG = re.compile(r"[a-zA-Z0-9_-]{1,64}")
SAFE_TEXT = re.compile(r"[\x20-\x7e]*")
RESTORABLE_CLASSES = ("AppVM", "TemplateVM", "StandaloneVM", "DispVM")
DEVICE_CLASSES = set(policy.DEVICE_POLICY)
DEVICE_IDENT = re.compile(r"[a-zA-Z0-9:._-]{1,64}")
DEVICE_OPTION = re.compile(r"[a-z][a-z0-9_-]{0,31}")
DEVICE_ID = re.compile(r"[A-Za-z0-9_.:*?-]{1,256}")  # Qubes 4.3: vendor:product::interfaces
DEVICE_MODES = ("required", "auto-attach", "ask-to-attach")  # those Qubes 4.3 can assign
DEVICE_KEYS = {"class", "backend", "ident", "options", "required", "device_id", "mode"}
MAX_FEATURES = 1024
MAX_TAGS = 256
MAX_DEVICES = 64
MAX_FEATURE_VALUE = 4096
MAX_FIREWALL_RULES = 1000
MAX_NOTES = 65000  # qubesd reads at most 64 KiB per request, header included

VM_REF = "vm-or-empty"
OCTET = r"(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])"
# property name -> expected kind of value (unknown names are left out by the policy)
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
    "stubdom_mem": int,
    "ip": re.compile(rf"({OCTET}\.){{3}}{OCTET}"),
    "ip6": re.compile(r"[0-9a-f:]{2,39}"),
    "mac": re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}"),
    "keyboard_layout": re.compile(r"[a-zA-Z]{1,32}\+[a-zA-Z0-9_-]{0,32}\+[a-zA-Z0-9_:,-]{0,128}"),
    "bootmode": re.compile(r"[a-zA-Z0-9_.-]{0,64}"),
    "devices_denied": re.compile(r"([bump*][0-9a-f*]{6}){0,256}"),
}

# A firewall rule as Qubes writes it: space-separated key=value words, action first.
FIREWALL_KEYS = {
    "action": re.compile(r"accept|drop"),
    "proto": re.compile(r"tcp|udp|icmp"),
    "dst4": re.compile(r"[0-9.]{7,15}(/[0-9]{1,2})?"),
    "dst6": re.compile(r"[0-9a-fA-F:]{2,39}(/[0-9]{1,3})?"),
    "dsthost": re.compile(r"[a-zA-Z0-9.-]{1,253}"),
    "dstports": re.compile(r"[0-9]{1,5}(-[0-9]{1,5})?"),
    "icmptype": re.compile(r"[0-9]{1,3}"),
    "specialtarget": re.compile(r"dns"),
    "expire": re.compile(r"\+?[0-9]{1,12}"),
    "comment": re.compile(r"[\x20-\x7e]{0,256}"),
}


def refuse(where: str, what: str) -> ValidationError:
    return ValidationError(f"restore refused: {where}: {what}")


def is_reserved(name: str) -> bool:
    """True for names no VM may take, in any letter case (dom0, None, DEFAULT, ...)."""
    return name.lower() in RESERVED_NAMES


def check_vm_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not VM_NAME.fullmatch(name) or is_reserved(name):
        shown = repr(name)[:60]
        raise refuse(where, f"invalid VM name {shown}")
    return name


def as_int(value: Any) -> int | None:
    """An integer property value (platforms report them as strings), or None if it is not one."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}", value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def check_property(vm: str, key: str, value: Any) -> None:
    """Check the value of a known property by its kind; unknown names are the policy's."""
    kind = PROPERTIES.get(key)
    where = f"VM {vm}, property {key!r}"
    if kind is None:
        if not isinstance(key, str) or not PROPERTY_NAME.fullmatch(key):
            raise refuse(f"VM {vm}", f"bad property name {repr(key)[:60]}")
        return
    # Platforms report properties as strings ("True", "800"), as the Admin API does.
    if kind is bool:
        ok = isinstance(value, bool) or value in ("True", "False")
    elif kind is int:
        number = as_int(value)
        low, high = policy.NUMBER_BOUNDS.get(key, (0, 1 << 40))
        ok = number is not None and low <= number <= high
    elif kind == VM_REF:
        ok = value == "" or (
            isinstance(value, str) and bool(VM_NAME.fullmatch(value)) and not is_reserved(value)
        )
    elif isinstance(kind, tuple):
        ok = value in kind
    else:
        assert isinstance(kind, re.Pattern)
        ok = isinstance(value, str) and bool(kind.fullmatch(value))
    if not ok:
        raise refuse(where, f"bad value {repr(value)[:60]}")


def check_firewall_rule(rule: object) -> bool:
    """True if `rule` is one well-formed Qubes firewall rule (each key once, action first)."""
    if not isinstance(rule, str) or len(rule) > 1024 or not SAFE_TEXT.fullmatch(rule):
        return False
    seen: set[str] = set()
    head, _, comment = rule.partition(" comment=")
    words = head.split(" ")
    if comment:
        words.append("comment=" + comment)
    for position, word in enumerate(words):
        key, sep, value = word.partition("=")
        pattern = FIREWALL_KEYS.get(key)
        if not sep or pattern is None or key in seen or not pattern.fullmatch(value):
            return False
        if (position == 0) != (key == "action"):
            return False
        seen.add(key)
    return bool(seen)


def check_settings(vm: str, klass: str, settings: Any) -> None:
    """Check one VM's settings document field by field (structure and syntax only)."""
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
    if not isinstance(features, dict) or len(features) > MAX_FEATURES:
        raise refuse(f"VM {vm}", "features are not a mapping of a sane size")
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
    if (
        not isinstance(tags, list)
        or len(tags) > MAX_TAGS
        or not all(isinstance(t, str) and TAG.fullmatch(t) for t in tags)
    ):
        raise refuse(f"VM {vm}", "bad tag")
    _check_devices(vm, settings.get("devices", []))
    firewall = settings.get("firewall", [])
    if (
        not isinstance(firewall, list)
        or len(firewall) > MAX_FIREWALL_RULES
        or not all(check_firewall_rule(r) for r in firewall)
    ):
        raise refuse(f"VM {vm}", "bad firewall rules")
    notes = settings.get("notes", "")
    if not isinstance(notes, str) or len(notes) > MAX_NOTES:
        raise refuse(f"VM {vm}", "bad notes")
    if klass not in RESTORABLE_CLASSES:
        raise refuse(f"VM {vm}", f"class {klass!r} can't be restored")


def _check_devices(vm: str, devices: Any) -> None:
    if not isinstance(devices, list) or len(devices) > MAX_DEVICES:
        raise refuse(f"VM {vm}", "devices are not a list of a sane size")
    for device in devices:
        if not device_record_ok(device):
            raise refuse(f"VM {vm}", f"bad device assignment {repr(device)[:80]}")


def device_record_ok(device: Any) -> bool:
    """One assignment record: class, backend, port (`ident`), options, 4.2's `required` and
    4.3's `device_id` and `mode` (`required` and `mode` agree where both are given; without a
    mode, required=False reads as auto-attach). The port may be "*" (any port) only for a named
    device, as Qubes 4.3 itself requires."""
    if not isinstance(device, dict) or set(device) - DEVICE_KEYS:
        return False
    klass, backend, ident = device.get("class"), device.get("backend"), device.get("ident")
    device_id = device.get("device_id", "*")
    if "mode" in device:
        mode = device["mode"]
        required = device.get("required", mode == "required")
    else:
        required = device.get("required", True)
        mode = "required" if required is True else "auto-attach"
    return (
        isinstance(klass, str)
        and klass in DEVICE_CLASSES
        and isinstance(backend, str)
        and bool(VM_NAME.fullmatch(backend))
        and isinstance(device_id, str)
        and bool(DEVICE_ID.fullmatch(device_id))
        and isinstance(ident, str)
        and (bool(DEVICE_IDENT.fullmatch(ident)) or (ident == "*" and device_id != "*"))
        and mode in DEVICE_MODES
        and isinstance(required, bool)
        and required == (mode == "required")
        and _device_options_ok(device.get("options", {}))
    )


def _device_options_ok(options: Any) -> bool:
    return (
        isinstance(options, dict)
        and len(options) <= 16
        and all(
            isinstance(k, str)
            and DEVICE_OPTION.fullmatch(k)
            and isinstance(v, str)
            and len(v) <= 256
            and SAFE_TEXT.fullmatch(v)
            for k, v in options.items()
        )
    )


def check_vm_volumes(vm: str, klass: str, volumes: list[tuple[str, int]], max_size: int) -> None:
    allowed = PERSISTENT_VOLUMES.get(klass, ())
    seen: set[str] = set()
    for name, size in volumes:
        if name not in allowed or name in seen:
            raise refuse(f"VM {vm}", f"unexpected volume {name!r} for a {klass}")
        seen.add(name)
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= max_size:
            raise refuse(f"VM {vm}, volume {name}", f"impossible size {size!r}")


# -- the policy, applied ---------------------------------------------------------------------


@dataclass(frozen=True)
class KnownVM:
    """What dom0 knows of one of its existing VMs, for judging references to it."""

    klass: str
    provides_network: bool = False
    template_for_dispvms: bool = False


@dataclass
class PolicyContext:
    """What the policy needs to know beyond the header: dom0's own facts and the user's flags.

    `restored` maps each VM this run creates (after --rename) to its class; `existing` is dom0's
    own list; `untouchable` names VMs no restored setting may name (the backup VM serving the
    archive, the worker); `allow` holds the user's `--allow` words; `limits` caps numbers by the
    host (e.g. {"memory": 16384, "vcpus": 8}), lowering `policy.NUMBER_BOUNDS`.
    """

    restored: dict[str, str]
    existing: dict[str, KnownVM]
    untouchable: set[str] = field(default_factory=set)
    allow: frozenset[str] = frozenset()
    limits: dict[str, int] = field(default_factory=dict)
    restored_settings: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class PolicyOutcome:
    """The settings to apply per VM, what will be applied that is sensitive, and what is not."""

    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    sensitive: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)


# Which class a VM reference must name, by property and by the referring VM's class.
TEMPLATE_CLASS = {"AppVM": "TemplateVM", "DispVM": "AppVM"}


def apply_policy(
    vms: Sequence[tuple[str, str, dict[str, Any]]], ctx: PolicyContext
) -> PolicyOutcome:
    """Judge each (name, class, settings) by the policy; raise ValidationError on an unsafe
    reference (dom0, the backup VM, a worker, a DispVM, a network VM where none belongs)."""
    outcome = PolicyOutcome()
    ctx.restored_settings = {name: settings for name, _, settings in vms}
    for name, klass, settings in vms:
        outcome.settings[name] = _judge_vm(name, klass, settings, ctx, outcome)
    return outcome


def referenced_vms(vms: Sequence[tuple[str, str, dict[str, Any]]]) -> set[str]:
    """The names the settings of `vms` give to VM-reference properties (template, netvm, ...):
    the only existing VMs whose own properties `apply_policy` consults (`KnownVM`); for any
    other existing VM it needs no more than its class."""
    names: set[str] = set()
    for _, _, settings in vms:
        for key, value in settings.get("properties", {}).items():
            if policy.PROPERTY_POLICY.get(key, policy.NEVER).kind == "vm-ref" and value:
                names.add(str(value))
    return names


def _allowed(verdict: policy.Verdict, ctx: PolicyContext) -> bool:
    return verdict.kind == "restore" or (verdict.kind == "risk" and verdict.risk in ctx.allow)


def _left_out(outcome: PolicyOutcome, vm: str, what: str, verdict: policy.Verdict) -> None:
    why = f"needs --allow {verdict.risk}" if verdict.kind == "risk" else "never restored"
    outcome.left_out.append(f"{vm}: {what} not restored ({why})")


def _judge_vm(
    vm: str, klass: str, settings: dict[str, Any], ctx: PolicyContext, outcome: PolicyOutcome
) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for key, value in settings.get("properties", {}).items():
        verdict = policy.PROPERTY_POLICY.get(key, policy.NEVER)
        if verdict.kind == "vm-ref":
            target = _judge_reference(vm, klass, key, str(value), ctx, outcome)
            if target is not None:
                props[key] = target
                if target:
                    outcome.sensitive.append(f"{vm}: {key} = {target}")
            continue
        if not _allowed(verdict, ctx):
            _left_out(outcome, vm, f"property {shown(key, 60)}={shown(str(value), 40)}", verdict)
            continue
        if key == "virt_mode" and value == "pv" and "pv" not in ctx.allow:
            _left_out(outcome, vm, "property virt_mode=pv", policy.RISK("pv"))
            continue
        value = _bounded(vm, key, value, ctx, outcome)
        props[key] = value
        if verdict.sensitive:
            outcome.sensitive.append(f"{vm}: {key} = {value}")
    features: dict[str, str] = {}
    for key, value in settings.get("features", {}).items():
        verdict = policy.match(policy.FEATURE_POLICY, key)
        if _allowed(verdict, ctx):
            features[key] = value
            if verdict.sensitive:
                outcome.sensitive.append(f"{vm}: feature {key} = {shown(value, 40)}")
        else:
            _left_out(outcome, vm, f"feature {key}", verdict)
    tags: list[str] = []
    for tag in settings.get("tags", []):
        verdict = policy.match(policy.TAG_POLICY, tag)
        if _allowed(verdict, ctx):
            tags.append(tag)
            if verdict.sensitive:
                outcome.sensitive.append(f"{vm}: tag {tag} (qrexec policy may name it)")
        else:
            _left_out(outcome, vm, f"tag {tag}", verdict)
    devices = [d for d in settings.get("devices", []) if _judge_device(vm, d, ctx, outcome)]
    firewall = list(settings.get("firewall", []))
    if firewall:
        outcome.sensitive.append(f"{vm}: {len(firewall)} firewall rule(s)")
    return {**settings, "properties": props, "features": features, "tags": tags,
            "devices": devices, "firewall": firewall}  # fmt: skip


def _bounded(vm: str, key: str, value: Any, ctx: PolicyContext, outcome: PolicyOutcome) -> Any:
    """Numbers above the host's limit are lowered to it (and reported)."""
    limit = ctx.limits.get(key)
    number = as_int(value)
    if limit is None or number is None or number <= limit:
        return value
    outcome.left_out.append(f"{vm}: {key} lowered from {number} to this host's {limit}")
    return str(limit)


def _judge_reference(
    vm: str, klass: str, key: str, target: str, ctx: PolicyContext, outcome: PolicyOutcome
) -> str | None:
    """The reference to keep ("" for none), None to leave the property at its default."""
    if target == "":
        return "" if key == "netvm" else None
    if target == vm or target in ctx.untouchable or is_reserved(target):
        raise refuse(f"VM {vm}, property {key}", f"may not name {target}")
    if target in ctx.restored:
        target_class = ctx.restored[target]
        props = ctx.restored_settings.get(target, {}).get("properties", {})
        network = props.get("provides_network") in (True, "True")
        for_dispvms = props.get("template_for_dispvms") in (True, "True")
    elif target in ctx.existing:
        known = ctx.existing[target]
        target_class, network = known.klass, known.provides_network
        for_dispvms = known.template_for_dispvms
    else:
        outcome.left_out.append(f"{vm}: {key} {target} does not exist here; using the default")
        return None
    if target_class in ("AdminVM", "DispVM"):
        raise refuse(f"VM {vm}, property {key}", f"may not name the {target_class} {target}")
    if key == "template":
        wanted = TEMPLATE_CLASS.get(klass)
        if wanted is None or target_class != wanted:
            raise refuse(f"VM {vm}, property template", f"{target} is not a {wanted or 'template'}")
        if klass == "DispVM" and not for_dispvms:
            raise refuse(f"VM {vm}, property template", f"{target} is not a DispVM template")
    elif key == "netvm":
        if not network:
            raise refuse(f"VM {vm}, property netvm", f"{target} does not provide network")
    elif network:
        raise refuse(f"VM {vm}, property {key}", f"may not name the network VM {target}")
    elif key == "default_dispvm" and not for_dispvms:
        raise refuse(f"VM {vm}, property default_dispvm", f"{target} is not a DispVM template")
    return target


def _judge_device(
    vm: str, device: dict[str, Any], ctx: PolicyContext, outcome: PolicyOutcome
) -> bool:
    klass, backend = device["class"], device["backend"]
    verdict = policy.DEVICE_POLICY[klass]
    what = f"{klass} device {backend}:{device['ident']}"
    if klass == "pci" and backend != "dom0":
        raise refuse(f"VM {vm}", f"PCI device from {backend}: PCI devices come from dom0")
    if not _allowed(verdict, ctx):
        _left_out(outcome, vm, what, verdict)
        return False
    if klass == "pci":
        if "permissive" in device.get("options", {}) and "pci-permissive" not in ctx.allow:
            _left_out(outcome, vm, f"{what} (permissive)", policy.RISK("pci-permissive"))
            return False
    elif backend == "dom0":
        if "dom0-devices" not in ctx.allow:
            _left_out(outcome, vm, what, policy.RISK("dom0-devices"))
            return False
    elif (
        is_reserved(backend)
        or backend in ctx.untouchable
        or backend == vm
        or _class_of(backend, ctx) in (None, "DispVM")  # unknown, or short-lived (a worker)
    ):
        raise refuse(f"VM {vm}", f"{what}: backend {backend} may not serve devices here")
    if verdict.sensitive:
        outcome.sensitive.append(f"{vm}: {what}{_device_detail(device)}")
    return True


def _class_of(name: str, ctx: PolicyContext) -> str | None:
    """The class of a VM this run restores or dom0 already has; None for any other name."""
    if name in ctx.restored:
        return ctx.restored[name]
    known = ctx.existing.get(name)
    return known.klass if known is not None else None


def _device_detail(device: dict[str, Any]) -> str:
    """What a 4.3 assignment adds to its port: which device, and when it is attached."""
    words = [f"device {device['device_id']}"] if device.get("device_id", "*") != "*" else []
    if "mode" in device:
        words.append(str(device["mode"]))
    return f" ({', '.join(words)})" if words else ""


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
