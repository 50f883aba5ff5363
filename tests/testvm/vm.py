"""The LVM test VM, host side: find (or build) the cached image, start qemu, run commands in it.

The image (`build-image`: Debian 12 kernel, initrd, ext4 root with lvm2, thin-provisioning-tools,
python3, restic) lives in ``/var/cache/qbhub-testvm/KEY/`` (``$QBHUB_TESTVM_CACHE``), KEY being a
hash of the build script and the guest files, so it is built once and reused until they change.
A VM boots it with ``snapshot=on`` (the image is never written), gets sparse data disks of its
own in a temporary directory (``/dev/vdb``...), the qbhub checkout read-only over 9p at
``/mnt/qbhub``, no network, and an agent on a virtio serial port (`guest/agent.py`) that runs
one command at a time. KVM when /dev/kvm can be opened, TCG otherwise.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
QEMU = "qemu-system-x86_64"
GUEST_ENV = {
    "PYTHONPATH": "/mnt/qbhub:/mnt/qbhub/plugins/native",
    # Bytecode: the standard library's and the wheels' come with the image, qbhub's from the
    # checkout's own __pycache__ directories, which `precompile_checkout` brings up to date on
    # the host before a boot (the VM mounts the checkout read-only). A PYTHONPYCACHEPREFIX on the
    # VM's throwaway disk, as before, made every boot compile all of it again under emulation.
    # New archives' passphrase KDF: scrypt N=2^10 instead of 2^17 (128 MiB, ~10 s under TCG
    # per command); only ever lowers the cost of archives the tests create.
    "QBHUB_TEST_KDF_LOG2_N": "10",
    "QBHUB_HOME": "/root/qbhub-home",
    "QBHUB_PASSPHRASE": "correct horse battery staple",
    "LC_ALL": "C.UTF-8",
}


# The guest kernel's options beyond root and init. mitigations=off: no page-table isolation or
# speculation barriers (a test VM runs only the tests; under TCG each of them is emulated, and
# every system call pays). The VM has no network, no swap and nothing to save at a crash.
KERNEL_OPTIONS = "quiet panic=-1 mitigations=off nokaslr tsc=reliable no_timer_check"
GUEST_TESTVM = "/mnt/qbhub/tests/testvm"
# The emulated CPU (TCG): all qemu can emulate but fast-string moves and 5-level paging. With
# ERMS the guest kernel and glibc copy with `rep movsb`, which TCG runs a byte per step: a 64 MiB
# file read from the page cache took 2.8 s, without it 0.5 s. QBHUB_TESTVM_CPU overrides.
TCG_CPU = os.environ.get("QBHUB_TESTVM_CPU", "max,-erms,-fsrm,-la57")
FORK_SERVER = "/run/qbhub-fork.sock"


def cache_root() -> Path:
    return Path(os.environ.get("QBHUB_TESTVM_CACHE", "/var/cache/qbhub-testvm"))


def image_key() -> str:
    """A hash of everything that goes into the image: the build script and the guest files."""
    h = hashlib.sha256()
    guest = sorted(p for p in (HERE / "guest").iterdir() if p.is_file())  # not a __pycache__
    for path in [HERE / "build-image", *guest]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def image_dir() -> Path:
    return cache_root() / image_key()


def image_ready(directory: Path | None = None) -> bool:
    return ((directory or image_dir()) / "complete").is_file()


def build_image(log: Path | None = None) -> Path:
    """Build the image unless it exists (one builder at a time); drop images of older keys."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = image_dir()
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not image_ready(target):
            out = open(log, "w") if log else None  # noqa: SIM115 - closed below
            try:
                subprocess.run(
                    [str(HERE / "build-image"), str(target)], check=True, stdout=out, stderr=out
                )
            finally:
                if out:
                    out.close()
        for old in root.iterdir():
            if old.is_dir() and old != target and len(old.name) == 16:
                shutil.rmtree(old, ignore_errors=True)
    return target


# What runs in the VM from the checkout: compiled on the host for the VM's Python (Debian 12's
# 3.11; bytecode is the same for every 3.11), checked against the sources' hashes there.
PRECOMPILE = ("qubes_backup_hub", "plugins/native/qbhub_native", "tests/testvm", "bench")
GUEST_PYTHON = (3, 11)


def precompile_checkout() -> bool:
    """Write the __pycache__ of the checkout's Python code that the VM runs (a second when it is
    up to date). Needs a host Python of the VM's version; returns False when there is none (the
    VM then compiles in memory, slower)."""
    python = shutil.which("python3.11") or shutil.which("python3")
    if python is None:
        return False
    argv = [python, "-c", f"import sys; sys.exit(sys.version_info[:2] != {GUEST_PYTHON})"]
    if subprocess.run(argv, check=False).returncode != 0:
        return False
    paths = [str(CHECKOUT / p) for p in PRECOMPILE if (CHECKOUT / p).exists()]
    done = subprocess.run(
        # checked-hash: the VM checks each pyc against its source's hash, not its mtime (other
        # work may edit the tree within the second a pyc was written).
        # Not guest/: the image's files (its key is a hash of that directory).
        [python, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "checked-hash",
         "-x", "/guest/", *paths],
        check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return done.returncode == 0


def unavailable_reason() -> str | None:
    """Why the VM cannot run here, or None."""
    if shutil.which(QEMU) is None:
        return (
            f"{QEMU} not installed (.ci/testvm-setup installs qemu-system-x86 and builds the image)"
        )
    if not image_ready():
        return (
            f"test VM image not built at {image_dir()} (run .ci/testvm-setup, as root, or set "
            "QBHUB_TESTVM_BUILD=1 to build it on first use)"
        )
    return None


def kvm_usable() -> bool:
    """/dev/kvm can be opened and runs ordinary guests. A PVM host (the kvm_pvm module: a
    pagetable-based hypervisor for nested clouds) runs only PVM-enabled guest kernels; Debian's
    kernel hangs at boot there, so that counts as no KVM (QBHUB_TESTVM_ACCEL=kvm forces it)."""
    forced = os.environ.get("QBHUB_TESTVM_ACCEL")
    if forced:
        return forced == "kvm"
    if os.path.exists("/sys/module/kvm_pvm"):
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


@dataclass
class GuestResult:
    rc: int
    stdout: str
    stderr: str
    secs: float


class GuestError(AssertionError):
    """A command in the VM failed (or the VM stopped answering)."""


class TestVM:
    """One running VM. `run` a command in it; `stop` powers it off and removes its files."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        image: Path,
        *,
        memory_mib: int = 1536,
        cpus: int = 2,
        disks_gib: Sequence[int] = (24,),
        share: Path = CHECKOUT,
        workdir: str | None = None,
        disk_cache: str = "unsafe",
        images: Sequence[Path] = (),
    ) -> None:
        self.image = image
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.disks_gib = list(disks_gib)
        self.share = share
        self.disk_cache = disk_cache  # "unsafe": fast tests; "none": no host page cache (bench)
        self.images = list(images)  # read-only disks after the data disks (the bench's workload)
        self.tmp = Path(tempfile.mkdtemp(prefix="qbhub-testvm-", dir=workdir))
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0
        self.accel = "kvm" if kvm_usable() else "tcg"
        self.fork_server = False

    # -- life cycle -------------------------------------------------------------------------

    def argv(self) -> list[str]:
        img = self.image
        argv = [
            QEMU, "-machine", f"q35,accel={self.accel}",
            "-cpu", "host,-arch-capabilities" if self.accel == "kvm" else TCG_CPU,
            "-m", str(self.memory_mib), "-smp", str(self.cpus),
            "-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.img"),
            "-append", f"root=/dev/vda rw console=ttyS0 init=/sbin/qbhub-init {KERNEL_OPTIONS}",
            "-drive", f"file={img / 'rootfs.img'},if=virtio,format=raw,snapshot=on",
            "-virtfs", f"local,path={self.share},mount_tag=qbhub,security_model=none,readonly=on",
            "-chardev", f"socket,id=agent,path={self.tmp / 'agent.sock'},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=agent,name=org.qbhub.agent",
            "-serial", f"file:{self.tmp / 'console.log'}",
            "-display", "none", "-monitor", "none", "-nic", "none", "-no-reboot",
        ]  # fmt: skip
        for n, size in enumerate(self.disks_gib):
            disk = self.tmp / f"data{n}.img"
            with open(disk, "wb") as f:
                f.truncate(size << 30)  # sparse: only what the VM writes takes host space
            argv += [
                "-drive",
                f"file={disk},if=virtio,format=raw,cache={self.disk_cache},discard=unmap",
            ]
        for image in self.images:
            argv += ["-drive", f"file={image},if=virtio,format=raw,readonly=on,cache=none"]
        return argv

    def start(self, boot_timeout: float | None = None) -> TestVM:
        boot_timeout = boot_timeout or (90 if self.accel == "kvm" else 600)
        precompile_checkout()
        log = open(self.tmp / "qemu.log", "wb")  # noqa: SIM115 - kept for the VM's life
        self.proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + boot_timeout
        while True:
            if self.proc.poll() is not None:
                raise GuestError(f"qemu exited {self.proc.returncode}: {self._logs()}")
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(self.tmp / "agent.sock"))
                self.sock = s
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise GuestError(
                        f"qemu did not open its agent socket: {self._logs()}"
                    ) from None
                time.sleep(0.1)
        while not self._ping(2.0):  # the agent answers once it has opened its port
            if time.monotonic() > deadline or self.proc.poll() is not None:
                logs = self._logs()
                self.stop()
                raise GuestError(f"the VM's agent did not answer: {logs}")
        trace = os.environ.get("QBHUB_TESTVM_TRACE")
        if trace:
            with open(trace, "a") as f:
                secs = time.monotonic() - (deadline - boot_timeout)
                f.write(f"{secs:8.2f} [boot: qemu started to agent answering]\n")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError, GuestError, TimeoutError):
                self._request({"op": "poweroff"}, timeout=10)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> TestVM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _logs(self) -> str:
        out = []
        for name in ("qemu.log", "console.log"):
            with contextlib.suppress(OSError):
                out.append(f"[{name}] " + (self.tmp / name).read_text(errors="replace")[-3000:])
        return "\n".join(out)

    # -- the agent ----------------------------------------------------------------------------

    def _ping(self, timeout: float) -> bool:
        try:
            self._request({"op": "ping"}, timeout=timeout)
        except TimeoutError:
            return False
        return True

    def _request(self, req: dict[str, object], timeout: float) -> dict[str, object]:
        assert self.sock is not None
        self._next_id += 1
        req_id = self._next_id
        self.sock.sendall((json.dumps({**req, "id": req_id}) + "\n").encode())
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                reply = json.loads(line)
                if reply.get("id") == req_id:
                    return reply
                # a late answer to an earlier (timed-out) ping: drop it
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from the VM in {timeout} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                raise GuestError(f"the VM closed its agent channel: {self._logs()}")
            self._buf += chunk

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = 600,
        input: bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> GuestResult:
        """Run `cmd` in the VM (a string: /bin/sh -e script) with qbhub's environment."""
        req: dict[str, object] = {"timeout": timeout, "env": {**GUEST_ENV, **(env or {})}}
        if isinstance(cmd, str):
            req["sh"] = cmd
        else:
            req["argv"] = list(cmd)
        if input is not None:
            req["input"] = base64.b64encode(input).decode()
        reply = self._request(req, timeout=timeout + 30)
        result = GuestResult(
            rc=int(reply["rc"]),  # type: ignore[call-overload]
            stdout=base64.b64decode(str(reply.get("out", ""))).decode(errors="replace"),
            stderr=base64.b64decode(str(reply.get("err", ""))).decode(errors="replace"),
            secs=float(reply.get("secs", 0.0)),  # type: ignore[arg-type]
        )
        trace = os.environ.get("QBHUB_TESTVM_TRACE")
        if trace:  # where the time goes: one line per command
            line = " ".join(cmd.split() if isinstance(cmd, str) else cmd)
            with open(trace, "a") as f:
                f.write(f"{result.secs:8.2f} {line[:160]}\n")
        if check and result.rc != 0:
            raise GuestError(
                f"in the VM: {cmd!r} exited {result.rc}\n--- stdout\n{result.stdout[-4000:]}"
                f"\n--- stderr\n{result.stderr[-4000:]}"
            )
        return result

    def start_fork_server(self) -> None:
        """Start `qbhub_fork.py` in the VM (in the background: it imports for a while); from
        now on `qbhub` runs each command as a child forked from it (the first waits for it)."""
        self.run(
            f"setsid python3 {GUEST_TESTVM}/qbhub_fork.py serve {FORK_SERVER} "
            f">/run/qbhub-fork.log 2>&1 </dev/null &"
        )
        self.fork_server = True

    def qbhub(self, *args: str, check: bool = True, timeout: float = 600) -> GuestResult:
        """The real qbhub CLI in the VM, from the mounted checkout (forked from the fork server
        when it runs: the same main(), without Python's start-up and qbhub's imports)."""
        return self.run([*self.qbhub_argv(), *args], check=check, timeout=timeout)

    def qbhub_argv(self) -> list[str]:
        """The command line of `qbhub` in the VM (for shell scripts run there)."""
        if self.fork_server:
            return ["python3", "-I", "-S", f"{GUEST_TESTVM}/qbhub_fork.py", FORK_SERVER]
        return ["python3", "-m", "qubes_backup_hub"]

    def qbhub_json(self, *args: str, timeout: float = 600) -> dict[str, object]:
        return json.loads(self.qbhub(*args, "--json", timeout=timeout).stdout)


@contextlib.contextmanager
def running_vm(**kwargs: object) -> Iterator[TestVM]:
    """A started VM on the cached image (built first when QBHUB_TESTVM_BUILD=1)."""
    if not image_ready() and os.environ.get("QBHUB_TESTVM_BUILD") == "1":
        build_image()
    vm = TestVM(image_dir(), **kwargs)  # type: ignore[arg-type]
    vm.start()
    try:
        yield vm
    finally:
        vm.stop()
