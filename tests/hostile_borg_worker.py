"""A deliberately hostile Borg backup worker, for tests: it lies in the restore stream.

Started by the real runner in the real sandbox in place of `qbhub_borg.worker`. It never runs
borg: it claims one session, then lies in the way the requested volume's (or VM's) name asks for.
"""

from __future__ import annotations

import json
import sys
from typing import BinaryIO

from qbhub_borg.protocol import DATA, END, HEADER, JOB, LISTING, MAX_JOB, MAX_REPLY_JSON, REPLY

from qubes_backup_hub.safety.restore_channel import receive, send

SESSION = "20260101T000000Z"


def vm_restore(lie: str, out: BinaryIO) -> int:
    """A VM-level restore (op restore_vms) that lies the way the one VM asked for is named."""
    vm: dict[str, object] = {
        "name": "evil" if lie == "othervm" else lie,
        "class": "AppVM",
        "settings": {"properties": {"label": "red", "template": "fedora"}},
        "volumes": [{"name": "private", "size": 10}],
    }
    if lie == "dom0net":
        vm["settings"] = {"properties": {"label": "red", "netvm": "dom0"}}
    session = "20270101T000000Z" if lie == "unsession" else SESSION
    if lie == "flood":
        send(out, HEADER, b" " * (2 << 20))
        out.flush()
        return 0
    send(out, HEADER, json.dumps({"session": session, "vms": [vm]}).encode())
    send(out, DATA, b"x" * {"longer": 11, "shorter": 9}.get(lie, 10))
    send(out, END)
    out.flush()
    return 0


def main() -> int:
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    _, payload = receive(inp, {JOB: MAX_JOB})
    job = json.loads(payload)
    send(out, LISTING, json.dumps({"sessions": [SESSION]}).encode())
    out.flush()
    receive(inp, {REPLY: MAX_REPLY_JSON})
    if job.get("op") == "restore_vms":
        return vm_restore(str(job["vms"][0]), out)
    lie = job["volume"]
    name, size, session = lie, 10, SESSION
    if lie == "wrongname":
        name = "other"
    if lie == "unsession":
        session = "20270101T000000Z"
    if lie == "flood":
        send(out, HEADER, b" " * (2 << 20))
        out.flush()
        return 0
    header = {"session": session, "volumes": [{"name": name, "size": size}]}
    send(out, HEADER, json.dumps(header).encode())
    send(out, DATA, b"x" * (11 if lie == "oversize" else 9))
    send(out, END)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
