"""A hostile restore worker for tests: speaks the restore channel but lies in one chosen way.

The scenario is the first VM name in the job; the worker names its VM after it (so dom0 sees the
VM it asked for) unless the scenario is about names. Each scenario is something a compromised
DispVM could send; the tests check what dom0 does with it.
"""

from __future__ import annotations

import json
import sys
import time

from qubes_backup_hub.safety.restore_channel import (
    DATA,
    END,
    FAIL,
    HEADER,
    JOB,
    QUERY,
    REPLY,
    receive,
    send,
)
from qubes_backup_hub.store.qrexec import OP

SIZE = 1 << 20
BACKUP_VM = "backupvm"  # the name the tests give the VM that serves the archive


def vm(
    name: str,
    label: str = "red",
    props: dict | None = None,
    size: int = SIZE,
    **settings: object,
) -> dict:
    return {
        "name": name,
        "class": "AppVM",
        "settings": {
            "properties": {"label": label, "template": "fedora", **(props or {})},
            **settings,
        },
        "volumes": [{"name": "private", "size": size}],
    }


# scenario -> the VM documents of the header (one volume each, SIZE bytes)
def settings_scenarios(name: str) -> list[dict] | None:
    props = {
        "guivm-dom0": {"guivm": "dom0"},
        "guivm-backupvm": {"guivm": BACKUP_VM},
        "audiovm-dom0": {"audiovm": "dom0"},
        "mgmt-backupvm": {"management_dispvm": BACKUP_VM},
        "netvm-backupvm": {"netvm": BACKUP_VM},
        "netvm-dom0": {"netvm": "dom0"},
        "netvm-Dom0": {"netvm": "Dom0"},
        "defdisp-backupvm": {"default_dispvm": BACKUP_VM},
        "defdisp-netvm": {"default_dispvm": "sys-net"},
        "template-backupvm": {"template": BACKUP_VM},
        "template-self": {"template": name},
        "pv": {"virt_mode": "pv"},
        "debug": {"debug": "True"},
        "autostart": {"autostart": "True"},
        "kernelopts": {"kernelopts": "init=/bin/sh"},
        "memory-huge": {"memory": str(1 << 40)},
        "vcpus-huge": {"vcpus": str(1 << 40)},
        "qrexec-huge": {"qrexec_timeout": str(1 << 40)},
        "memory-host": {"memory": str(1 << 19), "maxmem": str(1 << 19)},
        "unknownprop": {"evil_prop": "1"},
    }.get(name)
    if props is not None:
        return [vm(name, props=props)]
    features = {
        "feat-updates-proxy": {"service.qubes-updates-proxy": "1"},
        "feat-firewall": {"qubes-firewall": "1"},
        "feat-override-redirect": {"gui-override-redirect": "allow"},
        "feat-vm-config": {"vm-config.foo": "bar"},
        "feat-unknown": {"some-extension.power": "1"},
    }.get(name)
    if features is not None:
        return [vm(name, features=features)]
    tags = {
        "tag-created-by": ["created-by-dom0"],
        "tag-guivm": ["guivm-sys-gui"],
        "tag-qbhub": ["qbhub-storage"],
    }.get(name)
    if tags is not None:
        return [vm(name, tags=tags)]
    pci = {"class": "pci", "backend": "dom0", "ident": "00_1f.6", "options": {}}
    devices = {
        "pci": [pci],
        "pci-permissive": [{**pci, "options": {"permissive": "True"}}],
        "pci-from-vm": [{**pci, "backend": "sys-net"}],
        "block-from-dom0": [{"class": "block", "backend": "dom0", "ident": "sda"}],
        "usb-from-backupvm": [{"class": "usb", "backend": BACKUP_VM, "ident": "2-1"}],
        "input": [{"class": "input", "backend": "sys-usb", "ident": "1-1"}],
        **device_43_scenarios(),
    }.get(name)
    if devices is not None:
        return [vm(name, devices=devices)]
    firewall = {
        "fw-garbage": ["rm -rf /"],
        "fw-twice": ["action=accept action=drop"],
        "fw-nonascii": ["action=accept dsthost=\u00e9"],
    }.get(name)
    if firewall is not None:
        return [vm(name, firewall=firewall)]
    others = {
        "extravms": [
            vm(name),
            vm("extra1"),
            vm("extra2", props={"provides_network": "True"}),
        ],
        "othervm": [vm("somethingelse")],
        "twice": [vm(name), vm(name)],
        "name-dom0": [vm("dom0")],
        "name-Dom0": [vm("Dom0")],
        "name-DOM0": [vm("DOM0")],
        "name-None": [vm("None")],
        "name-Default": [vm("Default")],
        "badname": [vm("../x")],
        "nonascii": [vm(name, label="r\u00f6d")],
        "badclass": [{**vm(name), "class": "AdminVM"}],
        # the world's template, honestly, with both its volumes (for --data-only)
        "fedora": [
            {
                **vm("fedora"),
                "class": "TemplateVM",
                "settings": {"properties": {"label": "black"}},
                "volumes": [{"name": n, "size": SIZE} for n in ("root", "private")],
            }
        ],
    }
    return others.get(name)


def device_43_scenarios() -> dict[str, list[dict]]:
    """Qubes 4.3 assignments (device_id, mode): one honest, the rest malformed."""
    usb = {"class": "usb", "backend": "sys-usb", "ident": "2-1", "options": {}}
    good = {**usb, "device_id": "0x046d:0xc52b::h031102", "mode": "auto-attach"}
    return {
        "dev43-good": [good, {**usb, "ident": "*", "device_id": "0x1050:0x0407::?******",
                              "mode": "ask-to-attach", "required": False}],
        "dev43-id-slash": [{**good, "device_id": "../../x"}],
        "dev43-id-space": [{**good, "device_id": "a b"}],
        "dev43-id-empty": [{**good, "device_id": ""}],
        "dev43-id-long": [{**good, "device_id": "a" * 257}],
        "dev43-id-quote": [{**good, "device_id": "x' mode='required"}],
        "dev43-id-number": [{**good, "device_id": 7}],
        "dev43-mode-manual": [{**good, "mode": "manual"}],
        "dev43-mode-caps": [{**good, "mode": "Required"}],
        "dev43-mode-list": [{**good, "mode": ["required"]}],
        "dev43-mode-disagrees": [{**good, "mode": "required", "required": False}],
        "dev43-any-port-any-device": [{**good, "ident": "*", "device_id": "*"}],
    }  # fmt: skip


def header(vms: list[dict], session: str, **extra: object) -> bytes:
    # archive facts a worker might lie about; dom0 must ignore them
    doc = {"archive_id": "ab" * 16, "generation": 1 << 62, "session": session, "vms": vms}
    return json.dumps({**doc, **extra}).encode()


def ask(out, inp, op: str, payload: bytes) -> bytes:  # type: ignore[no-untyped-def]
    send(out, QUERY, bytes((OP[op],)) + payload)
    out.flush()
    _, reply = receive(inp, {REPLY: 100 << 20})
    return reply


def main() -> None:
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    _, raw_job = receive(inp, {JOB: 65536})
    job = json.loads(raw_job)
    scenario = job["vms"][0]
    session = job.get("session") or "20261126T000000Z"
    data = b"\x5a" * SIZE
    if scenario == "showjob":
        send(out, FAIL, raw_job[:1000])
    elif scenario == "failescape":  # terminal control sequences: clear screen, a fake success
        send(out, FAIL, b"\x1b[2J\x1b[H\rqbhub: restore complete\x07\x1b]0;title\x07")
    elif scenario == "exfil":
        # try to smuggle data to storage in an object name, then to read the root
        reply = ask(out, inp, "get", b"0123456789abcdef0123456789abcdef\n4096")
        if reply[:1] == b"\x00":
            send(out, FAIL, b"the relay fetched an object dom0 never listed")
        else:
            send(out, HEADER, header([vm(scenario)], session))
            send(out, DATA, data)
    elif scenario == "deepjson":
        send(out, HEADER, b"[" * 100_000 + b"]" * 100_000)
    elif scenario == "hugesettings":
        send(out, HEADER, b"{" + b" " * (100 << 20) + b"}")
    elif scenario == "wrongsession":
        send(out, HEADER, header([vm(scenario)], "20000101T000000Z"))
    elif (vms := settings_scenarios(scenario)) is not None:
        send(out, HEADER, header(vms, session))
        for _ in (volume for doc in vms for volume in doc["volumes"]):
            send(out, DATA, data)
    else:
        send(out, HEADER, header([vm(scenario)], session))
        if scenario == "toolong":
            send(out, DATA, data)
            send(out, DATA, b"\x01" * 4096)
        elif scenario == "short":
            send(out, DATA, data[:-1])
        elif scenario == "trailing":
            send(out, DATA, data)
            send(out, DATA, b"more")
        else:  # "good" and anything else: an honest stream
            send(out, DATA, data)
    send(out, END)
    out.flush()
    if scenario == "linger":  # an honest stream, then the worker never ends
        time.sleep(3600)


if __name__ == "__main__":
    main()
