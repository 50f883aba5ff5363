"""Keeping the VMs that `restore --replace` removes (or whose data `--data-only` overwrites)
until the restore has succeeded.

Qubes cannot rename a VM, and a restored VM takes the name of the one it replaces, so the old VM
must be removed before the new one is created. Before that, each replaced VM's persistent volumes
are cloned into a *holder*: a StandaloneVM named ``qbk-NAME`` (a StandaloneVM owns both root and
private, so it can hold the volumes of any class; a clone is cheap on reflink and thin pools).
If the restore then fails, every replaced VM is created again from its recorded settings, its
volumes are cloned back from the holder, and the holder is removed. If the restore succeeds, the
holders are removed. A VM that cannot be brought back keeps its data in its holder, and the error
says which. `--data-only` keeps the VM itself and overwrites its volumes one by one, so a restore
that fails between two of them (storage failing, a worker lying the second time) would leave a
mix of old and new volumes: its holders are cloned back over every volume instead (`put_back`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..errors import QbhubError
from ..platform.base import Platform, VMSettings
from ..safety.vm_rules import check_vm_name, dependency_order

HOLDER_CLASS = "StandaloneVM"
MAX_VM_NAME = 31


class RecoveryError(QbhubError):
    """A failed --replace restore could not bring every replaced VM back."""


@dataclass(frozen=True)
class HeldVM:
    """A VM about to be replaced: its settings, pool, volumes, and the holder of its data."""

    name: str
    holder: str
    settings: VMSettings
    pool: str | None
    volumes: tuple[str, ...]


def holder_name(name: str, taken: set[str]) -> str:
    """A free, valid VM name for the holder of `name`: ``qbk-NAME``, else ``qbkN-NAME``."""
    for n in range(1000):
        prefix = "qbk-" if n == 0 else f"qbk{n}-"
        candidate = (prefix + name)[:MAX_VM_NAME]
        if candidate in taken or candidate.endswith("-dm"):
            continue
        with contextlib.suppress(QbhubError):
            return check_vm_name(candidate, "holder VM")
    raise QbhubError(f"no free name for a VM to hold {name}'s data")


def hold_vms(platform: Platform, names: list[str]) -> list[HeldVM]:
    """Clone the persistent volumes of each VM in `names` into a new holder VM."""
    taken = {vm.name for vm in platform.list_vms()}
    held: list[HeldVM] = []
    try:
        for name in names:
            settings = platform.vm_settings(name)
            volumes = platform.vm_volumes(name)
            holder = holder_name(name, taken)
            taken.add(holder)
            label = str(settings.properties.get("label") or "red")
            pool = volumes[0].pool if volumes else None
            platform.create_vm(VMSettings(holder, HOLDER_CLASS, {"label": label}), pool=pool)
            held.append(HeldVM(name, holder, settings, pool, tuple(v.name for v in volumes)))
            for volume in volumes:
                platform.clone_volume(name, holder, volume.name)
    except BaseException:
        release(platform, held)
        raise
    return held


def release(platform: Platform, held: list[HeldVM]) -> list[str]:
    """Remove the holders; return those that could not be removed."""
    left = []
    for h in held:
        try:
            platform.remove_vm(h.holder)
        except QbhubError:
            left.append(h.holder)
    return left


def bring_back(platform: Platform, held: list[HeldVM]) -> list[str]:
    """Recreate each held VM (templates first), clone its data back, re-apply its settings.

    Returns one line per VM that could not be brought back (its holder is then kept).
    """
    problems: list[str] = []
    back: list[HeldVM] = []
    for h in dependency_order(held, lambda h: h.name, lambda h: h.settings.properties):
        try:
            platform.create_vm(h.settings, pool=h.pool)
        except QbhubError as exc:
            problems.append(f"{h.name}: {exc}; its data is kept in VM {h.holder}")
            continue
        try:
            for volume in h.volumes:
                platform.clone_volume(h.holder, h.name, volume)
        except QbhubError as exc:
            problems.append(f"{h.name}: {exc}; its data is kept in VM {h.holder}")
            with contextlib.suppress(QbhubError):
                platform.remove_vm(h.name)
            continue
        back.append(h)
    for h in back:  # every VM exists again before any refers to another (netvm, ...)
        problems += [
            f"{h.name}: setting not restored: {f}" for f in platform.apply_settings(h.settings)
        ]
    problems += [f"holder VM {name} could not be removed" for name in release(platform, back)]
    return problems


def put_back(platform: Platform, held: list[HeldVM]) -> list[str]:
    """After a failed --data-only restore: clone every held volume back over the VM's own.

    Returns one line per VM that could not be put back (its holder is then kept).
    """
    problems: list[str] = []
    back: list[HeldVM] = []
    for h in held:
        try:
            for volume in h.volumes:
                platform.clone_volume(h.holder, h.name, volume)
        except QbhubError as exc:
            problems.append(f"{h.name}: {exc}; its data is kept in VM {h.holder}")
            continue
        back.append(h)
    problems += [f"holder VM {name} could not be removed" for name in release(platform, back)]
    return problems
