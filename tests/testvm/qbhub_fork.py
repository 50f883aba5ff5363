#!/usr/bin/python3
"""A fork server for the qbhub CLI in the test VM (run there from /mnt/qbhub).

Under software emulation (TCG) starting Python and importing qbhub, click, cryptography and
the native engine costs seconds per command, and the LVM tests run dozens of commands. The server
imports all that once; each command is then a child forked from it that runs the CLI's own
``main()`` with its own argv, environment, working directory and the client's stdin, stdout and
stderr (passed over the socket), and exits with main()'s status: the real CLI in a process of
its own, without the imports. Commands may run at the same time (each has a thread in the
server that waits for it).

    python3 qbhub_fork.py serve SOCKET      the server (the fixture starts it in the background)
    python3 qbhub_fork.py SOCKET ARGS...    what `qbhub ARGS` does, run by the server
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def call(path: str, args: list[str]) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        for _ in range(1200):  # the server may still be importing: up to two minutes
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.1)
        else:
            s.connect(path)
        request = {"argv": args, "env": dict(os.environ), "cwd": os.getcwd()}
        socket.send_fds(s, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        s.shutdown(socket.SHUT_WR)
        reply = b""  # one line: other commands' children may hold the socket open past it
        while not reply.endswith(b"\n") and (chunk := s.recv(4096)):
            reply += chunk
    return int(json.loads(reply)["rc"]) if reply else 125


def serve(path: str) -> None:
    import contextlib
    import importlib
    import pkgutil
    import threading

    import qbhub_native

    import qubes_backup_hub.snapshots
    from qubes_backup_hub.cli.main import main

    for package in (qbhub_native, qubes_backup_hub.snapshots):  # what the commands import late
        for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener.bind(path)
        listener.listen(8)
        while True:
            conn, _ = listener.accept()
            with conn:
                msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                while not msg.endswith(b"\n") and (more := conn.recv(1 << 20)):
                    msg += more
                request = json.loads(msg)
                pid = os.fork()
                if pid == 0:  # the command
                    listener.close()
                    conn.close()
                    for target, fd in enumerate(fds):
                        os.dup2(fd, target)
                        os.close(fd)
                    os.chdir(request["cwd"])
                    os.environ.clear()
                    os.environ.update(request["env"])
                    sys.argv = ["qbhub", *request["argv"]]
                    rc = 1
                    try:
                        rc = main(request["argv"])
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(rc)
                for fd in fds:
                    os.close(fd)
                threading.Thread(target=reply_when_done, args=(pid, conn.detach())).start()


def reply_when_done(pid: int, fd: int) -> None:
    """Send the client the command's exit status (128 + N if signal N killed it)."""
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    with socket.socket(fileno=fd) as conn:
        conn.sendall(json.dumps({"rc": rc if rc >= 0 else 128 - rc}).encode() + b"\n")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(call(sys.argv[1], sys.argv[2:]))
