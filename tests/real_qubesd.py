"""The REAL qubesd of Qubes 4.2 and 4.3 for tests (../shared/qubes-reference, see its README).

What is real: qubes-core-admin's own Admin API and internal API handlers, VM classes, properties,
features, tags, firewall, devices and the `file` / `file-reflink` storage drivers, run by
`serve-qubesd` on unix sockets in a temp dir; and the real dom0 script
`qubes-rpc/admin.vm.volume.Import`, run under its name `admin.vm.volume.ImportWithSize`.
What is not (it cannot run here): libvirt is mocked by serve-qubesd (every VM reads as halted),
there is no Xen, no qmemman, no LVM and no qrexec. So admin.vm.Start, which needs qmemman and Xen
and always fails here, is answered by a STAND-IN proxy in front of the Admin API socket
(`StartProxy`: every other call goes through to the real server unchanged); and the qrexec
client is a STAND-IN (`write_qrexec_standin`): it runs the VM's service
(`qbhub.Storage`, `qbhub.RestoreWorker`) as a local process instead of inside the VM, and logs
its argv so tests can check what dom0 would have asked qrexec for.

Changes to the copied import script, and why: its `qubesd-query` calls go to the served internal
socket (not /var/run/qubesd.internal.sock) through the venv's `python -m
qubes.tools.qubesd_query` (dom0 has it as /usr/bin/qubesd-query), and `sudo dd` becomes `dd`
when sudo is not installed (the tests run as root, as the script does in dom0).

The servers need the Debian interpreter with python3-libvirt (and lxml, pyinotify, docutils,
jinja2) and a venv built from a copy of the reference: `python3 tests/real_qubesd.py build
[DIR]` (.ci/run does it) builds both into DIR (default: $QBHUB_QUBESD_VENVS or
~/.cache/qbhub/qubesd), one venv per version in DIR/VERSION/venv. Without them the tests that
need a real server skip, saying what is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

VERSIONS = ("4.2", "4.3")
SYSTEM_PYTHON = "/usr/bin/python3"
APT_PACKAGES = (
    "python3-libvirt",
    "python3-lxml",
    "python3-pyinotify",
    "python3-docutils",
    "python3-jinja2",
    "python3-venv",
)
REFERENCE = Path(
    os.environ.get("QBHUB_QUBES_REFERENCE")
    or Path(__file__).resolve().parents[2] / "shared" / "qubes-reference"
)
START_TIMEOUT = 120.0


def venvs_dir() -> Path:
    return Path(os.environ.get("QBHUB_QUBESD_VENVS") or Path.home() / ".cache/qbhub/qubesd")


def venv_python(version: str) -> Path:
    return venvs_dir() / version / "venv" / "bin" / "python"


def missing(version: str) -> str | None:
    """Why the real qubesd of `version` cannot run here, or None if it can."""
    if not (REFERENCE / "serve-qubesd").exists():
        return f"no Qubes reference sources at {REFERENCE} (set QBHUB_QUBES_REFERENCE)"
    if not Path(SYSTEM_PYTHON).exists():
        return f"no Debian interpreter {SYSTEM_PYTHON}"
    python = venv_python(version)
    if not python.exists():
        return (
            f"no qubesd {version} venv at {python.parent.parent}: apt-get install "
            f"{' '.join(APT_PACKAGES)}; then python3 tests/real_qubesd.py build"
        )
    probe = subprocess.run(
        [str(python), "-c", "import libvirt, lxml, jinja2, docutils, qubes.api.admin"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"qubesd {version} venv cannot import its modules ({last}); install {APT_PACKAGES}"
    return None


def build(dest: Path) -> None:
    """Build one venv per version from a copy of the reference (it may be read-only)."""
    for version in VERSIONS:
        target = dest / version
        if (target / "venv" / "bin" / "python").exists():
            continue
        target.mkdir(parents=True, exist_ok=True)
        parts = [f"{p}-{version}" for p in ("qubes-core-admin", "qubes-core-admin-client")]
        parts.append(f"qubes-core-qrexec-{version}")
        for part in parts:
            shutil.copytree(REFERENCE / part, target / part, dirs_exist_ok=True)
            subprocess.run(["chmod", "-R", "u+w", str(target / part)], check=True)
        subprocess.run(
            [SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", str(target / "venv")],
            check=True,
        )
        subprocess.run(
            [str(target / "venv/bin/pip"), "install", "-q", *(str(target / p) for p in parts)],
            check=True,
        )


@dataclass
class RealQubesd:
    """One running serve-qubesd (seeded), its sockets, and the import script pointed at it."""

    version: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    startup_seconds: float = 0.0
    proxy: StartProxy | None = None

    @property
    def socket(self) -> str:
        return str(self.root / "sock" / "qubesd.sock")

    @property
    def admin_socket(self) -> str:
        """What clients use: the StartProxy's socket once there is one, else qubesd's own."""
        return self.proxy.path if self.proxy is not None else self.socket

    @property
    def internal_socket(self) -> str:
        return str(self.root / "sock" / "qubesd.internal.sock")

    @property
    def basedir(self) -> Path:
        return self.root / "base"

    @property
    def import_service(self) -> str:
        return str(self.root / "rpc" / "admin.vm.volume.ImportWithSize")

    @property
    def source(self) -> Path:
        return REFERENCE / f"qubes-core-admin-{self.version}"

    def start(self, seed: bool = True) -> None:
        began = time.monotonic()
        stderr = open(self.root / "qubesd.log", "wb")  # noqa: SIM115 (kept for the process)
        self.proc = subprocess.Popen(
            [str(venv_python(self.version)), str(REFERENCE / "serve-qubesd"),
             str(self.root / "sock"), str(self.basedir), *(["--seed"] if seed else [])],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=self.root,
        )  # fmt: skip
        stderr.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "serving", or EOF if it died
        if line.strip() != b"serving":
            self.stop()
            tail = (self.root / "qubesd.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"serve-qubesd {self.version} did not start:\n{tail}")
        self.startup_seconds = time.monotonic() - began
        self._write_import_service()

    def _write_import_service(self) -> None:
        script = (self.source / "qubes-rpc" / "admin.vm.volume.Import").read_text()
        query = f"{venv_python(self.version)} -m qubes.tools.qubesd_query"
        script = script.replace("/var/run/qubesd.internal.sock", self.internal_socket)
        script = script.replace("qubesd-query ", query + " ")
        if shutil.which("sudo") is None:
            script = script.replace("sudo dd ", "dd ")
        target = Path(self.import_service)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(script)
        target.chmod(0o755)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def qubesd_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "qubesd.log").read_text(errors="replace")
        return ""


def start(version: str, seed: bool = True) -> RealQubesd:
    """Start a served qubesd `version` in a fresh short temp dir (unix socket paths are short)."""
    root = Path(tempfile.mkdtemp(prefix=f"rq{version.replace('.', '')}-"))
    server = RealQubesd(version, root)
    server.start(seed)
    return server


def cleanup(server: RealQubesd) -> None:
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)


class UnixProxy:
    """A unix socket in front of another (`upstream`): each connection is one request, answered
    by `_handle` (which may pass it on unchanged with `forward`)."""

    def __init__(self, upstream: str, path: str) -> None:
        self.upstream, self.path = upstream, path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(32)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=5)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def forward(self, request: bytes) -> bytes:
        """Send `request` upstream unchanged; return the whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
            up.connect(self.upstream)
            up.sendall(request)
            up.shutdown(socket.SHUT_WR)
            return b"".join(iter(lambda: up.recv(65536), b""))

    def _handle(self, conn: socket.socket) -> None:
        raise NotImplementedError


class StartProxy(UnixProxy):
    """STAND-IN for one call: a socket that forwards every Admin API request to the real
    qubesd unchanged, except admin.vm.Start, which cannot work without Xen and qmemman. That
    one is answered as success when the real qubesd knows the VM (it is asked
    admin.vm.CurrentState for it; its error, such as QubesVMNotFoundError, is passed on)."""

    def __init__(self, server: RealQubesd) -> None:
        self.server = server
        self.starts: list[str] = []
        super().__init__(server.socket, str(server.root / "sock" / "proxy.sock"))

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            request = b"".join(iter(lambda: conn.recv(65536), b""))
            if request.startswith(b"admin.vm.Start+"):
                header = request.split(b"\0", 1)[0].decode("ascii", "replace").split(" ")
                state = self.forward(b"admin.vm.CurrentState+ " + " ".join(header[1:]).encode()
                                     + b"\0")  # fmt: skip
                if state.startswith(b"0\0"):
                    self.starts.append(header[-1])
                    conn.sendall(b"0\0")
                else:
                    conn.sendall(state)
                return
            conn.sendall(self.forward(request))


QREXEC_STANDIN = '''#!{python}
"""STAND-IN for dom0's /usr/lib/qubes/qrexec-client (no Xen, no qrexec here).

Takes the arguments QubesPlatform gives the real one, `-d VM [-w TIMEOUT] "DEFAULT:QUBESRPC
SERVICE+ARG dom0"`, logs them, and runs the qbhub service as a local process instead of in VM:
qbhub.Storage with $QBHUB_STORAGE_BASE set to a directory of that VM's own, qbhub.RestoreWorker
as is. Anything else is refused as qrexec would refuse an unknown service.
"""
import os, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(repr(args) + "\\n")
if len(args) < 3 or args[0] != "-d":
    sys.exit("qrexec-client stand-in: bad arguments " + repr(args))
vm, rest = args[1], args[2:]
if rest[0] == "-w":
    int(rest[1])
    rest = rest[2:]
user, _, command = rest[0].partition(":")
kind, call, source = command.split(" ")
service, _, arg = call.partition("+")
if (user, kind, source) != ("DEFAULT", "QUBESRPC", "dom0"):
    sys.exit("qrexec-client stand-in: unexpected command " + repr(rest[0]))
env = dict(os.environ)
if service == "qbhub.Storage":
    env["QBHUB_STORAGE_BASE"] = os.path.join({vms!r}, vm, "qbhub-archives")
    argv = [sys.executable, "-m", "qubes_backup_hub.agent.storage", arg]
elif service == "qbhub.RestoreWorker":
    argv = [sys.executable, "-m", "qubes_backup_hub.workers.restore"]
else:
    sys.exit("qrexec-client stand-in: no such service " + service)
os.execve(argv[0], argv, env)
'''


def write_qrexec_standin(directory: Path) -> tuple[Path, Path]:
    """The stand-in qrexec-client (see QREXEC_STANDIN) and the file it logs its calls to."""
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "qrexec-calls.log"
    client = directory / "qrexec-client"
    client.write_text(
        QREXEC_STANDIN.format(python=sys.executable, log=str(log), vms=str(directory / "vms"))
    )
    client.chmod(0o755)
    return client, log


def _main(argv: list[str]) -> int:
    if argv[:1] == ["build"] and len(argv) <= 2:
        build(Path(argv[1]) if len(argv) == 2 else venvs_dir())
        return 0
    if argv[:1] == ["check"]:
        problems = {v: missing(v) for v in VERSIONS}
        for v, why in problems.items():
            print(f"qubesd {v}: {why or 'ready'}")
        return 1 if any(problems.values()) else 0
    print("usage: real_qubesd.py build [DIR] | check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
