"""The storage side of the Borg transport: `borg serve` restricted to one repository.

Runs in the agent sandbox (on Qubes: the backup VM's `qbhub.BorgServe` service) whose home is
the archive directory, over stdin/stdout. The repository path and the append-only flag are fixed
here and by dom0's command line; the worker on the other end can't choose them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPOSITORY = "borg"  # the Borg repository's directory inside the archive directory


def serve_argv(borg: str, repository: Path, *, append_only: bool) -> list[str]:
    """The `borg serve` command line for `repository`."""
    argv = [borg, "serve", "--restrict-to-repository", str(repository), "--umask", "0077"]
    return [*argv, "--append-only"] if append_only else argv


def main(argv: list[str]) -> int:
    if argv not in ([], ["--append-only"]):
        print("usage: serve [--append-only]", file=sys.stderr)
        return 2
    borg = shutil.which("borg")
    if borg is None:
        print("qbhub borg serve: borg is not installed here", file=sys.stderr)
        return 127
    repository = Path.home() / REPOSITORY
    os.environ.setdefault("BORG_BASE_DIR", "/tmp")
    os.execv(borg, serve_argv(borg, repository, append_only=bool(argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
