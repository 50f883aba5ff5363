"""The VM-settings policy: what a restore may apply of the settings a (hostile) worker reports.

Every property, feature family, tag family and device class gets one verdict:

  RESTORE    restored (after its value passed the type check in `vm_rules`)
  VM_REF     restored only if it names a VM restored in the same run, or an ordinary existing VM
             (never dom0, the backup VM, a DispVM or the worker; a VM with provides_network only
             where the property needs one: `netvm`). Anything else refuses the restore.
  RISK(x)    restored only when the user passes `--allow x`, a flag that names the risk;
             otherwise left at its default and reported
  NEVER      never restored; left at its default and reported

`SENSITIVE` items are restored but listed before anything is created, so the user sees them.
Numbers are bounded by `NUMBER_BOUNDS` (and by the host, see `vm_rules.host_bounds`).
Patterns are matched in order with fnmatch; the first match wins; unknown names get the verdict
of the final "*" entry. docs/threat-model.md explains each choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True)
class Verdict:
    """One policy verdict; `risk` names the `--allow` word for RISK verdicts."""

    kind: str  # "restore", "vm-ref", "risk", "never"
    risk: str = ""
    sensitive: bool = False

    def __str__(self) -> str:
        return f"risk:{self.risk}" if self.kind == "risk" else self.kind


RESTORE = Verdict("restore")
SENSITIVE = Verdict("restore", sensitive=True)
VM_REF = Verdict("vm-ref", sensitive=True)
NEVER = Verdict("never")


def RISK(word: str) -> Verdict:
    """A verdict restored only with `--allow word` (named in capitals to read like the others)."""
    return Verdict("risk", risk=word, sensitive=True)


# Property -> verdict. Value types are checked in vm_rules.PROPERTIES.
PROPERTY_POLICY: dict[str, Verdict] = {
    "label": RESTORE,
    "template": VM_REF,
    "netvm": VM_REF,
    "default_dispvm": VM_REF,
    "management_dispvm": NEVER,  # who may manage this VM: only the system's default
    "audiovm": NEVER,  # another VM gets this VM's sound
    "guivm": NEVER,  # another VM gets this VM's screen and keyboard
    "template_for_dispvms": RESTORE,
    "provides_network": SENSITIVE,  # a new network VM: listed before it is created
    "include_in_backups": RESTORE,
    "autostart": RISK("autostart"),
    "debug": RISK("debug"),
    "memory": RESTORE,
    "maxmem": RESTORE,
    "vcpus": RESTORE,
    "qrexec_timeout": RESTORE,
    "shutdown_timeout": RESTORE,
    "virt_mode": RESTORE,  # pv is refused unless --allow pv (see vm_rules.check_property)
    "kernel": RESTORE,
    "kernelopts": RISK("kernel-options"),
    "default_user": RESTORE,
    "stubdom_mem": RESTORE,
    "keyboard_layout": RESTORE,
    "bootmode": SENSITIVE,  # selects a boot mode, whose kernel options are a risk of their own
    "devices_denied": RESTORE,  # only ever narrows what may be attached
    "ip": RISK("network-identity"),  # another VM's address would take its traffic
    "ip6": RISK("network-identity"),
    "mac": RISK("network-identity"),
}

# Feature name pattern -> verdict, first match wins.
FEATURE_POLICY: tuple[tuple[str, Verdict], ...] = (
    ("vm-config.*", NEVER),  # raw Xen/libvirt configuration
    # Boot modes (Qubes 4.3): a mode's kernel options are the VM's kernel command line, and a
    # template's `boot-mode.appvm-default` hands its mode to every AppVM based on it.
    ("boot-mode.kernelopts.*", RISK("kernel-options")),
    ("boot-mode.active", SENSITIVE),
    ("boot-mode.appvm-default", SENSITIVE),
    ("boot-mode.default-user.*", SENSITIVE),
    ("boot-mode.name.*", RESTORE),
    ("boot-mode.*", NEVER),
    # GUI: what protects the user from a VM drawing over others or faking window titles.
    ("gui-override-redirect*", NEVER),  # windows that bypass the window manager: spoofing
    ("gui-default-*", NEVER),  # on a GUI VM: the defaults of every VM it shows
    ("gui-secure-*", NEVER),  # the secure copy/paste key sequences
    ("gui-allow-fullscreen", RISK("gui-spoofing")),  # can cover the whole screen
    ("gui-allow-utf8-titles", RISK("gui-spoofing")),  # look-alike window titles
    ("gui-emulated", RESTORE),
    ("gui-trayicon-mode", RESTORE),
    ("gui-max-clipboard-size", RESTORE),
    ("gui-events-max-delay", RESTORE),
    ("gui-videoram-*", RESTORE),
    ("gui-*", NEVER),  # any other GUI switch: unknown power over the screen
    ("service.qubes-updates-proxy", RISK("network-services")),
    ("service.qubes-yum-proxy", RISK("network-services")),
    ("service.qubes-network", RISK("network-services")),
    ("service.qubes-firewall", RISK("network-services")),
    ("qubes-firewall", RISK("network-services")),
    ("service.*", RESTORE),
    ("supported-service.*", RESTORE),
    ("supported-feature.*", RESTORE),
    ("gui", RESTORE),
    ("qrexec", RESTORE),
    ("vmexec", RESTORE),
    ("os", RESTORE),
    ("os-*", RESTORE),
    ("template-*", RESTORE),
    ("menu-items", RESTORE),
    ("default-menu-items", RESTORE),
    ("netvm-menu-items", RESTORE),
    ("appmenus-dispvm", RESTORE),
    ("internal", RESTORE),
    ("video-model", RESTORE),
    ("audio-model", RESTORE),
    ("prohibit-start", RESTORE),
    ("skip-update", RESTORE),
    ("updates-available", RESTORE),
    ("last-updates-check", RESTORE),
    ("qubes-vm-update-*", RESTORE),
    ("*", NEVER),  # unknown: an extension may give it power dom0 cannot judge
)

# Tag pattern -> verdict, first match wins. Tags name VMs in qrexec policy (@tag:...), so every
# restored tag is listed before the VMs are created.
TAG_POLICY: tuple[tuple[str, Verdict], ...] = (
    ("created-by-*", NEVER),  # set by qubesd to the creating VM; policy trusts it
    ("guivm-*", NEVER),
    ("audiovm-*", NEVER),
    ("qbhub-*", NEVER),  # qbhub's own policy tags (storage agent, workers)
    ("dom0-*", NEVER),
    ("*", SENSITIVE),
)

# Device class -> verdict. Backends are checked as VM references (PCI: must be dom0); any
# other device whose backend is dom0 also needs --allow dom0-devices.
DEVICE_POLICY: dict[str, Verdict] = {
    "pci": RISK("pci-devices"),  # DMA-capable hardware; "permissive" needs --allow pci-permissive
    "usb": SENSITIVE,
    "block": SENSITIVE,
    "mic": RISK("microphone"),
    "audio": SENSITIVE,
    "webcam": RISK("webcam"),
    "input": NEVER,  # keyboard/mouse of another VM
}

FIREWALL_POLICY = SENSITIVE  # rules restrict the VM itself; each rule's syntax is checked

# Upper bounds on numeric properties (the host's own limits lower some: vm_rules.host_bounds).
NUMBER_BOUNDS: dict[str, tuple[int, int]] = {
    "memory": (0, 1 << 20),  # MiB
    "maxmem": (0, 1 << 20),  # MiB
    "vcpus": (1, 512),
    "qrexec_timeout": (1, 3600),  # seconds
    "shutdown_timeout": (1, 3600),  # seconds
    "stubdom_mem": (0, 1 << 16),  # MiB
}

# Every --allow word, with what it risks (shown by `qbhub restore --help`).
RISKS: dict[str, str] = {
    "pci-devices": "attach PCI devices (DMA-capable hardware) to restored VMs",
    "pci-permissive": "give attached PCI devices permissive access to their config space",
    "autostart": "start restored VMs at boot",
    "debug": "run restored VMs in debug mode",
    "kernel-options": "restore the VMs' kernel command lines",
    "pv": "run restored VMs in PV mode (weaker isolation than PVH/HVM)",
    "network-services": "make restored VMs serve network, firewall or update proxies",
    "microphone": "attach microphones to restored VMs",
    "webcam": "attach cameras to restored VMs",
    "dom0-devices": "attach devices dom0 itself exposes (its disks, USB) to restored VMs",
    "network-identity": "restore fixed IP and MAC addresses (another VM's would take its traffic)",
    "gui-spoofing": "let restored VMs go fullscreen or use look-alike (UTF-8) window titles",
}


def match(table: tuple[tuple[str, Verdict], ...], name: str) -> Verdict:
    """The verdict of the first pattern in `table` that matches `name`."""
    for pattern, verdict in table:
        if fnmatchcase(name, pattern):
            return verdict
    return NEVER
