"""A test service run in the restore worker's sandbox: tries to read, change, replace, remove and
add to the index cache files dom0 hands the worker ($QBHUB_INDEX_CACHE_SEED), and prints what it
could do as one JSON line."""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def attempt(action: str, do: Any) -> str:
    try:
        do()
    except OSError as exc:
        return f"failed: {exc.strerror}"
    return "ok"


def probe() -> dict[str, Any]:
    seed = os.environ.get("QBHUB_INDEX_CACHE_SEED", "")
    result: dict[str, Any] = {"seed": seed, "files": {}}
    if not seed:
        return result
    names = sorted(os.listdir(seed))
    result["names"] = names
    for name in names:
        path = os.path.join(seed, name)

        def read(path: str = path, name: str = name) -> None:
            with open(path, "rb") as f:
                result["files"].setdefault(name, {})["head"] = f.read(12).hex()

        def overwrite(path: str = path) -> None:
            with open(path, "r+b") as f:
                f.write(b"X")

        def append(path: str = path) -> None:
            with open(path, "ab") as f:
                f.write(b"X")

        def truncate(path: str = path) -> None:
            os.truncate(path, 0)

        def chmod(path: str = path) -> None:
            os.chmod(path, 0o666)

        def rename(path: str = path) -> None:
            os.rename(path, path + ".moved")

        def unlink(path: str = path) -> None:
            os.unlink(path)

        tries = {"read": read, "overwrite": overwrite, "append": append, "truncate": truncate,
                 "chmod": chmod, "rename": rename, "unlink": unlink}  # fmt: skip
        for action, do in tries.items():
            result["files"].setdefault(name, {})[action] = attempt(action, do)

    def create() -> None:
        with open(os.path.join(seed, "planted.idx"), "wb") as f:
            f.write(b"planted")

    result["create"] = attempt("create", create)
    return result


def main() -> int:
    sys.stdout.write(json.dumps(probe()) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
