"""QubesPlatform: the Platform interface on a real dom0, through the Admin API and qrexec.

Metadata goes through qubesd (`adminapi.py` over `wire.py`); volume data is read straight from
the pool's storage (paths below) and written back with ImportWithSize (`importer.py`).

Qubes 4.2 and 4.3 are both spoken; which one this dom0 runs is read from qubesd (the device API
answers `.Assigned` on 4.3 and `.List` on 4.2), and so are the device classes
(admin.deviceclass.List: only the installed extensions' classes). Settings: QBHUB_QUBESD_SOCKET,
QBHUB_QREXEC_CLIENT and QBHUB_QUBES_IMPORT_SERVICE override the socket, the qrexec client and the
ImportWithSize service (constructor arguments win over them), so the same CLI runs against any
qubesd.

Volume paths, as the Qubes 4.2/4.3 pool drivers lay volumes out (qubes/storage/lvm.py,
reflink.py and file.py in qubes-core-admin):
- lvm_thin: the volume's vid is ``VG/vm-NAME-VOL`` and its device ``/dev/VG/vm-NAME-VOL``
  (e.g. /dev/qubes_dom0/vm-work-private); a running VM writes to a separate -snap volume, so
  this device holds the state of the last clean shutdown.
- file-reflink: the vid is relative to the pool's dir_path (``appvms/NAME/private``,
  ``vm-templates/NAME/root``) and the committed image is ``DIR_PATH/VID.img``; a running VM
  writes to ``VID-dirty.img``.
- file (legacy, a default 4.2 install on ext4): ``DIR_PATH/VID.img`` too, but a running VM writes
  into that very file (its driver refuses to export running volumes), so it is read only while
  the VM is halted.

Services in VMs are started with dom0's
`qrexec-client -d VM -w QREXEC_TIMEOUT DEFAULT:QUBESRPC SERVICE+ARG dom0`, the call qubesadmin
itself makes for `qvm-run --service` (`-w` the VM's qrexec_timeout, as qubesadmin's run_service
passes it): binary-clean stdin/stdout pipes, the remote exit status, no terminal filtering and no
extra Python layer. The VM is started first (admin.vm.Start). A DispVM service gets a fresh
admin.vm.CreateDisposable VM, which is killed when the service ends (Qubes then removes it:
auto_cleanup).
"""

from __future__ import annotations

import contextlib
import os
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
from .adminapi import AdminApi, Assignment, Property
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
    "stubdom_uuid",
    "updateable",
    "dispid",
    "auto_cleanup",
}
# Recorded even at their default: a restore needs them to create the VM. netvm is not among
# them: a VM whose netvm follows default_netvm must keep following it (recording the current
# value would pin it), so it is recorded only when set explicitly, as qvm-backup does.
ALWAYS_RECORDED = ("label", "template")
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
                # Not running (it never started, or stopped by itself): Qubes' auto_cleanup
                # removes a DispVM when it stops, which may not have happened; make sure.
                with contextlib.suppress(QubesApiError):
                    self._api.vm_remove(name)


class QubesPlatform(Platform):
    """The platform on a Qubes 4.2 dom0."""

    name = "qubes"

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        qrexec_client: str | None = None,
        import_service: Sequence[str] | None = None,
        import_sudo: bool | None = None,
        dispvm_template: str = "dom0",
    ) -> None:
        env = os.environ
        self.api = AdminApi(QubesdSocket(socket_path or configured_socket()))
        self.qrexec_client = qrexec_client or env.get("QBHUB_QREXEC_CLIENT") or QREXEC_CLIENT
        if import_service is None:
            import_service = (env.get("QBHUB_QUBES_IMPORT_SERVICE") or IMPORT_SERVICE,)
        self.import_service = tuple(import_service)
        if import_sudo is None:  # dom0's own service runs as root; another one as it is
            import_sudo = needs_sudo() and self.import_service == (IMPORT_SERVICE,)
        self.import_sudo = import_sudo
        self.dispvm_template = dispvm_template
        self._version: str | None = None
        self._classes: list[str] | None = None

    # what this qubesd speaks
    @property
    def api_version(self) -> str:
        """The Qubes release ("4.2" or "4.3") as read from qubesd: the device API it answers."""
        if self._version is None:
            try:
                self.api.device_assigned("dom0", "pci")
                self._version = "4.3"
            except QubesApiError as e:
                if e.exc_type != "NoResponse":
                    raise
                self.api.device_list("dom0", "pci")  # 4.2's; if this fails too, say so
                self._version = "4.2"
        return self._version

    @property
    def device_classes(self) -> list[str]:
        """The device classes this dom0 has (admin.deviceclass.List)."""
        if self._classes is None:
            self._classes = self.api.deviceclass_list()
        return self._classes

    # reading
    def list_vms(self) -> list[VMSummary]:
        return [VMSummary(n, k, s) for n, k, s in self.api.vm_list()]

    def _klass(self, vm: str) -> str:
        return self._summary(vm).klass

    def _summary(self, vm: str) -> VMSummary:
        for name, klass, state in self.api.vm_list():
            if name == vm:
                return VMSummary(name, klass, state)
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
        settings.devices = [self._device_record(a) for a in self._assignments(vm)]
        settings.firewall = self.api.firewall_get(vm)
        # Qubes 4.2 has no admin.vm.notes.* calls
        settings.notes = self.api.notes_get(vm) if self.api_version != "4.2" else ""
        return settings

    def _assignments(self, vm: str) -> list[Assignment]:
        """The VM's persistent device assignments, in every device class this dom0 has."""
        out: list[Assignment] = []
        for devclass in self.device_classes:
            if self.api_version == "4.2":
                out += [a for a in self.api.device_list(vm, devclass) if a.persistent]
            else:
                out += self.api.device_assigned(vm, devclass)
        return out

    def _device_record(self, a: Assignment) -> dict[str, object]:
        """An assignment as recorded; on 4.3 with its device_id and mode (4.2 has neither)."""
        record: dict[str, object] = {
            "class": a.devclass,
            "backend": a.backend,
            "ident": a.ident,
            "options": dict(a.options),
            "required": a.mode == "required",
        }
        if self.api_version != "4.2":
            record.update(device_id=a.device_id, mode=a.mode)
        return record

    def vm_volumes(self, vm: str) -> list[VolumeInfo]:
        summary = self._summary(vm)
        wanted = PERSISTENT_VOLUMES.get(summary.klass, ())
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
            if driver == "file" and summary.state != "Halted":
                raise UsageError(
                    f"VM {vm} is {summary.state.lower()} and its volume {volume} is in the legacy "
                    f"'file' pool {pool}, whose running volumes cannot be read consistently (the "
                    "driver refuses to export them); shut the VM down first"
                )
            size = info.get("size", "")
            if not re.fullmatch(r"[0-9]{1,19}", size):
                raise QubesApiError(call, "Malformed", f"bad volume size {size[:40]!r}")
            path = volume_path(call, driver, pools[pool], info.get("vid", ""))
            out.append(VolumeInfo(vm, volume, int(size), pool, path, driver))
        return out

    # writing
    def create_vm(self, settings: VMSettings, *, pool: str | None = None) -> None:
        """admin.vm.Create.CLASS (CreateInPool with a pool); a named DispVM is created from its
        DispVM template. No template: qubesd takes default_template (default_dispvm for a
        DispVM), as qvm-backup-restore does."""
        if settings.klass not in PERSISTENT_VOLUMES:
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
                str(dev.get("device_id", "*")),
                device_mode(dev),
            )
            what = f"device {a.devclass}:{a.backend}+{a.ident}"
            if a.devclass not in self.device_classes:
                failed.append(f"{what}: this dom0 has no {a.devclass} device class")
            elif self.api_version == "4.2" and (why := unsupported_in_42(a)):
                failed.append(f"{what}: {why}")
            elif self.api_version == "4.2":
                attempt(what, self.api.device_attach, vm, a)
            else:
                attempt(what, self.api.device_assign, vm, a)
        if settings.firewall:
            attempt("firewall", self.api.firewall_set, vm, settings.firewall)
        if settings.notes and self.api_version == "4.2":
            failed.append("notes: Qubes 4.2 keeps no VM notes (admin.vm.notes.* is 4.3's)")
        elif settings.notes:
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
    def _service_argv(
        self, vm: str, service: str, args: Sequence[str], timeout: int | None = None
    ) -> list[str]:
        if not SERVICE_NAME.fullmatch(service) or any(not SERVICE_ARG.fullmatch(a) for a in args):
            raise UsageError(f"invalid qrexec service or argument: {service!r} {list(args)!r}")
        full = service + "+" + "+".join(args)  # qubesadmin sends the "+" even without argument
        wait = ["-w", str(timeout)] if timeout else []
        return [self.qrexec_client, "-d", vm, *wait, f"DEFAULT:QUBESRPC {full} dom0"]

    def _qrexec_timeout(self, vm: str) -> int | None:
        """The VM's qrexec_timeout, which qubesadmin passes to qrexec-client as `-w`."""
        value = self.api.property_get(vm, "qrexec_timeout").value
        return int(value) if value.isdigit() and int(value) > 0 else None

    def _start(self, vm: str) -> None:
        try:
            self.api.vm_start(vm)
        except QubesApiError as e:
            if e.exc_type != "QubesVMNotHaltedError":  # already running
                raise

    def call_service(self, vm: str, service: str, args: Sequence[str] = ()) -> ServiceProcess:
        self._service_argv(vm, service, args)  # validate before starting anything
        argv = self._service_argv(vm, service, args, self._qrexec_timeout(vm))
        self._start(vm)
        return QrexecProcess(argv)

    def dispvm_service(self, service: str, args: Sequence[str] = ()) -> ServiceProcess:
        self._service_argv("dom0", service, args)  # validate before creating anything
        name = self.api.create_disposable(self.dispvm_template)
        try:
            # The default DispVM template usually has network; a worker parsing hostile data
            # must not: cut it before the DispVM starts.
            self.api.property_set(name, "netvm", "")
            argv = self._service_argv(name, service, args, self._qrexec_timeout(name))
            self._start(name)
            return QrexecProcess(argv, name, self.api)
        except BaseException:
            with contextlib.suppress(QubesApiError):
                self.api.vm_kill(name)
            raise


def unsupported_in_42(a: Assignment) -> str:
    """Why a (4.3) assignment cannot be made on Qubes 4.2, or "" if it can: 4.2 attaches by
    port only, and always without asking (an ask-to-attach device would lose the user's
    consent)."""
    if a.mode == "ask-to-attach":
        return "Qubes 4.2 cannot ask before attaching (ask-to-attach); not assigned"
    if a.ident == "*":
        return "Qubes 4.2 cannot assign a device on any port; not assigned"
    return ""


def device_mode(dev: dict[str, object]) -> str:
    """A recorded assignment's 4.3 mode (4.2 records only `required`)."""
    mode = dev.get("mode")
    if isinstance(mode, str) and mode:
        return mode
    return "required" if dev.get("required", True) else "auto-attach"


def configured_socket() -> str:
    """The qubesd socket: $QBHUB_QUBESD_SOCKET, else Qubes' own /var/run/qubesd.sock."""
    return os.environ.get("QBHUB_QUBESD_SOCKET") or DEFAULT_SOCKET
