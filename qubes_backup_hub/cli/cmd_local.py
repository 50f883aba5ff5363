"""`qbhub local ...`: building a LocalPlatform by hand (VMs, their settings and volumes)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from ..platform.base import VMSettings
from ..platform.local.platform import LocalPlatform
from ..platform.local.pools import parse_size
from ..progress import human_bytes
from ..safety.rollback import default_home

JSON_OPTION = click.option(
    "--json", "json_output", is_flag=True, help="Print machine-readable JSON."
)


@click.group()
def local() -> None:
    """Build the local platform by hand: VMs in a state file, volumes in $QBHUB_HOME/local."""


def _platform() -> LocalPlatform:
    return LocalPlatform(default_home())


def _vm_doc(platform: LocalPlatform, name: str) -> dict[str, Any]:
    settings = platform.vm_settings(name)
    summary = next(vm for vm in platform.list_vms() if vm.name == name)
    return {
        "name": name,
        "class": settings.klass,
        "state": summary.state,
        "pool": platform.vm_pool(name) if settings.klass != "AdminVM" else None,
        "properties": settings.properties,
        "features": settings.features,
        "tags": settings.tags,
        "devices": settings.devices,
        "firewall": settings.firewall,
        "notes": settings.notes,
        "volumes": [
            {"name": v.name, "size": v.size, "pool": v.pool, "path": v.path}
            for v in platform.vm_volumes(name)
        ],
    }


def _vm_text(doc: dict[str, Any]) -> str:
    props = " ".join(f"{k}={v}" for k, v in sorted(doc["properties"].items()))
    lines = [f"{doc['name']:<24} {doc['class']:<13} {doc['state']:<8} {props}"]
    for v in doc["volumes"]:
        lines.append(f"    {v['name']:<8} {human_bytes(v['size']):>10}  {v['path']}")
    if doc["features"]:
        feats = " ".join(f"{k}={v}" for k, v in sorted(doc["features"].items()))
        lines.append(f"    features: {feats}")
    if doc["tags"]:
        lines.append(f"    tags: {' '.join(doc['tags'])}")
    return "\n".join(lines)


def _emit(json_output: bool, result: Any, human: Callable[[Any], str]) -> None:
    if json_output:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        click.echo(human(result))


@local.command("vm-create")
@click.argument("name")
@click.option("--class", "klass", required=True, help="AppVM, TemplateVM, StandaloneVM or DispVM.")
@click.option("--template", help="The template (a TemplateVM; for a DispVM, an AppVM).")
@click.option("--label", required=True, help="red, orange, yellow, green, gray, blue, ...")
@click.option("--size", help="Size of each volume the VM owns, e.g. 64M or 2G.")
@click.option("--pool", default="default", show_default=True, help="Pool for its volumes.")
@JSON_OPTION
def vm_create(
    name: str,
    klass: str,
    template: str | None,
    label: str,
    size: str | None,
    pool: str,
    json_output: bool,
) -> None:
    """Create VM NAME with empty (sparse) volumes."""
    platform = _platform()
    properties = {"label": label, **({"template": template} if template else {})}
    platform.create_vm(
        VMSettings(name, klass, properties=properties),
        pool=pool,
        size=parse_size(size) if size is not None else None,
    )
    _emit(json_output, _vm_doc(platform, name), lambda d: f"Created {_vm_text(d)}")


@local.command("vm-set")
@click.argument("name")
@click.argument("prop", metavar="PROPERTY")
@click.argument("value")
@JSON_OPTION
def vm_set(name: str, prop: str, value: str, json_output: bool) -> None:
    """Set a property of VM NAME (label, template, netvm, memory, ...)."""
    platform = _platform()
    platform.update_vm(name, properties={prop: value})
    _emit(json_output, _vm_doc(platform, name), _vm_text)


@local.command("feature-set")
@click.argument("name")
@click.argument("key")
@click.argument("value")
@JSON_OPTION
def feature_set(name: str, key: str, value: str, json_output: bool) -> None:
    """Set feature KEY of VM NAME to VALUE."""
    platform = _platform()
    platform.update_vm(name, features={key: value})
    _emit(json_output, _vm_doc(platform, name), _vm_text)


@local.command("tag-add")
@click.argument("name")
@click.argument("tag")
@JSON_OPTION
def tag_add(name: str, tag: str, json_output: bool) -> None:
    """Add TAG to VM NAME."""
    platform = _platform()
    platform.update_vm(name, tags=[tag])
    _emit(json_output, _vm_doc(platform, name), _vm_text)


@local.command("vm-remove")
@click.argument("name")
@JSON_OPTION
def vm_remove(name: str, json_output: bool) -> None:
    """Remove VM NAME and its volumes."""
    platform = _platform()
    volumes = [v.name for v in platform.vm_volumes(name)]
    platform.remove_vm(name)
    result = {"removed": name, "volumes": volumes}
    _emit(json_output, result, lambda r: f"Removed {name} (volumes: {', '.join(volumes) or '-'})")


@local.command("list")
@JSON_OPTION
def list_vms(json_output: bool) -> None:
    """List every VM with its settings and volumes."""
    platform = _platform()
    docs = [_vm_doc(platform, vm.name) for vm in platform.list_vms()]
    _emit(json_output, {"vms": docs}, lambda r: "\n".join(_vm_text(d) for d in r["vms"]))
