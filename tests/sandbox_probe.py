"""A test service for the LocalPlatform sandbox: `echo` copies stdin to stdout; `probe` reads one
JSON request from stdin (a TCP port to connect to, paths to write and to list) and answers with
what it could do, as JSON."""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any


def probe(request: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {
        "home": os.environ.get("HOME"),
        "cwd": os.getcwd(),
        "uid": os.getuid(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("QREXEC_", "QBHUB_"))},
        "write": {},
        "list": {},
    }
    try:
        with socket.create_connection(("127.0.0.1", request["port"]), timeout=2) as conn:
            conn.sendall(b"hello from the sandbox")
        result["connect"] = "connected"
    except OSError as exc:
        result["connect"] = f"failed: {exc}"
    for path in request["write"]:
        try:
            with open(os.path.expandvars(path), "w") as f:
                f.write("written by the probe")
            result["write"][path] = "ok"
        except OSError as exc:
            result["write"][path] = f"failed: {exc}"
    for path in request["list"]:
        try:
            result["list"][path] = sorted(os.listdir(os.path.expandvars(path)))
        except OSError as exc:
            result["list"][path] = f"failed: {exc}"
    return result


def main(argv: list[str]) -> int:
    if argv == ["echo"]:
        while chunk := sys.stdin.buffer.read1(1 << 16):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return 0
    if argv == ["probe"]:
        request = json.loads(sys.stdin.buffer.readline())
        sys.stdout.write(json.dumps(probe(request)) + "\n")
        sys.stdout.flush()
        return 0
    print(f"sandbox_probe: unknown mode {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
