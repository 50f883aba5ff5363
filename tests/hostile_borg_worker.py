"""A deliberately hostile Borg backup worker, for tests: it lies in the restore stream.

Started by the real runner in the real sandbox in place of `qbhub_borg.worker`. It never runs
borg: it claims one session, then lies in the way the requested volume's (or VM's) name asks for.
"""

from __future__ import annotations

import json
import sys
from typing import BinaryIO

from qbhub_borg.protocol import (
    DATA,
    END,
    FAIL,
    HEADER,
    JOB,
    LISTING,
    MAX_JOB,
    MAX_REPLY_JSON,
    REPLY,
    RESULT,
)

from qubes_backup_hub.safety.restore_channel import receive, send

SESSION = "20260101T000000Z"


def vm_restore(lie: str, out: BinaryIO) -> int:
    """A VM-level restore (op restore_vms) that lies the way the one VM asked for is named."""
    if lie == "damaged":  # what the real worker says of a settings document it can't read
        send(out, FAIL, b"Damaged: session 20260101T000000Z's settings document is not JSON")
        out.flush()
        return 1
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


def list_lie(lie: str, out: BinaryIO) -> int:
    """A listing (op list) whose one session lies the way the passphrase names."""
    archive: dict[str, object] = {
        "session": SESSION,
        "stats": {"deduplicated_size": 10},
        "volumes": [["private", 10]],
        "notes": {"host": "h", "comment": "c", "tags": ["t"], "vms": [{"name": "work"}]},
    }
    if lie == "escapes":
        archive["volumes"] = [["\x1b[2J\x1b[1;1Hprivate", 10]]
    elif lie == "huge":
        archive["volumes"] = [["private", 10**400], ["root", 10**400]]
        archive["stats"] = {"deduplicated_size": 10**400}
    elif lie == "types":
        archive["volumes"] = 5
        archive["notes"] = {"host": 5, "comment": ["x"], "tags": "abc", "vms": {"a": 1}}
    send(out, RESULT, json.dumps({"archives": [archive], "repository": {}}).encode())
    out.flush()
    return 0


def main() -> int:
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    _, payload = receive(inp, {JOB: MAX_JOB})
    job = json.loads(payload)
    send(out, LISTING, json.dumps({"sessions": [SESSION]}).encode())
    out.flush()
    receive(inp, {REPLY: MAX_REPLY_JSON})
    if job.get("op") == "list":
        return list_lie(str(job["passphrase"]), out)
    if job.get("op") == "verify":  # damage, told with terminal escapes (or as a number)
        problems = 5 if job["passphrase"] == "types" else ["\x1b[2J\x1b[1;1HArchive OK"]
        send(out, RESULT, json.dumps({"ok": False, "problems": problems}).encode())
        out.flush()
        return 0
    if job.get("op") == "settings":  # VM documents with terminal escapes, or of wrong types
        vms: object = 7 if job["passphrase"] == "types" else [
            {"name": "\x1b[2Jwork", "class": "AppVM\x07",
             "settings": {"properties": {"label\x1b[1m": "red\x1b[0m"}, "tags": 3}},
            "not a document",
        ]  # fmt: skip
        send(out, RESULT, json.dumps({"session": "\x1b[2J", "vms": vms}).encode())
        out.flush()
        return 0
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
