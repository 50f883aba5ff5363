"""The LocalPlatform's VM sandbox: no network, read-only system, only the VM's own directory
writable, nothing of other VMs visible, stdin/stdout pipes; and the unsandboxed fallback."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qubes_backup_hub.errors import NotFoundError, UsageError
from qubes_backup_hub.platform.base import VMSettings
from qubes_backup_hub.platform.local.platform import LocalPlatform
from qubes_backup_hub.platform.local.sandbox import (
    SANDBOX_HOME,
    Sandbox,
    SandboxSpec,
    bwrap_argv,
)

TESTS = Path(__file__).resolve().parent
PROBE = "qbhub.TestProbe"
BWRAP = shutil.which("bwrap")
needs_bwrap = pytest.mark.skipif(
    BWRAP is None, reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
)


def make_platform(home: Path, sandbox: Sandbox) -> LocalPlatform:
    platform = LocalPlatform(home, sandbox=sandbox)
    platform.services.register(PROBE, "sandbox_probe", [TESTS])
    for name in ("alpha", "beta"):
        platform.create_vm(VMSettings(name, "StandaloneVM", {"label": "red"}), size=1 << 20)
    return platform


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP listener on 127.0.0.1 recording whatever connects to it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                received.append(conn.recv(100))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], received
    stop.set()
    thread.join()
    server.close()


def run_probe(platform: LocalPlatform, vm: str, request: dict[str, Any]) -> dict[str, Any]:
    process = platform.call_service(vm, PROBE, ["probe"])
    process.stdin.write(json.dumps(request).encode() + b"\n")
    process.stdin.flush()
    line = process.stdout.readline()
    assert process.wait(timeout=60) == 0, line
    return json.loads(line)


def probe_request(platform: LocalPlatform, port: int, host_home: Path) -> dict[str, Any]:
    return {
        "port": port,
        "write": [
            "/usr/qbhub-probe",
            str(platform.vm_home("beta") / "planted"),
            str(host_home / "qbhub-probe-planted"),
            str(platform.root / "planted"),
            "$HOME/own.txt",
        ],
        "list": [str(platform.vm_home("beta")), str(platform.root), "$HOME"],
    }


@needs_bwrap
def test_sandbox_confines_the_service(tmp_path: Path, listener: Any) -> None:
    port, received = listener
    platform = make_platform(tmp_path / "home", Sandbox(bwrap=BWRAP))
    assert platform.sandbox.sandboxed, "bwrap is installed but unusable here"
    (platform.vm_home("beta") / "secret").write_text("beta's secret")
    host_home = Path.home()
    assert not (host_home / "qbhub-probe-planted").exists()

    result = run_probe(platform, "alpha", probe_request(platform, port, host_home))

    assert result["connect"].startswith("failed"), result["connect"]
    assert received == []
    writes = result["write"]
    assert writes["/usr/qbhub-probe"].startswith("failed")
    assert not Path("/usr/qbhub-probe").exists()
    assert writes[str(platform.vm_home("beta") / "planted")].startswith("failed")
    assert not (platform.vm_home("beta") / "planted").exists()
    assert writes[str(host_home / "qbhub-probe-planted")].startswith("failed")
    assert not (host_home / "qbhub-probe-planted").exists()
    assert not (platform.root / "planted").exists()
    assert writes["$HOME/own.txt"] == "ok"
    assert (platform.vm_home("alpha") / "own.txt").read_text() == "written by the probe"
    # Nothing of the other VM, of the platform's state or of the pools is visible.
    assert result["list"][str(platform.vm_home("beta"))].startswith("failed")
    assert result["list"][str(platform.root)].startswith("failed")
    assert result["list"]["$HOME"] == ["own.txt"]
    assert result["home"] == SANDBOX_HOME and result["cwd"] == SANDBOX_HOME
    assert result["uid"] == 65534
    assert result["env"]["QREXEC_REMOTE_DOMAIN"] == "dom0"
    assert result["env"]["QREXEC_SERVICE_FULL_NAME"] == f"{PROBE}+probe"


@needs_bwrap
def test_sandboxed_echo_is_exact_for_megabytes(tmp_path: Path) -> None:
    platform = make_platform(tmp_path / "home", Sandbox(bwrap=BWRAP))
    data = os.urandom(5 * 1024 * 1024 + 17)
    process = platform.call_service("alpha", PROBE, ["echo"])
    out = io.BytesIO()

    def read() -> None:
        while chunk := process.stdout.read(1 << 16):
            out.write(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(0, len(data), 100_000):
        process.stdin.write(data[i : i + 100_000])
    process.stdin.close()
    reader.join(timeout=60)
    assert process.wait(timeout=60) == 0
    assert out.getvalue() == data


@needs_bwrap
def test_dispvm_gets_a_fresh_directory_deleted_afterwards(tmp_path: Path, listener: Any) -> None:
    port, received = listener
    platform = make_platform(tmp_path / "home", Sandbox(bwrap=BWRAP))
    process = platform.dispvm_service(PROBE, ["probe"])
    dispvms = platform.root / "dispvms"
    (home,) = list(dispvms.iterdir())
    assert home.name.startswith("disp")
    request = {"port": port, "write": ["$HOME/scratch"], "list": [str(platform.vm_home("alpha"))]}
    process.stdin.write(json.dumps(request).encode() + b"\n")
    process.stdin.flush()
    result = json.loads(process.stdout.readline())
    assert result["write"]["$HOME/scratch"] == "ok"
    assert result["list"][str(platform.vm_home("alpha"))].startswith("failed")
    assert result["connect"].startswith("failed") and received == []
    assert process.wait(timeout=60) == 0
    assert list(dispvms.iterdir()) == []


@needs_bwrap
def test_killed_service_stops_and_dispvm_is_cleaned(tmp_path: Path) -> None:
    platform = make_platform(tmp_path / "home", Sandbox(bwrap=BWRAP))
    process = platform.dispvm_service(PROBE, ["echo"])
    process.kill()
    assert process.popen.returncode is not None
    assert list((platform.root / "dispvms").iterdir()) == []


def test_bwrap_command_has_one_writable_bind(tmp_path: Path) -> None:
    spec = SandboxSpec(
        module="sandbox_probe",
        home=tmp_path / "vm",
        args=("echo",),
        ro_paths=(Path("/opt/python"),),
        masks=(tmp_path / "state",),
    )
    argv = bwrap_argv("/usr/bin/bwrap", spec)
    assert argv.count("--bind") == 1
    bind = argv.index("--bind")
    assert argv[bind + 1 : bind + 3] == [str(tmp_path / "vm"), SANDBOX_HOME]
    for flag in ("--unshare-all", "--die-with-parent", "--new-session", "--clearenv"):
        assert flag in argv
    assert argv[argv.index("--ro-bind") + 1] == "/usr"
    opt = argv.index("/opt/python")
    assert argv[opt - 1 : opt + 2] == ["--ro-bind", "/opt/python", "/opt/python"]
    mask = argv.index(str(tmp_path / "state"))
    assert argv[mask - 1] == "--tmpfs" and mask < bind
    # The interpreter never imports from the (writable) working directory.
    assert argv[argv.index("--") + 1 :][1:] == ["-B", "-P", "-m", "sandbox_probe", "echo"]


@pytest.mark.parametrize("bwrap", [None, "/bin/false"], ids=["missing", "unusable"])
def test_fallback_runs_unsandboxed_and_warns_once(
    tmp_path: Path, listener: Any, bwrap: str | None
) -> None:
    port, received = listener
    warnings = io.StringIO()
    platform = make_platform(tmp_path / "home", Sandbox(bwrap=bwrap, warn_to=warnings))
    assert not platform.sandbox.sandboxed
    request = {"port": port, "write": ["$HOME/own.txt"], "list": []}
    first = run_probe(platform, "alpha", request)
    second = run_probe(platform, "beta", request)
    text = warnings.getvalue()
    assert text.count("warning") == 1 and "unsandboxed" in text
    assert ("not found" in text) == (bwrap is None)
    # Unsandboxed, the service has the network: exactly what the sandbox takes away.
    assert first["connect"] == "connected" and second["connect"] == "connected"
    assert len(received) == 2
    assert first["home"] == str(platform.vm_home("alpha").resolve())
    assert (platform.vm_home("beta") / "own.txt").exists()


def test_unknown_service_and_bad_arguments_are_refused(tmp_path: Path) -> None:
    platform = make_platform(tmp_path / "home", Sandbox(bwrap=None, warn_to=io.StringIO()))
    with pytest.raises(NotFoundError):
        platform.call_service("alpha", "qbhub.Nope")
    with pytest.raises(UsageError):
        platform.call_service("alpha", PROBE, ["../etc"])
    with pytest.raises(NotFoundError):
        platform.call_service("gamma", PROBE, ["echo"])
    with pytest.raises(UsageError):
        platform.call_service("dom0", PROBE, ["echo"])
    assert not (platform.root / "dispvms").exists() or not any(
        (platform.root / "dispvms").iterdir()
    )
    with pytest.raises(UsageError):
        platform.dispvm_service(PROBE, ["a b"])
    assert not any((platform.root / "dispvms").iterdir())
