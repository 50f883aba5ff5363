#!/usr/bin/python3
"""The LVM test VM's agent: runs the host's commands, one at a time, over a virtio serial port.

Each request and each reply is one line of JSON. Request: {"argv": [...]} or {"sh": "script"}
(run by /bin/sh -e), with optional "input" (base64 stdin), "timeout" (seconds) and "env". Reply:
{"rc": exit status (-9 on timeout), "out": base64 stdout, "err": base64 stderr, "secs": wall
time, "id": the request's "id"}. {"op": "ping"} answers {"rc": 0}; {"op": "poweroff"} syncs,
answers and powers off. The host is the only party on the port; the VM has no network.
"""

import base64
import glob
import json
import os
import subprocess
import time

PORT_NAME = "org.qbhub.agent"


def find_port() -> str:
    link = f"/dev/virtio-ports/{PORT_NAME}"
    if os.path.exists(link):
        return link
    for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
        with open(name_file) as f:
            if f.read().strip() == PORT_NAME:
                return "/dev/" + name_file.split("/")[-2]
    raise SystemExit("qbhub-agent: no virtio port " + PORT_NAME)


def handle(req: dict) -> dict:
    op = req.get("op")
    if op == "ping":
        return {"rc": 0}
    if op == "poweroff":
        os.sync()
        return {"rc": 0, "poweroff": True}
    argv = req["argv"] if "argv" in req else ["/bin/sh", "-ec", req["sh"]]
    env = {**os.environ, **req.get("env", {})}
    data = base64.b64decode(req["input"]) if req.get("input") else None
    start = time.monotonic()
    try:
        proc = subprocess.run(
            argv,
            input=data,
            stdin=None if data is not None else subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=req.get("timeout"),
            cwd=req.get("cwd", "/"),
        )
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = -9, exc.stdout or b"", (exc.stderr or b"") + b"\n[agent: timed out]"
    except OSError as exc:
        rc, out, err = 127, b"", str(exc).encode()
    return {
        "rc": rc,
        "out": base64.b64encode(out).decode(),
        "err": base64.b64encode(err).decode(),
        "secs": time.monotonic() - start,
    }


def _request_id(line: bytes) -> object:
    try:
        return json.loads(line).get("id")
    except Exception:
        return None


def main() -> None:
    fd = os.open(find_port(), os.O_RDWR)
    buf = b""
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:  # the host is not connected (yet, or any more): wait for it
            time.sleep(0.05)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                reply = handle(json.loads(line))
            except Exception as exc:  # a bad request must not kill the agent
                reply = {"rc": 125, "out": "", "err": base64.b64encode(repr(exc).encode()).decode()}
            if isinstance(req_id := _request_id(line), int):
                reply["id"] = req_id
            data = (json.dumps(reply) + "\n").encode()
            while data:
                data = data[os.write(fd, data) :]
            if reply.get("poweroff"):
                with open("/proc/sysrq-trigger", "w") as f:
                    f.write("o")
                time.sleep(30)


if __name__ == "__main__":
    main()
