"""A hostile restore worker (a compromised DispVM) gets nothing from dom0.

Runs the real LocalPlatform with its bubblewrap DispVM and a real archive behind the storage
agent in `backupvm`, but with `qbhub.RestoreWorker` mapped to tests/hostile_worker.py, and drives
dom0's restore (`jobs.restore.restore_vms`) against it. What is real: the platform, sandboxes,
agent, archive, engine and every dom0 check. What is fake: the worker, on purpose.

Each escalation either refuses the restore with the platform byte-identical afterwards, or
creates exactly the asked-for VM with the dangerous setting left out and reported.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, cast

import pytest

from qubes_backup_hub.engine import Engine, EngineContext, VolumeSource
from qubes_backup_hub.errors import IntegrityError, NotFoundError, QbhubError, ValidationError
from qubes_backup_hub.jobs.backup import backup_vms
from qubes_backup_hub.jobs.restore import RestoreRequest, restore_vms
from qubes_backup_hub.passphrase import PassphraseSource
from qubes_backup_hub.platform.base import Platform, VMSettings
from qubes_backup_hub.platform.local.platform import LocalPlatform
from qubes_backup_hub.progress import Progress
from qubes_backup_hub.registry import load_registry
from qubes_backup_hub.store.qrexec import QrexecStore

pytestmark = pytest.mark.hostile

TESTS = Path(__file__).resolve().parent
PASSPHRASE = b"hostile worker passphrase 8f3a"
SIZE = 1 << 20
ARCHIVE = "main"


def snapshot_of(root: Path) -> dict[str, str]:
    """Every file under the platform's directory with a hash of its content."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and "logs" not in p.parts
        and "dispvms" not in p.parts
        and not p.name.endswith(".lock")
    }


def engine(state: Path) -> Engine:
    registry = load_registry()
    context = EngineContext(
        hook=registry.pm.hook,
        passphrase=PassphraseSource(env_var=None, value=PASSPHRASE),
        state_dir=state,
        progress=Progress(enabled=False),
    )
    return registry.engine("native").create(context)


class World:
    """A platform with a template, network VMs, the backup VM and a one-session archive."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.platform = LocalPlatform(root / "home")
        p = self.platform
        p.create_vm(VMSettings("fedora", "TemplateVM", properties={"label": "black"}), size=SIZE)
        for name, props in (
            ("backupvm", {}),
            ("sys-net", {"provides_network": "True"}),
            ("sys-usb", {}),
        ):
            settings = VMSettings(
                name, "AppVM", properties={"label": "red", "template": "fedora", **props}
            )
            p.create_vm(settings, size=SIZE)
            assert p.apply_settings(settings) == []
        image = root / "image"
        image.write_bytes(b"\x11" * SIZE)
        with closing(self.store()) as store:
            eng = engine(self.state)
            eng.init_archive(store, encryption=True)
            self.session = eng.backup(store, [VolumeSource("some-volume", str(image))])["session"]
        p.services.register("qbhub.RestoreWorker", "hostile_worker", [TESTS])

    def store(self) -> QrexecStore:
        return QrexecStore("backupvm", ARCHIVE, lambda: self.platform)

    def restore(self, scenario: str, **request: Any) -> dict[str, Any]:
        with closing(self.store()) as store:
            return restore_vms(
                self.platform,
                store,
                load_registry().pm.hook,
                engine(self.state),
                RestoreRequest(vms=[scenario], session=self.session, **request),
            )

    def vm_names(self) -> list[str]:
        return [vm.name for vm in self.platform.list_vms()]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("hostile-world"))


@pytest.fixture
def restored(world: World) -> Iterator[list[str]]:
    """Names of VMs a test restored; removed afterwards so the module's platform stays clean."""
    names: list[str] = []
    yield names
    for name in names:
        if name in world.vm_names():
            world.platform.remove_vm(name)


ORIGINAL_VMS = ["dom0", "backupvm", "fedora", "sys-net", "sys-usb"]

REFUSED = [
    # names, and VMs nobody asked for
    ("badname", "invalid VM name"),
    ("name-dom0", "invalid VM name"),
    ("name-Dom0", "invalid VM name"),
    ("name-DOM0", "invalid VM name"),
    ("name-None", "invalid VM name"),
    ("name-Default", "invalid VM name"),
    ("extravms", "other VMs than asked"),
    ("othervm", "other VMs than asked"),
    ("twice", "VM twice"),
    ("badclass", "can't be restored"),
    ("wrongsession", "sent session"),
    # references to dom0, the backup VM, network VMs where none belongs, the VM itself
    ("guivm-dom0", "property 'guivm'"),
    ("audiovm-dom0", "property 'audiovm'"),
    ("netvm-dom0", "property 'netvm'"),
    ("netvm-Dom0", "property 'netvm'"),
    ("netvm-backupvm", "may not name backupvm"),
    ("defdisp-backupvm", "may not name backupvm"),
    ("defdisp-netvm", "network VM sys-net"),
    ("template-backupvm", "may not name backupvm"),
    ("template-self", "may not name template-self"),
    # numbers beyond any host
    ("memory-huge", "property 'memory'"),
    ("vcpus-huge", "property 'vcpus'"),
    ("qrexec-huge", "property 'qrexec_timeout'"),
    # devices from where they can't come, firewall rules that are not rules
    ("pci-from-vm", "PCI devices come from dom0"),
    ("usb-from-backupvm", "may not serve devices"),
    # Qubes 4.3 device ids and modes outside their forms
    ("dev43-id-slash", "bad device assignment"),
    ("dev43-id-space", "bad device assignment"),
    ("dev43-id-empty", "bad device assignment"),
    ("dev43-id-long", "bad device assignment"),
    ("dev43-id-quote", "bad device assignment"),
    ("dev43-id-number", "bad device assignment"),
    ("dev43-mode-manual", "bad device assignment"),
    ("dev43-mode-caps", "bad device assignment"),
    ("dev43-mode-list", "bad device assignment"),
    ("dev43-mode-disagrees", "bad device assignment"),
    ("dev43-any-port-any-device", "bad device assignment"),
    ("fw-garbage", "bad firewall rules"),
    ("fw-twice", "bad firewall rules"),
    ("fw-nonascii", "bad firewall rules"),
    # malformed streams
    ("nonascii", "property 'label'"),
    ("deepjson", "nested deeper"),
    ("hugesettings", "frame"),
    ("toolong", "more bytes than"),
    ("short", "shorter than"),
    ("trailing", "more bytes than"),
]


@pytest.mark.parametrize(("scenario", "message"), REFUSED, ids=[s for s, _ in REFUSED])
def test_hostile_stream_is_refused_and_nothing_changes(
    world: World, scenario: str, message: str
) -> None:
    before = snapshot_of(world.platform.root)
    with pytest.raises((IntegrityError, ValidationError), match=message):
        world.restore(scenario)
    assert snapshot_of(world.platform.root) == before
    assert sorted(world.vm_names()) == sorted(ORIGINAL_VMS)


LEFT_OUT = [
    # scenario, where the setting would be found, the word in the report
    ("guivm-backupvm", ("properties", "guivm"), "guivm"),
    ("mgmt-backupvm", ("properties", "management_dispvm"), "management_dispvm"),
    ("pv", ("properties", "virt_mode"), "--allow pv"),
    ("debug", ("properties", "debug"), "--allow debug"),
    ("autostart", ("properties", "autostart"), "--allow autostart"),
    ("kernelopts", ("properties", "kernelopts"), "--allow kernel-options"),
    ("unknownprop", ("properties", "evil_prop"), "evil_prop"),
    ("feat-updates-proxy", ("features", "service.qubes-updates-proxy"), "network-services"),
    ("feat-firewall", ("features", "qubes-firewall"), "network-services"),
    ("feat-override-redirect", ("features", "gui-override-redirect"), "never"),
    ("feat-vm-config", ("features", "vm-config.foo"), "never"),
    ("feat-unknown", ("features", "some-extension.power"), "never"),
    ("tag-created-by", ("tags", "created-by-dom0"), "never"),
    ("tag-guivm", ("tags", "guivm-sys-gui"), "never"),
    ("tag-qbhub", ("tags", "qbhub-storage"), "never"),
    ("pci", ("devices", "pci"), "--allow pci-devices"),
    ("block-from-dom0", ("devices", "block"), "--allow dom0-devices"),
    ("input", ("devices", "input"), "never"),
]


def has_setting(settings: VMSettings, where: tuple[str, str]) -> bool:
    part, key = where
    if part == "properties":
        return key in settings.properties
    if part == "features":
        return key in settings.features
    if part == "tags":
        return key in settings.tags
    return any(d["class"] == key for d in settings.devices)


@pytest.mark.parametrize(("scenario", "where", "word"), LEFT_OUT, ids=[s for s, *_ in LEFT_OUT])
def test_dangerous_setting_is_left_out_and_reported(
    world: World, restored: list[str], scenario: str, where: tuple[str, str], word: str
) -> None:
    reported: list[str] = []
    restored.append(scenario)
    result = world.restore(scenario, report=reported.append)
    assert sorted(world.vm_names()) == sorted([*ORIGINAL_VMS, scenario])
    assert not has_setting(world.platform.vm_settings(scenario), where)
    assert any(word in line for line in result["settings_failed"]), result["settings_failed"]
    assert any("left out" in line and word in line for line in reported), reported


def test_explicit_allow_restores_the_named_risk_only(world: World, restored: list[str]) -> None:
    restored.append("pci-permissive")
    result = world.restore("pci-permissive", allow=frozenset({"pci-devices"}))
    assert world.platform.vm_settings("pci-permissive").devices == []
    assert any("pci-permissive" in line for line in result["settings_failed"])
    world.platform.remove_vm("pci-permissive")
    reported: list[str] = []
    world.restore(
        "pci-permissive",
        allow=frozenset({"pci-devices", "pci-permissive"}),
        report=reported.append,
    )
    (device,) = world.platform.vm_settings("pci-permissive").devices
    assert device["backend"] == "dom0" and device["options"] == {"permissive": "True"}
    assert any("sensitive" in line and "pci device" in line for line in reported), reported


def test_43_device_ids_and_modes_pass_dom0s_checks(world: World, restored: list[str]) -> None:
    """The honest 4.3 assignments pass the validator and the policy, and are listed as sensitive
    with their device and mode. (LocalPlatform itself keeps only 4.2-style records, so it reports
    them as not applied; tests/test_real_qubesd.py applies them on a real 4.3 qubesd.)"""
    restored.append("dev43-good")
    reported: list[str] = []
    world.restore("dev43-good", report=reported.append)
    assert "dev43-good" in world.vm_names()
    sensitive = [line for line in reported if "sensitive" in line]
    assert any("usb device sys-usb:2-1 (device 0x046d:0xc52b::h031102, auto-attach)" in line
               for line in sensitive), reported  # fmt: skip
    assert any("usb device sys-usb:* (device 0x1050:0x0407::?******, ask-to-attach)" in line
               for line in sensitive), reported  # fmt: skip


def test_policy_reads_only_the_vms_the_settings_name(
    world: World, restored: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """dom0 judges references with one VM listing plus the settings of each VM a restored
    setting names (here the template), not one Admin API round trip per VM on the system."""
    restored.append("defdisp-backupvm")
    read: list[str] = []
    real = world.platform.vm_settings

    def counted(vm: str) -> VMSettings:
        read.append(vm)
        return real(vm)

    monkeypatch.setattr(world.platform, "vm_settings", counted)
    with pytest.raises(ValidationError, match="may not name backupvm"):
        world.restore("defdisp-backupvm")
    assert sorted(read) == ["backupvm", "fedora"]


def test_numbers_are_lowered_to_what_the_host_has(world: World, restored: list[str]) -> None:
    restored.append("memory-host")
    limit = world.platform.host_limits()["memory"]
    result = world.restore("memory-host")
    assert int(world.platform.vm_settings("memory-host").properties["memory"]) == limit
    assert any("lowered" in line for line in result["settings_failed"])


def test_the_worker_never_sees_the_passphrase(world: World) -> None:
    with pytest.raises(QbhubError) as caught:
        world.restore("showjob")
    message = str(caught.value)
    assert "grant" in message
    assert PASSPHRASE.decode() not in message
    assert "passphrase" not in message


def test_the_relay_reads_only_what_dom0_listed(world: World, restored: list[str]) -> None:
    """The worker asks for an object name of its choosing (a way to hand data to storage)."""
    restored.append("exfil")
    world.restore("exfil")  # the worker FAILs the restore if the relay fetched the name
    assert "exfil" in world.vm_names()


def test_the_workers_word_never_reaches_the_rollback_memory(
    world: World, restored: list[str]
) -> None:
    """The hostile header claims generation 2^62; dom0 remembers only what it authenticated."""
    restored.append("good")
    world.restore("good")
    memories = list((world.state / "archives").glob("*.json"))
    assert memories
    for path in memories:
        assert json.loads(path.read_text())["generation"] < 1000
    # and a later backup of the same archive still works
    with closing(world.store()) as store:
        image = world.root / "image"
        engine(world.state).backup(store, [VolumeSource("some-volume", str(image))])


def test_an_honest_stream_from_the_same_worker_is_imported(
    world: World, restored: list[str]
) -> None:
    """The control case: the refusals above are about the lies, not about the harness."""
    restored.append("good")
    world.restore("good")
    assert "good" in world.vm_names()
    (volume,) = world.platform.vm_volumes("good")
    assert Path(volume.path).read_bytes() == b"\x5a" * SIZE


def test_a_workers_failure_text_reaches_the_terminal_escaped(world: World) -> None:
    with pytest.raises(QbhubError) as failure:
        world.restore("failescape")
    message = str(failure.value)
    assert message.isprintable() and "\x1b" not in message, repr(message)
    assert sorted(world.vm_names()) == sorted(ORIGINAL_VMS)


def restore_all(world: World, session: str, **request: Any) -> dict[str, Any]:
    with closing(world.store()) as store:
        return restore_vms(
            world.platform,
            store,
            load_registry().pm.hook,
            engine(world.state),
            RestoreRequest(vms=[], all_vms=True, session=session, **request),
        )


def test_all_of_a_session_without_vms_creates_nothing(world: World) -> None:
    """--all takes the session's VMs from dom0's own reading of the session record: the world's
    session holds one plain volume and no VM, so whatever the worker would send, nothing is
    created or replaced (the worker once chose VMs to create and, with --replace, to overwrite)."""
    before = snapshot_of(world.platform.root)
    for replace in (False, True):
        with pytest.raises(NotFoundError, match="holds no VM"):
            restore_all(world, world.session, replace=replace)
    assert snapshot_of(world.platform.root) == before


def test_all_refuses_vms_the_session_does_not_hold(world: World) -> None:
    """A VM backup of `extravms` (the scenario where the worker adds two VMs, one a network
    VM): with --all and --replace, dom0 expects exactly `extravms` and refuses the rest."""
    p = world.platform
    settings = VMSettings("extravms", "AppVM", properties={"label": "red", "template": "fedora"})
    p.create_vm(settings, size=SIZE)
    with closing(world.store()) as store:
        registry = load_registry()
        done = backup_vms(p, engine(world.state), store, registry.pm.hook, ["extravms"])
    p.remove_vm("extravms")
    before = snapshot_of(p.root)
    with pytest.raises(IntegrityError, match="other VMs than asked"):
        restore_all(world, done["session"], replace=True)
    assert snapshot_of(p.root) == before
    assert sorted(world.vm_names()) == sorted(ORIGINAL_VMS)


class FailingImports:
    """The world's real platform, but its `nth` volume import fails (storage going away, or a
    worker honest in the checking pass that lies in the importing one)."""

    def __init__(self, platform: LocalPlatform, nth: int) -> None:
        self.platform, self.nth, self.imports = platform, nth, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.platform, name)

    def import_volume(self, vm: str, volume: str, size: int, reader: Any) -> None:
        self.imports += 1
        if self.imports == self.nth:
            raise QbhubError("the storage went away")
        self.platform.import_volume(vm, volume, size, reader)


def test_data_only_failing_between_volumes_puts_every_volume_back(world: World) -> None:
    """--data-only overwrites an existing VM's volumes one by one: when the second import fails,
    the first volume must not stay overwritten (a template with a new root and its old private)."""
    before = snapshot_of(world.platform.root)
    platform = FailingImports(world.platform, nth=2)
    with closing(world.store()) as store, pytest.raises(QbhubError, match="went away"):
        restore_vms(
            cast(Platform, platform),
            store,
            load_registry().pm.hook,
            engine(world.state),
            RestoreRequest(vms=["fedora"], session=world.session, data_only=True),
        )
    assert platform.imports == 2
    assert snapshot_of(world.platform.root) == before
    assert sorted(world.vm_names()) == sorted(ORIGINAL_VMS)


def test_a_worker_that_never_ends_after_its_stream_is_stopped(
    world: World, restored: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that sends a whole, honest stream and then stays: dom0 stops it after a while
    (the restore is done) rather than fail the finished restore with a timeout, which skipped
    releasing what --replace held."""
    from qubes_backup_hub.jobs import restore as restore_job

    monkeypatch.setattr(restore_job, "WORKER_EXIT_WAIT", 1)
    restored.append("linger")
    result = world.restore("linger")
    assert result["vms"] == ["linger"] and "linger" in world.vm_names()
