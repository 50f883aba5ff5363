#!/usr/bin/python3
"""A fork server for the qbhub CLI in the test VM (run there from /mnt/qbhub).

Under software emulation (TCG) starting Python and importing qbhub, click, cryptography and
the native engine costs seconds per command, and the LVM tests run dozens of commands. The server
imports all that once; each command is then a child forked from it that runs the CLI's own
``main()`` with its own argv, environment, working directory and the client's stdin, stdout and
stderr (passed over the socket), and exits with main()'s status: the real CLI in a process of
its own, without the imports. Commands may run at the same time (each has a thread in the
server that waits for it).

    python3 qbhub_fork.py serve SOCKET          the server (the fixture starts it in the background)
    python3 -I -S qbhub_fork.py SOCKET ARGS...  what `qbhub ARGS` does, run by the server
"""

import _socket  # not socket: the client imports nothing it can do without (see call)
import os
import sys
import time


def call(path: str, args: list[str]) -> int:
    """Send the server this process's argv, cwd, environment and stdin/stdout/stderr; return
    the command's exit status. Run as ``python3 -I -S``: under TCG the modules a client would
    usually import (json, socket and the enum and re behind them) took over a second a call."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        for _ in range(1200):  # the server may still be importing: up to two minutes
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.1)
        else:
            s.connect(path)
        fields = [os.fsencode(os.getcwd()), str(len(args)).encode()]
        fields += [os.fsencode(a) for a in args]
        fields += [k + b"=" + v for k, v in os.environb.items()]
        request = b"\0".join(fields)
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
        sent = s.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        s.sendall(request[sent:])
        s.shutdown(_socket.SHUT_WR)
        reply = b""  # one line: other commands' children may hold the socket open past it
        while not reply.endswith(b"\n") and (chunk := s.recv(4096)):
            reply += chunk
    finally:
        s.close()
    return int(reply) if reply else 125


def parse_request(msg: bytes) -> tuple[str, list[str], dict[str, str]]:
    """(cwd, argv, environment) of a request made by `call`."""
    fields = [os.fsdecode(f) for f in msg.split(b"\0")]
    n = int(fields[1])
    argv = fields[2 : 2 + n]
    env = dict(item.split("=", 1) for item in fields[2 + n :] if "=" in item)
    return fields[0], argv, env


def serve(path: str) -> None:
    import contextlib
    import socket
    import threading

    from qubes_backup_hub.cli.main import main

    warm_up()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener.bind(path)
        listener.listen(8)
        while True:
            conn, _ = listener.accept()
            with conn:
                msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                while more := conn.recv(1 << 20):  # up to the client's shutdown
                    msg += more
                cwd, argv, env = parse_request(msg)
                pid = os.fork()
                if pid == 0:  # the command
                    listener.close()
                    conn.close()
                    for target, fd in enumerate(fds):
                        os.dup2(fd, target)
                        os.close(fd)
                    os.chdir(cwd)
                    os.environ.clear()
                    os.environ.update(env)
                    sys.argv = ["qbhub", *argv]
                    rc = 1
                    try:
                        rc = main(argv)
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(rc)
                for fd in fds:
                    os.close(fd)
                threading.Thread(target=reply_when_done, args=(pid, conn.detach())).start()


def warm_up() -> None:
    """Import what a command would import late (every module of qubes_backup_hub, the CLI's
    commands included, and of the native engine), and do once the look-ups every command repeats
    and whose answers cannot change in the VM (the C library's name, the installed packages'
    metadata, read from the 9p mount and parsed for each plugin at every start); then freeze
    the objects so the children's garbage collector leaves their pages shared. Measured under
    TCG: a command forked from a server that had imported only the top of the CLI took ~4 s,
    most of it importing its command module again; the metadata took 0.7-1.2 s a command."""
    import ctypes.util
    import functools
    import gc
    import importlib
    import importlib.metadata
    import pkgutil

    import qbhub_native

    import qubes_backup_hub
    from qubes_backup_hub.registry import load_registry

    for package in (qubes_backup_hub, qbhub_native):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if module.name.endswith("__main__"):
                continue
            try:
                importlib.import_module(module.name)
            except Exception as exc:  # the command that needs it fails the same way
                print(f"qbhub_fork: {module.name} not imported: {exc}", file=sys.stderr)
    # ldconfig -p, run by tune_allocator() at every start: the same answer every time.
    ctypes.util.find_library = functools.lru_cache(maxsize=None)(ctypes.util.find_library)
    ctypes.util.find_library("c")
    # A distribution's metadata, by its directory: nothing is installed while the VM runs.
    read_metadata = importlib.metadata.Distribution.__dict__["metadata"].fget
    cache: dict[str, importlib.metadata.PackageMetadata] = {}

    def metadata(dist: importlib.metadata.Distribution) -> importlib.metadata.PackageMetadata:
        key = str(getattr(dist, "_path", ""))
        if not key:
            return read_metadata(dist)
        if key not in cache:
            cache[key] = read_metadata(dist)
        return cache[key]

    importlib.metadata.Distribution.metadata = property(metadata)  # type: ignore[assignment]
    load_registry()  # reads every plugin's metadata once, here
    gc.collect()
    gc.freeze()


def reply_when_done(pid: int, fd: int) -> None:
    """Send the client the command's exit status (128 + N if signal N killed it)."""
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    conn = _socket.socket(fileno=fd)
    try:
        conn.sendall(b"%d\n" % (rc if rc >= 0 else 128 - rc))
    finally:
        conn.close()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(call(sys.argv[1], sys.argv[2:]))
