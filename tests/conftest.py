"""Shared fixtures: run the real `qbhub` CLI in a subprocess, make volume images."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PASSPHRASE = "correct horse battery staple"
CHUNK = 64 * 1024


@dataclass
class Result:
    """A finished qbhub run."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass
class Qbhub:
    """Runs `python -m qubes_backup_hub` with an isolated QBHUB_HOME and a passphrase."""

    home: Path
    env: dict[str, str]

    def run(
        self,
        *args: str | Path,
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> Result:
        full_env = {**self.env, **(env or {})}
        proc = subprocess.run(
            [sys.executable, "-m", "qubes_backup_hub", *map(str, args)],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"qbhub {' '.join(map(str, args))} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return result

    def json(self, *args: str | Path, **kwargs: Any) -> Any:
        return self.run(*args, "--json", **kwargs).json


@pytest.fixture
def qbhub(tmp_path: Path) -> Qbhub:
    home = tmp_path / "qbhub-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBHUB_")}
    env.update({"QBHUB_HOME": str(home), "QBHUB_PASSPHRASE": PASSPHRASE})
    return Qbhub(home, env)


def write_image(
    path: Path,
    blocks: int,
    seed: int = 1,
    *,
    zero_fraction: float = 0.3,
    holes: bool = False,
    tail: bytes = b"",
) -> Path:
    """A volume image of `blocks` 64 KiB blocks: random, text-like and zero blocks, seeded."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(blocks):
            k = rng.random()
            if k < zero_fraction:
                if holes:
                    f.seek(CHUNK, os.SEEK_CUR)
                else:
                    f.write(bytes(CHUNK))
            elif k < zero_fraction + 0.35:
                f.write(rng.randbytes(CHUNK))
            else:
                words = [
                    rng.choice(["qubes", "backup", "hub", "dom0", str(rng.randint(0, 9999))])
                    for _ in range(CHUNK // 4)
                ]
                f.write(" ".join(words).encode()[:CHUNK].ljust(CHUNK, b"."))
        f.write(tail)
        f.truncate(f.tell())
    return path


def rewrite_blocks(path: Path, indices: list[int], seed: int = 99) -> None:
    """Overwrite the 64 KiB blocks at `indices` with fresh random data, then fsync."""
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for i in indices:
            f.seek(i * CHUNK)
            f.write(rng.randbytes(CHUNK))
        f.flush()
        os.fsync(f.fileno())


@pytest.fixture
def image_factory(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(10_000))

    def make(blocks: int = 64, seed: int = 1, **kwargs: Any) -> Path:
        return write_image(tmp_path / f"vol{next(counter)}.img", blocks, seed, **kwargs)

    return make


@pytest.fixture
def archive(tmp_path: Path, qbhub: Qbhub) -> Path:
    """A fresh, encrypted archive directory."""
    path = tmp_path / "archive"
    qbhub.run("init", "--dest", path)
    return path
