"""QubesPlatform: the Platform interface on a real dom0, through the Admin API and qrexec.

Metadata goes through qubesd (`adminapi.py` over `wire.py`); volume data is read straight from
the pool's storage (paths below) and written back with ImportWithSize (`importer.py`).

Volume paths, as the Qubes 4.2 pool drivers lay volumes out (qubes/storage/lvm.py and
reflink.py in qubes-core-admin):
- lvm_thin: the volume's vid is ``VG/vm-NAME-VOL`` and its device ``/dev/VG/vm-NAME-VOL``
  (e.g. /dev/qubes_dom0/vm-work-private); a running VM writes to a separate -snap volume, so
  this device holds the state of the last clean shutdown.
- file-reflink: the vid is relative to the pool's dir_path (``appvms/NAME/private``,
  ``vm-templates/NAME/root``) and the committed image is ``DIR_PATH/VID.img``; a running VM
  writes to ``VID-dirty.img``.

Services in VMs are started with dom0's `qrexec-client -d VM DEFAULT:QUBESRPC SERVICE+ARG dom0`,
the call qubesadmin itself makes for `qvm-run --service`: binary-clean stdin/stdout pipes, the
remote exit status, no terminal filtering and no extra Python layer. The VM is started first
(admin.vm.Start). A DispVM service gets a fresh admin.vm.CreateDisposable VM, which is killed
when the service ends (Qubes then removes it: auto_cleanup).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Sequence
from typing import IO

from ...errors import NotFoundError, UsageError
from ..base import (
    PERSISTENT_VOLUMES,
    Platform,
    ServiceProcess,
    VMSettings,
    VMSummary,
    VolumeInfo,
)
from .adminapi import DEVICE_CLASSES_42, AdminApi, Assignment, Property
from .importer import IMPORT_SERVICE, import_with_size, needs_sudo
from .wire import DEFAULT_SOCKET, QubesApiError, QubesdSocket

QREXEC_CLIENT = "/usr/lib/qubes/qrexec-client"
SERVICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SERVICE_ARG = re.compile(r"[A-Za-z0-9_.-]{1,64}")
VID_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
# Properties that describe the running instance or identity, never restored.
RUNTIME_PROPERTIES = {
    "name",
    "qid",
    "uuid",
    "xid",
    "stubdom_xid",
    "start_time",
    "backup_timestamp",
    "icon",
    "klass",
    "type",
    "installed_by_rpm",
    "dns",
    "gateway",
    "gateway6",
    "visible_ip",
    "visible_ip6",
    "visible_gateway",
    "visible_gateway6",
    "visible_netmask",
    "ip",
    "ip6",
    "mac",
    "updateable",
    "dispid",
    "auto_cleanup",
    "stubdom_mem",
}
ALWAYS_RECORDED = ("label", "template", "netvm")
# Tags Qubes manages itself; copying them would lie about who created the VM.
MANAGED_TAG_PREFIXES = ("created-by-", "disp-created-by-", "audiovm-", "guivm-", "relayvm-")


def property_value(prop: Property) -> object:
    if prop.type == "bool":
        return prop.value == "True"
    if prop.type == "int":
        return int(prop.value) if prop.value else None
    return prop.value


def volume_path(call: str, driver: str, pool: dict[str, str], vid: str) -> str:
    """Where the committed data of a volume lives, refusing vids that could escape the pool."""
    parts = vid.split("/")
    if not parts or any(not VID_PART.fullmatch(p) or p in (".", "..") for p in parts):
        raise QubesApiError(call, "Malformed", f"refused volume id {vid[:80]!r}")
    if driver == "lvm_thin":
        if len(parts) != 2 or parts[0] != pool.get("volume_group"):
            raise QubesApiError(call, "Malformed", f"vid {vid!r} is not in the pool's VG")
        return f"/dev/{vid}"
    if driver in ("file-reflink", "file"):
        base = pool.get("dir_path", "")
        if not base.startswith("/") or ".." in base.split("/"):
            raise QubesApiError(call, "Malformed", f"bad pool dir_path {base[:80]!r}")
        return f"{base.rstrip('/')}/{vid}.img"
    raise QubesApiError(call, "Unsupported", f"pool driver {driver!r} is not supported")


class QrexecProcess(ServiceProcess):
    """A qrexec-client process; a `dispvm` it runs in is killed once the process has ended."""

    def __init__(
        self, argv: Sequence[str], dispvm: str | None = None, api: AdminApi | None = None
    ) -> None:
        try:
            self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as e:
            raise QubesApiError("qrexec", "Connection", f"cannot run {argv[0]}: {e}") from None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin = self.proc.stdin
        self.stdout = self.proc.stdout
        self._dispvm = dispvm
        self._api = api

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout)
        self._cleanup()
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._dispvm and self._api:
            name, self._dispvm = self._dispvm, None
            try:
                self._api.vm_kill(name)
            except QubesApiError as e:
                if e.exc_type != "QubesVMNotStartedError":
                    raise


class QubesPlatform(Platform):
    """The platform on a Qubes 4.2 dom0."""

    name = "qubes"

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        *,
        qrexec_client: str = QREXEC_CLIENT,
        import_service: Sequence[str] = (IMPORT_SERVICE,),
        import_sudo: bool | None = None,
        dispvm_template: str = "dom0",
    ) -> None:
        self.api = AdminApi(QubesdSocket(socket_path))
        self.qrexec_client = qrexec_client
        self.import_service = tuple(import_service)
        self.import_sudo = needs_sudo() if import_sudo is None else import_sudo
        self.dispvm_template = dispvm_template

    # reading
    def list_vms(self) -> list[VMSummary]:
        return [VMSummary(n, k, s) for n, k, s in self.api.vm_list()]

    def _klass(self, vm: str) -> str:
        for name, klass, _ in self.api.vm_list():
            if name == vm:
                return klass
        raise NotFoundError(f"no such VM: {vm!r}")

    def vm_settings(self, vm: str) -> VMSettings:
        klass = self._klass(vm)
        props = self.api.property_get_all(vm)
        settings = VMSettings(name=vm, klass=klass)
        for name, prop in props.items():
            if name in RUNTIME_PROPERTIES:
                continue
            if not prop.is_default or name in ALWAYS_RECORDED:
                settings.properties[name] = property_value(prop)
        if klass == "AdminVM":
            return settings
        settings.features = {f: self.api.feature_get(vm, f) for f in self.api.feature_list(vm)}
        settings.tags = self.api.tag_list(vm)
        for devclass in DEVICE_CLASSES_42:
            for a in self.api.device_list(vm, devclass):
                if a.persistent:
                    settings.devices.append(
                        {
                            "class": a.devclass,
                            "backend": a.backend,
                            "ident": a.ident,
                            "options": dict(a.options),
                            "required": True,
                        }
                    )
        settings.firewall = self.api.firewall_get(vm)
        settings.notes = self._notes(vm)
        return settings

    def _notes(self, vm: str) -> str:
        try:
            return self.api.notes_get(vm)
        except QubesApiError as e:
            if e.exc_type == "NoResponse":  # Qubes 4.2 has no admin.vm.notes.* calls
                return ""
            raise

    def vm_volumes(self, vm: str) -> list[VolumeInfo]:
        klass = self._klass(vm)
        wanted = PERSISTENT_VOLUMES.get(klass, ())
        present = set(self.api.volume_list(vm))
        pools: dict[str, dict[str, str]] = {}
        out = []
        for volume in wanted:
            if volume not in present:
                continue
            call = f"admin.vm.volume.Info+{volume} on {vm}"
            info = self.api.volume_info(vm, volume)
            if info.get("save_on_stop") != "True":
                continue  # not persistent after all (e.g. a DispVM's private)
            pool = info.get("pool", "")
            if pool not in pools:
                pools[pool] = self.api.pool_info(pool)
            driver = pools[pool].get("driver", "")
            size = info.get("size", "")
            if not re.fullmatch(r"[0-9]{1,19}", size):
                raise QubesApiError(call, "Malformed", f"bad volume size {size[:40]!r}")
            path = volume_path(call, driver, pools[pool], info.get("vid", ""))
            out.append(VolumeInfo(vm, volume, int(size), pool, path, driver))
        return out

    # writing
    def create_vm(self, settings: VMSettings, *, pool: str | None = None) -> None:
        if settings.klass not in PERSISTENT_VOLUMES or settings.klass == "DispVM":
            raise UsageError(f"cannot create a VM of class {settings.klass!r}")
        label = str(settings.properties.get("label") or "red")
        template = str(settings.properties.get("template") or "")
        if settings.klass in ("TemplateVM", "StandaloneVM"):
            template = ""
        self.api.vm_create(settings.klass, settings.name, label, template, pool or "")

    def apply_settings(self, settings: VMSettings) -> list[str]:
        vm, failed = settings.name, []

        def attempt(what: str, action: object, *args: object) -> None:
            try:
                action(*args)  # type: ignore[operator]
            except QubesApiError as e:
                failed.append(f"{what}: {e.exc_type}: {e.message}")

        for name, value in settings.properties.items():
            if name in RUNTIME_PROPERTIES or (name == "template" and settings.klass != "AppVM"):
                continue
            text = "" if value is None else str(value)
            attempt(f"property {name}", self.api.property_set, vm, name, text)
        for key, value in settings.features.items():
            attempt(f"feature {key}", self.api.feature_set, vm, key, value)
        for tag in settings.tags:
            if not tag.startswith(MANAGED_TAG_PREFIXES):
                attempt(f"tag {tag}", self.api.tag_set, vm, tag)
        for dev in settings.devices:
            a = Assignment(
                str(dev["class"]),
                str(dev["backend"]),
                str(dev["ident"]),
                {str(k): str(v) for k, v in dict(dev.get("options", {})).items()},
                True,
            )
            attempt(f"device {a.devclass}:{a.backend}+{a.ident}", self.api.device_attach, vm, a)
        if settings.firewall:
            attempt("firewall", self.api.firewall_set, vm, settings.firewall)
        if settings.notes:
            attempt("notes", self.api.notes_set, vm, settings.notes)
        return failed

    def import_volume(self, vm: str, volume: str, size: int, data: IO[bytes]) -> None:
        if volume not in self.api.volume_list(vm):
            raise NotFoundError(f"VM {vm!r} has no volume {volume!r}")
        import_with_size(self.import_service, vm, volume, size, data, sudo=self.import_sudo)

    def resize_volume(self, vm: str, volume: str, size: int) -> None:
        current = int(self.api.volume_info(vm, volume).get("size", "0") or 0)
        if size < current:
            raise UsageError(
                f"volume {vm}:{volume} is {current} bytes; shrinking it to {size} is refused"
            )
        if size > current:
            self.api.volume_resize(vm, volume, size)

    def clone_volume(self, src_vm: str, dst_vm: str, volume: str) -> None:
        self.api.volume_clone(src_vm, dst_vm, volume)

    def remove_vm(self, vm: str) -> None:
        self.api.vm_remove(vm)

    # services
    def _service_argv(self, vm: str, service: str, args: Sequence[str]) -> list[str]:
        if not SERVICE_NAME.fullmatch(service) or any(not SERVICE_ARG.fullmatch(a) for a in args):
            raise UsageError(f"invalid qrexec service or argument: {service!r} {list(args)!r}")
        full = service + "".join("+" + a for a in args)
        return [self.qrexec_client, "-d", vm, f"DEFAULT:QUBESRPC {full} dom0"]

    def _start(self, vm: str) -> None:
        try:
            self.api.vm_start(vm)
        except QubesApiError as e:
            if e.exc_type != "QubesVMNotHaltedError":  # already running
                raise

    def call_service(self, vm: str, service: str, args: Sequence[str] = ()) -> ServiceProcess:
        argv = self._service_argv(vm, service, args)
        self._start(vm)
        return QrexecProcess(argv)

    def dispvm_service(self, service: str, args: Sequence[str] = ()) -> ServiceProcess:
        self._service_argv("dom0", service, args)  # validate before creating anything
        name = self.api.create_disposable(self.dispvm_template)
        try:
            # The default DispVM template usually has network; a worker parsing hostile data
            # must not: cut it before the DispVM starts.
            self.api.property_set(name, "netvm", "")
            self._start(name)
            return QrexecProcess(self._service_argv(name, service, args), name, self.api)
        except BaseException:
            with contextlib.suppress(QubesApiError):
                self.api.vm_kill(name)
            raise
