"""Running one Python service module as a "VM": a bubblewrap sandbox with stdin/stdout pipes.

The sandbox has no network (a private, loopback-only namespace), sees /usr, the Python
installation and qbhub's own code read-only, gets a fresh /proc, /dev and /tmp, runs as an
unprivileged user with no capabilities, and has exactly one writable directory: the VM's own,
mounted at /home/user (its $HOME and working directory). Everything else of the host is absent.

Where bwrap is missing or does not work (no user namespaces, say), the service runs as a plain
child process with the same arguments and environment, and the runner warns once on stderr.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

from ..base import ServiceProcess

SANDBOX_HOME = "/home/user"
SYSTEM_SYMLINKS = (("usr/lib", "/lib"), ("usr/lib64", "/lib64"), ("usr/bin", "/bin"))
SANDBOX_UID = 65534


@dataclass(frozen=True)
class SandboxSpec:
    """Everything that decides what one service process can see and do."""

    module: str
    home: Path  # the VM's own directory on the host: the only writable place
    args: tuple[str, ...] = ()
    python: str = sys.executable
    ro_paths: tuple[Path, ...] = ()  # host paths visible read-only at the same place
    python_path: tuple[Path, ...] = ()  # extra import roots (must lie inside ro_paths)
    masks: tuple[Path, ...] = ()  # host paths hidden behind an empty tmpfs
    # (host path, sandbox path): read-only at another place (volume views, a socket)
    ro_binds: tuple[tuple[Path, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def environment(self, home: str) -> dict[str, str]:
        """The service's whole environment when its $HOME is `home`."""
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": home,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1",
        }
        if self.python_path:
            env["PYTHONPATH"] = os.pathsep.join(map(str, self.python_path))
        env.update(self.env)
        return env

    def python_argv(self) -> list[str]:
        # -P: never import from the (VM-writable) working directory; -B: write no bytecode.
        return [self.python, "-B", "-P", "-m", self.module, *self.args]


def bwrap_argv(bwrap: str, spec: SandboxSpec) -> list[str]:
    """The full bwrap command line that runs `spec`'s service."""
    argv = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--uid", str(SANDBOX_UID),
        "--gid", str(SANDBOX_UID),
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop", "ALL",
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    for target, link in SYSTEM_SYMLINKS:
        argv += ["--symlink", target, link]
    # A fresh /tmp first, so that an installation living under /tmp is bound on top of it.
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for path in spec.ro_paths:
        argv += ["--ro-bind", str(path), str(path)]
    for path in spec.masks:
        argv += ["--tmpfs", str(path)]
    for source, target in spec.ro_binds:
        argv += ["--ro-bind", str(source), target]
    argv += ["--bind", str(spec.home), SANDBOX_HOME, "--chdir", SANDBOX_HOME]
    argv += ["--remount-ro", "/", "--clearenv"]
    for key, value in spec.environment(SANDBOX_HOME).items():
        argv += ["--setenv", key, value]
    return [*argv, "--", *spec.python_argv()]


def import_roots() -> tuple[Path, ...]:
    """Host paths the service's Python needs: the installation, the venv, qbhub and its plugins.

    Plugins are found through the `qbhub` entry-point group without importing them, so a service
    that loads engines (the restore worker) can import every installed plugin.
    """
    roots = [Path(sys.base_prefix), Path(sys.prefix)]
    packages = {"qubes_backup_hub"}
    for entry in importlib.metadata.entry_points(group="qbhub"):
        packages.add(entry.module.split(".")[0])
    for name in sorted(packages):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots.extend(Path(p) for p in spec.submodule_search_locations)
        elif spec is not None and spec.origin:
            roots.append(Path(spec.origin))
    return _outermost(Path(os.path.realpath(p)) for p in roots if p.exists())


def _outermost(paths: Iterable[Path]) -> tuple[Path, ...]:
    """The given paths minus those inside another one, and minus anything under /usr."""
    chosen: list[Path] = []
    for path in sorted(set(paths), key=lambda p: (len(p.parts), str(p))):
        if path.is_relative_to("/usr") or any(path.is_relative_to(c) for c in chosen):
            continue
        chosen.append(path)
    return tuple(chosen)


class SandboxedProcess(ServiceProcess):
    """A running service: its pipes, and a clean-up run once after it has ended."""

    def __init__(
        self, popen: subprocess.Popen[bytes], on_exit: Callable[[], None] | None = None
    ) -> None:
        assert popen.stdin is not None and popen.stdout is not None
        self.popen = popen
        self.stdin = popen.stdin
        self.stdout = popen.stdout
        self._on_exit = on_exit

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float | None = None) -> int:
        code = self.popen.wait(timeout)
        self._finish()
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        self._finish()

    def _finish(self) -> None:
        for pipe in (self.stdin, self.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        if self._on_exit is not None:
            on_exit, self._on_exit = self._on_exit, None
            on_exit()


@dataclass
class Sandbox:
    """Starts services, in bwrap when `bwrap` names a working binary, else unsandboxed."""

    bwrap: str | None = field(default_factory=lambda: shutil.which("bwrap"))
    warn_to: TextIO | None = None  # where the one warning goes (default: sys.stderr)
    _usable: bool | None = field(default=None, init=False, repr=False)
    _reason: str = field(default="", init=False, repr=False)
    _warned: bool = field(default=False, init=False, repr=False)

    @property
    def sandboxed(self) -> bool:
        """Whether services will run in bwrap (checked once by starting a trivial sandbox)."""
        if self._usable is None:
            self._usable, self._reason = self._probe()
        return self._usable

    def argv(self, spec: SandboxSpec) -> list[str]:
        """The command that runs `spec`: bwrap when usable, else the bare interpreter."""
        if self.sandboxed:
            assert self.bwrap is not None
            return bwrap_argv(self.bwrap, spec)
        return spec.python_argv()

    def start(
        self,
        spec: SandboxSpec,
        *,
        stderr: IO[bytes] | int | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> SandboxedProcess:
        """Start the service with stdin/stdout pipes; `on_exit` runs once it has ended."""
        argv = self.argv(spec)
        if self.sandboxed:
            cwd, env = None, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        else:
            self._warn()
            cwd, env = str(spec.home), spec.environment(str(spec.home))
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=cwd,
                env=env,
                close_fds=True,
                start_new_session=True,
            )
        except BaseException:
            if on_exit is not None:
                on_exit()
            raise
        return SandboxedProcess(popen, on_exit)

    def _warn(self) -> None:
        if not self._warned:
            self._warned = True
            print(
                f"qbhub: warning: bubblewrap is not usable ({self._reason}); VM services run "
                "unsandboxed, with all of this user's access (install bubblewrap to fix)",
                file=self.warn_to or sys.stderr,
                flush=True,
            )

    def _probe(self) -> tuple[bool, str]:
        if not self.bwrap:
            return False, "bwrap not found"
        with tempfile.TemporaryDirectory(prefix="qbhub-probe-") as tmp:
            spec = SandboxSpec(module="this", home=Path(tmp), ro_paths=import_roots())
            argv = bwrap_argv(self.bwrap, spec)
            argv = [*argv[: argv.index("--") + 1], spec.python, "-c", "pass"]
            try:
                done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
            except (OSError, subprocess.SubprocessError) as exc:
                return False, f"{self.bwrap}: {exc}"
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip().splitlines()
            return False, f"{self.bwrap} failed: {detail[-1] if detail else done.returncode}"
        return True, ""
