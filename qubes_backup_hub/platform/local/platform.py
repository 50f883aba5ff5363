"""LocalPlatform: the platform interface on plain Linux, under `$QBHUB_HOME/local/`.

    state.json            every VM and its settings (see statefile)
    pools/POOL/VM/*.img   volumes (see pools)
    vms/VM/               each VM's home: the one directory its services can write
    dispvms/dispNNNN/     a disposable VM's home, deleted when its service ends
    logs/                 the services' stderr

dom0 is always there, as the AdminVM; it owns no volumes and runs no services.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ...errors import NotFoundError, UsageError
from ..base import Platform, VMSettings, VMSummary, VolumeInfo
from .pools import DEFAULT_SIZES, Pools, check_size, own_volumes
from .sandbox import Sandbox, SandboxedProcess, SandboxSpec, import_roots
from .services import ServiceTable, check_service_args
from .statefile import (
    ADMIN_VM,
    CREATABLE_CLASSES,
    DEFAULT_POOL,
    TEMPLATE_CLASS,
    StateFile,
    VMRecord,
    VMState,
    check_devices,
    check_feature,
    check_firewall,
    check_notes,
    check_pool_name,
    check_tag,
    check_vm_name,
    normalize_property,
)

ADMIN_SETTINGS = VMSettings(ADMIN_VM, "AdminVM", properties={"label": "black"})
# The restore worker is handed dom0's index cache directory (the native engine's, under this
# home) read-only at SEED_MOUNT, named in $SEED_ENV; see workers/restore.py.
RESTORE_WORKER = "qbhub.RestoreWorker"
INDEX_CACHE_DIR = "index-cache"
SEED_MOUNT = "/run/qbhub/index-cache"
SEED_ENV = "QBHUB_INDEX_CACHE_SEED"


class LocalPlatform(Platform):
    """VMs in a state file, volumes as files, VM services as sandboxed processes."""

    name = "local"

    def __init__(
        self,
        home: Path,
        *,
        sandbox: Sandbox | None = None,
        services: ServiceTable | None = None,
    ) -> None:
        self.home = home
        self.root = home / "local"
        self.state_file = StateFile(self.root / "state.json")
        self.pools = Pools(self.root / "pools")
        self.sandbox = sandbox if sandbox is not None else Sandbox()
        self.services = services if services is not None else ServiceTable()

    # --- VMs and settings -------------------------------------------------------------------

    def list_vms(self) -> list[VMSummary]:
        state = self.state_file.load()
        vms = [VMSummary(ADMIN_VM, "AdminVM", "Running")]
        vms += [VMSummary(n, state.vms[n].klass, "Halted") for n in sorted(state.vms)]
        return vms

    def vm_settings(self, vm: str) -> VMSettings:
        if vm == ADMIN_VM:
            return VMSettings(ADMIN_VM, "AdminVM", properties=dict(ADMIN_SETTINGS.properties))
        return self.state_file.load().get(vm).settings()

    def vm_pool(self, vm: str) -> str:
        """The pool holding `vm`'s volumes."""
        return self.state_file.load().get(vm).pool

    def vm_volumes(self, vm: str) -> list[VolumeInfo]:
        if vm == ADMIN_VM:
            return []
        record = self.state_file.load().get(vm)
        return [
            VolumeInfo(
                vm=vm,
                name=volume,
                size=self.pools.volume_size(record.pool, vm, volume),
                pool=record.pool,
                path=str(self.pools.volume_path(record.pool, vm, volume)),
                pool_driver=self.pools.driver,
            )
            for volume in own_volumes(record.klass)
        ]

    def create_vm(
        self, settings: VMSettings, *, pool: str | None = None, size: int | None = None
    ) -> None:
        """Create the VM with its label (and template), and its own volumes, empty and sparse.

        `size` sets every volume the VM owns; by default private is 2 GiB and root 10 GiB.
        """
        name = check_vm_name(settings.name)
        if settings.klass not in CREATABLE_CLASSES:
            raise UsageError(
                f"can't create a VM of class {settings.klass[:40]!r}: "
                f"use {', '.join(CREATABLE_CLASSES)}"
            )
        pool = check_pool_name(pool or DEFAULT_POOL)
        sizes = {v: check_size(size) if size is not None else DEFAULT_SIZES[v]
                 for v in own_volumes(settings.klass)}  # fmt: skip
        with self.state_file.edit() as state:
            if name in state.vms:
                raise UsageError(f"a VM named {name!r} already exists")
            record = VMRecord(name=name, klass=settings.klass, pool=pool)
            label = settings.properties.get("label")
            if not label:
                raise UsageError(f"VM {name}: a label is required")
            record.properties["label"] = normalize_property(state, record, "label", label)
            template = settings.properties.get("template")
            if settings.klass in TEMPLATE_CLASS or template:
                if not template:
                    raise UsageError(f"a {settings.klass} needs a template")
                record.properties["template"] = normalize_property(
                    state, record, "template", template
                )
            try:
                self.pools.create_volumes(pool, name, sizes)
                self.vm_home(name).mkdir(parents=True, exist_ok=True, mode=0o700)
            except BaseException:
                self.pools.remove_vm(pool, name)
                raise
            state.vms[name] = record

    def apply_settings(self, settings: VMSettings) -> list[str]:
        """Apply every setting that is valid here; return one line per setting that was not."""
        with self.state_file.edit() as state:
            record = state.get(settings.name)
            failed = []
            if settings.klass != record.klass:
                failed.append(f"class: is {record.klass}, can't become {settings.klass}")
            failed += _apply_items(
                state, record, settings.properties, settings.features, settings.tags
            )
            try:
                record.devices = check_devices(settings.devices)
            except UsageError as exc:
                failed.append(f"devices: {exc}")
            try:
                record.firewall = check_firewall(settings.firewall)
            except UsageError as exc:
                failed.append(f"firewall: {exc}")
            try:
                record.notes = check_notes(settings.notes)
            except UsageError as exc:
                failed.append(f"notes: {exc}")
        return failed

    def update_vm(
        self,
        vm: str,
        *,
        properties: Mapping[str, Any] | None = None,
        features: Mapping[str, str] | None = None,
        tags: Sequence[str] = (),
    ) -> VMSettings:
        """Change just these settings, all or nothing; UsageError says what was refused."""
        if vm == ADMIN_VM:
            raise UsageError("dom0's settings can't be changed here")
        with self.state_file.edit() as state:
            record = state.get(vm)
            failed = _apply_items(state, record, properties or {}, features or {}, tags)
            if failed:
                raise UsageError(f"VM {vm}: " + "; ".join(failed))
            return record.settings()

    def import_volume(self, vm: str, volume: str, size: int, data: IO[bytes]) -> None:
        record = self.state_file.load().get(vm)
        if volume not in own_volumes(record.klass):
            raise NotFoundError(f"a {record.klass} owns no volume {volume[:40]!r}")
        self.pools.import_volume(record.pool, vm, volume, size, data)

    def resize_volume(self, vm: str, volume: str, size: int) -> None:
        record = self.state_file.load().get(vm)
        if volume not in own_volumes(record.klass):
            raise NotFoundError(f"a {record.klass} owns no volume {volume[:40]!r}")
        self.pools.resize_volume(record.pool, vm, volume, size)

    def clone_volume(self, src_vm: str, dst_vm: str, volume: str) -> None:
        state = self.state_file.load()
        src, dst = state.get(src_vm), state.get(dst_vm)
        for record in (src, dst):
            if volume not in own_volumes(record.klass):
                raise NotFoundError(f"a {record.klass} owns no volume {volume[:40]!r}")
        self.pools.clone_volume(src.pool, src_vm, dst.pool, dst_vm, volume)

    def remove_vm(self, vm: str) -> None:
        if vm == ADMIN_VM:
            raise UsageError("dom0 can't be removed")
        with self.state_file.edit() as state:
            record = state.get(vm)
            users = state.dependents(vm)
            if users:
                raise UsageError(f"VM {vm} is still used by {', '.join(users)}")
            del state.vms[vm]
        self.pools.remove_vm(record.pool, vm)
        shutil.rmtree(self.vm_home(vm), ignore_errors=True)

    # --- services -------------------------------------------------------------------------

    def vm_home(self, vm: str) -> Path:
        """The VM's own directory: its services' $HOME, the one place they can write."""
        return self.root / "vms" / check_vm_name(vm)

    def call_service(self, vm: str, service: str, args: Sequence[str] = ()) -> SandboxedProcess:
        if vm == ADMIN_VM:
            raise UsageError("services run in VMs, not in dom0")
        self.state_file.load().get(vm)
        spec = self._spec(vm, service, args)
        spec.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self._start(spec, f"{vm}.log")

    def host_limits(self) -> dict[str, int]:
        """This machine's memory and CPUs: a restored VM asks for no more than the host has."""
        limits = {"vcpus": os.cpu_count() or 1}
        with (
            contextlib.suppress(OSError, ValueError, IndexError),
            open("/proc/meminfo", encoding="ascii") as meminfo,
        ):
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    limits["memory"] = limits["maxmem"] = int(line.split()[1]) // 1024
        return limits

    def dispvm_service(self, service: str, args: Sequence[str] = ()) -> SandboxedProcess:
        parent = self.root / "dispvms"
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        while True:
            name = f"disp{secrets.randbelow(9000) + 1000}"
            spec = self._spec(name, service, args, home=parent / name)
            try:
                spec.home.mkdir(mode=0o700)
                break
            except FileExistsError:
                continue
        home = spec.home
        return self._start(
            spec, "dispvms.log", on_exit=lambda: shutil.rmtree(home, ignore_errors=True)
        )

    def _spec(
        self, vm: str, service: str, args: Sequence[str], home: Path | None = None
    ) -> SandboxSpec:
        module = self.services.resolve(service)
        args = check_service_args(args)
        extra = tuple(p.resolve() for p in module.python_path)
        ro_paths = import_roots() + extra
        root = self.root.resolve()
        masks = (root,) if any(root.is_relative_to(p) for p in ro_paths) else ()
        env: tuple[tuple[str, str], ...] = (
            ("QREXEC_REMOTE_DOMAIN", ADMIN_VM),
            ("QREXEC_SERVICE_FULL_NAME", "+".join((service, *args[:1]))),
            ("QBHUB_VM", vm),
        )
        ro_binds: tuple[tuple[Path, str], ...] = ()
        seed = self.home / INDEX_CACHE_DIR
        if service == RESTORE_WORKER and seed.is_dir():
            # Read-only: the worker (untrusted) may read what it could derive with its grant,
            # and must never write dom0's file. Unsandboxed, it sees the host path itself.
            if self.sandbox.sandboxed:
                ro_binds, env = ((seed.resolve(), SEED_MOUNT),), (*env, (SEED_ENV, SEED_MOUNT))
            else:
                env = (*env, (SEED_ENV, str(seed.resolve())))
        return SandboxSpec(
            module=module.module,
            home=(home or self.vm_home(vm)).resolve(),
            args=args,
            ro_paths=ro_paths,
            python_path=extra,
            masks=masks,
            ro_binds=ro_binds,
            env=env,
        )

    def _start(
        self, spec: SandboxSpec, log_name: str, on_exit: Callable[[], None] | None = None
    ) -> SandboxedProcess:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(logs / log_name, "ab") as log:
            return self.sandbox.start(spec, stderr=log, on_exit=on_exit)


def _apply_items(
    state: VMState,
    record: VMRecord,
    properties: Mapping[str, Any],
    features: Mapping[str, str],
    tags: Sequence[str],
) -> list[str]:
    """Set properties and features and add tags on `record`; return what was refused."""
    failed: list[str] = []
    for key, value in properties.items():
        try:
            record.properties[key] = normalize_property(state, record, key, value)
        except UsageError as exc:
            failed.append(f"property {str(key)[:40]}: {exc}")
    for key, value in features.items():
        try:
            check_feature(key, value)
            record.features[key] = value
        except UsageError as exc:
            failed.append(f"feature {str(key)[:40]}: {exc}")
    for tag in tags:
        try:
            if check_tag(tag) not in record.tags:
                record.tags.append(tag)
        except UsageError as exc:
            failed.append(f"tag: {exc}")
    return failed
