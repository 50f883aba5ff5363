"""A hostile restore worker for tests: speaks the restore channel but lies in one chosen way.

The scenario is the first VM name in the job. Each one is a thing a compromised DispVM could
send; dom0 must refuse all of them before importing anything, leaving the platform unchanged.
"""

from __future__ import annotations

import json
import sys

from qubes_backup_hub.safety.restore_channel import DATA, END, HEADER, JOB, receive, send

SIZE = 1 << 20


def vm(
    name: str = "victim", label: str = "red", props: dict | None = None, size: int = SIZE
) -> dict:
    return {
        "name": name,
        "class": "AppVM",
        "settings": {"properties": {"label": label, "template": "fedora", **(props or {})}},
        "volumes": [{"name": "private", "size": size}],
    }


def header(vms: list[dict]) -> bytes:
    return json.dumps(
        {
            "archive_id": "ab" * 16,
            "generation": 1,
            "identity": "x",
            "session": "20261126T000000Z",
            "vms": vms,
        }
    ).encode()


def main() -> None:
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    _, job = receive(inp, {JOB: 65536})
    scenario = json.loads(job)["vms"][0]
    data = b"\x5a" * SIZE
    if scenario == "badname":
        send(out, HEADER, header([vm("../x")]))
    elif scenario == "dom0":
        send(out, HEADER, header([vm("dom0")]))
    elif scenario == "unknownprop":
        send(out, HEADER, header([vm(props={"evil_prop": "1"})]))
    elif scenario == "nonascii":
        send(out, HEADER, header([vm(label="r\u00f6d")]))
    elif scenario == "hugesettings":
        send(out, HEADER, b"{" + b" " * (100 << 20) + b"}")
    else:
        send(out, HEADER, header([vm()]))
        if scenario == "toolong":
            send(out, DATA, data)
            send(out, DATA, b"\x01" * 4096)
        elif scenario == "short":
            send(out, DATA, data[:-1])
        elif scenario == "trailing":
            send(out, DATA, data)
            send(out, DATA, b"more")
        elif scenario == "good":
            send(out, DATA, data)
    send(out, END)
    out.flush()


if __name__ == "__main__":
    main()
