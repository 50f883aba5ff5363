"""The fake qubesd's dom0 (tests/fake_qubesd.py serves it): VMs with every property as the real
qubesd lists it (type, default flag, per class), pools and volumes, and the seeded system the
tests start from. tests/test_fake_vs_real_qubesd.py keeps it honest against the real qubesd.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1024**3


@dataclass
class VM:
    name: str
    klass: str
    state: str = "Halted"
    props: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (type, value)
    features: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    devices: dict[str, list[str]] = field(default_factory=dict)  # class -> 4.2 List lines
    firewall: list[str] = field(default_factory=lambda: ["action=accept"])
    volumes: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: str = ""


# property -> (type, default value): what the real 4.2 qubesd lists for an AppVM
# (admin.vm.property.GetAll; name, qid and uuid are set, so reported default=False)
DEFAULT_PROPS = {
    "autostart": ("bool", "False"),
    "backup_timestamp": ("int", ""),
    "debug": ("bool", "False"),
    "default_user": ("str", "user"),
    "dns": ("str", "10.139.1.1 10.139.1.2"),
    "gateway": ("str", ""),
    "gateway6": ("str", ""),
    "icon": ("str", "appvm-red"),
    "include_in_backups": ("bool", "True"),
    "installed_by_rpm": ("bool", "False"),
    "ip": ("str", "10.137.0.6"),
    "ip6": ("str", ""),
    "kernel": ("str", "6.6.48-1.fc37"),
    "keyboard_layout": ("str", "us++"),
    "klass": ("str", "AppVM"),
    "label": ("label", "red"),
    "mac": ("str", "00:16:3e:5e:6c:00"),
    "maxmem": ("int", "4000"),
    "memory": ("int", "400"),
    "name": ("str", ""),
    "provides_network": ("bool", "False"),
    "qid": ("int", "0"),
    "qrexec_timeout": ("int", "60"),
    "shutdown_timeout": ("int", "60"),
    "start_time": ("str", ""),
    "stubdom_mem": ("int", ""),
    "stubdom_xid": ("str", "-1"),
    "template_for_dispvms": ("bool", "False"),
    "updateable": ("bool", "False"),
    "uuid": ("str", "00000000-0000-0000-0000-000000000000"),
    "vcpus": ("int", "2"),
    "virt_mode": ("str", "pvh"),
    "visible_gateway": ("str", "10.137.0.3"),
    "visible_gateway6": ("str", ""),
    "visible_ip": ("str", "10.137.0.6"),
    "visible_ip6": ("str", ""),
    "visible_netmask": ("str", "255.255.255.255"),
    "xid": ("str", "-1"),
    "audiovm": ("vm", "dom0"),
    "default_dispvm": ("vm", "default-dvm"),
    "guivm": ("vm", "dom0"),
    "kernelopts": ("str", "swiotlb=2048"),
    "management_dispvm": ("vm", ""),
    "netvm": ("vm", "sys-firewall"),
}
# What 4.3 changes: new properties, and the xids became integers.
PROPS_43 = {
    **DEFAULT_PROPS,
    "bootmode": ("str", "default"),
    "devices_denied": ("str", ""),
    "stubdom_uuid": ("str", ""),
    "stubdom_xid": ("int", "-1"),
    "xid": ("int", "-1"),
}
# Properties an AppVM has and these classes lack, and defaults only some classes have.
CLASS_LACKS = {
    "TemplateVM": {"template", "template_for_dispvms"},
    "DispVM": {"template_for_dispvms"},
}
CLASS_DEFAULTS = {"appvm_default_bootmode": ("str", "default"), "is_preload": ("bool", "False")}


DEFAULT_TEMPLATE = "fedora-40-xfce"  # dom0's default_template (admin.property.Get)
POOLS = {
    "varlibqubes": {
        "dir_path": "/var/lib/qubes",
        "driver": "file-reflink",
        "ephemeral_volatile": "False",
        "name": "varlibqubes",
        "revisions_to_keep": "1",
        "setup_check": "yes",
        "size": str(476 * GiB),
        "usage": str(113 * GiB),
    },
    "vm-pool": {
        "driver": "lvm_thin",
        "ephemeral_volatile": "False",
        "name": "vm-pool",
        "revisions_to_keep": "2",
        "thin_pool": "vm-pool",
        "volume_group": "qubes_dom0",
        "size": str(419 * GiB),
        "usage": str(87 * GiB),
    },
}


def volume(pool: str, vid: str, size: int, persistent: bool, snap: bool = False) -> dict[str, str]:
    return {
        "pool": pool,
        "vid": vid,
        "size": str(size),
        "usage": str(size // 3),
        "rw": "True",
        "source": "",
        "path": "",
        "save_on_stop": str(persistent),
        "snap_on_start": str(snap),
        "revisions_to_keep": "2",
        "ephemeral": "False",
        "is_outdated": "False",
    }


def lvm(vm: str, vol: str) -> str:
    return f"qubes_dom0/vm-{vm}-{vol}"


def make_vm(name: str, klass: str, pool: str, template: str = "", **props: str) -> VM:
    vm = VM(name, klass)
    vm.props["name"] = ("str", name)
    vm.props["uuid"] = ("str", f"6b2e1c1a-0f3d-4d6e-9b1a-{abs(hash(name)) % 10**12:012d}")
    vm.props["qid"] = ("int", str(1 + abs(hash(name)) % 10000))
    if template:
        vm.props["template"] = ("vm", template)
    for key, value in props.items():
        vm.props[key] = (DEFAULT_PROPS.get(key, ("str", ""))[0], value)
    vm.tags = ["audiovm-dom0", "created-by-dom0", "guivm-dom0"]
    vm.devices = {"pci": [], "usb": [], "block": [], "mic": []}
    vm.features = {"qrexec": "1", "gui": "1"}
    if pool == "vm-pool":
        vid = lambda v: lvm(name, v)  # noqa: E731
    else:
        prefix = "vm-templates" if klass == "TemplateVM" else "appvms"
        vid = lambda v: f"{prefix}/{name}/{v}"  # noqa: E731
    if klass in ("TemplateVM", "StandaloneVM"):
        vm.volumes["root"] = volume(pool, vid("root"), 20 * GiB, True)
    elif template:
        vm.volumes["root"] = volume(
            pool,
            lvm(template, "root") if pool == "vm-pool" else f"vm-templates/{template}/root",
            20 * GiB,
            False,
            True,
        )
    vm.volumes["private"] = volume(pool, vid("private"), 2 * GiB, True)
    vm.volumes["volatile"] = volume(pool, vid("volatile"), 10 * GiB, False)
    vm.volumes["kernel"] = volume("linux-kernel", "6.6.48-1.fc37", 0, False)
    return vm


def seed() -> dict[str, VM]:
    dom0 = VM("dom0", "AdminVM", "Running")
    dom0.devices = {"pci": [], "usb": [], "block": [], "mic": []}  # 4.2 answers List on dom0
    dom0.props = {
        "name": ("str", "dom0"),
        "label": ("label", "black"),
        "qid": ("int", "0"),
        "default_dispvm": ("vm", "default-dvm"),
    }
    vms = [
        dom0,
        make_vm("fedora-40-xfce", "TemplateVM", "vm-pool", label="black", netvm=""),
        make_vm(
            "sys-net",
            "AppVM",
            "vm-pool",
            "fedora-40-xfce",
            label="red",
            provides_network="True",
            netvm="",
            memory="425",
        ),
        make_vm(
            "sys-firewall",
            "AppVM",
            "vm-pool",
            "fedora-40-xfce",
            label="green",
            provides_network="True",
            netvm="sys-net",
        ),
        make_vm(
            "default-dvm",
            "AppVM",
            "vm-pool",
            "fedora-40-xfce",
            label="red",
            template_for_dispvms="True",
        ),
        make_vm("work", "AppVM", "vm-pool", "fedora-40-xfce", label="blue", maxmem="8000"),
        make_vm("personal", "AppVM", "varlibqubes", "fedora-40-xfce", label="yellow"),
        make_vm("vault", "AppVM", "vm-pool", "fedora-40-xfce", label="black", netvm=""),
    ]
    by_name = {vm.name: vm for vm in vms}
    by_name["sys-net"].state = "Running"
    by_name["sys-firewall"].state = "Running"
    by_name["work"].state = "Running"
    by_name["default-dvm"].features["appmenus-dispvm"] = "1"
    by_name["sys-net"].devices["pci"] = [
        "dom0+00_14.3 no-strict-reset=True persistent=yes",
        "dom0+00_1f.6 persistent=yes",
    ]
    by_name["work"].devices["usb"] = ["sys-usb+2-1 persistent=no"]
    by_name["work"].firewall = [
        "action=accept dsthost=qubes-os.org proto=tcp dstports=443-443",
        "action=accept specialtarget=dns",
        "action=drop",
    ]
    by_name["work"].tags.append("work-stuff")
    by_name["vault"].features["service.crond"] = ""
    return by_name


def as_43(vm: str, devclass: str, lines: list[str]) -> list[str]:
    """The persistent ones of 4.2 device lines as 4.3 .Assigned lines (any device on the port,
    mode required, as 4.3 migrates 4.2 assignments)."""
    out = []
    for line in lines:
        ident, *opts = line.split(" ")
        if "persistent=yes" not in opts:
            continue
        backend, port = ident.split("+")
        options = [o.partition("=") for o in opts if not o.startswith("persistent=")]
        out.append(
            f"{backend}+{port}:* device_id='*' port_id='{port}' devclass='{devclass}' "
            f"backend_domain='{backend}' mode='required' frontend_domain='{vm}'"
            + "".join(f" _{k}='{v}'" for k, _, v in options)
        )
    return out
