"""The storage side of the Borg transport: `borg serve` restricted to one repository.

Runs in the agent sandbox (on Qubes: the backup VM's `qbhub.BorgServe` service) whose home is
the archive directory, over stdin/stdout. The repository path and the append-only flag are fixed
here and by dom0's command line; the worker on the other end can't choose them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

REPOSITORY = "borg"  # the Borg repository's directory inside the archive directory
LOCK_FILES = ("lock.exclusive", "lock.roster")  # borg 1.x's repository lock
BREAK_LOCK = "--break-stale-lock"


def serve_argv(borg: str, repository: Path, *, append_only: bool) -> list[str]:
    """The `borg serve` command line for `repository`."""
    argv = [borg, "serve", "--restrict-to-repository", str(repository), "--umask", "0077"]
    return [*argv, "--append-only"] if append_only else argv


def break_stale_lock(repository: Path) -> None:
    """Remove borg's repository lock, left behind by a server that was killed.

    Only on dom0's word (BREAK_LOCK), which it gives while holding the archive's own lock for
    the whole job, so no other borg can be using the repository. borg can't tell a stale lock
    here itself: each server runs in a fresh PID namespace, where the dead holder's small PID
    is usually alive again.
    """
    for name in LOCK_FILES:
        path = repository / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


def main(argv: list[str]) -> int:
    flags = set(argv)
    if len(flags) != len(argv) or not flags <= {"--append-only", BREAK_LOCK}:
        print(f"usage: serve [--append-only] [{BREAK_LOCK}]", file=sys.stderr)
        return 2
    borg = shutil.which("borg")
    if borg is None:
        print("qbhub borg serve: borg is not installed here", file=sys.stderr)
        return 127
    repository = Path.home() / REPOSITORY
    if BREAK_LOCK in flags:
        with contextlib.suppress(FileNotFoundError):
            break_stale_lock(repository)
    os.environ.setdefault("BORG_BASE_DIR", "/tmp")
    os.execv(borg, serve_argv(borg, repository, append_only="--append-only" in flags))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
