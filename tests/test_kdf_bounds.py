"""KDF bounds: the root header's scrypt parameters come from storage before anything is
authenticated, so they are bounded before the key derivation runs.

Accepted (docs/FORMAT.md section 3): N a power of two in [2^10, 2^20], 1 <= r <= 32,
1 <= p <= 16, memory 128*N*r <= 256 MiB, work N*r*p <= 2^22. Anything else is
KdfParametersError (exit 3, one line), fast and without the memory. New archives use N=2^17,
r=8, p=1; archives made with the old default N=2^16 stay readable.
"""

from __future__ import annotations

import json
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Qbhub, Result, write_image
from qbhub_native.crypto import DEFAULT_KDF, check_kdf
from test_hostile_storage import assert_one_line_error

from qubes_backup_hub.errors import KdfParametersError

ROOT_MAGIC = b"QBHUB-ROOT\n"
ADDRESS_SPACE = 1 << 30

ABSURD: dict[str, dict[str, Any]] = {
    "4GiB": {"n": 1 << 20, "r": 32},
    "n-2^21": {"n": 1 << 21},
    "n-2^40": {"n": 1 << 40},
    "n-not-power-of-two": {"n": 3 << 16},
    "n-too-small": {"n": 1 << 9},
    "r-33": {"r": 33},
    "r-0": {"r": 0},
    "p-17": {"p": 17},
    "work": {"n": 1 << 17, "r": 8, "p": 8},
    "n-bool": {"n": True},
    "n-float": {"n": 65536.0},
    "argon2": {"name": "argon2id"},
}


def scrypt(**changes: Any) -> dict[str, Any]:
    return {"name": "scrypt", "n": 1 << 16, "r": 8, "p": 1, "salt": "00" * 16, **changes}


def set_kdf(archive: Path, **changes: Any) -> None:
    """Rewrite the root header's KDF (the body no longer authenticates: it must not matter)."""
    root = (archive / "root").read_bytes()
    (hlen,) = struct.unpack_from("<I", root, len(ROOT_MAGIC))
    start = len(ROOT_MAGIC) + 4
    header = json.loads(root[start : start + hlen])
    header["kdf"].update(changes)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    rest = root[start + hlen :]
    (archive / "root").write_bytes(ROOT_MAGIC + struct.pack("<I", len(raw)) + raw + rest)


def header_kdf(archive: Path) -> dict[str, Any]:
    root = (archive / "root").read_bytes()
    (hlen,) = struct.unpack_from("<I", root, len(ROOT_MAGIC))
    start = len(ROOT_MAGIC) + 4
    kdf = json.loads(root[start : start + hlen])["kdf"]
    assert isinstance(kdf, dict)
    return kdf


def test_bounds_accept_the_defaults_old_and_new() -> None:
    assert check_kdf(scrypt()) == (1 << 16, 8, 1)
    assert check_kdf({**DEFAULT_KDF, "salt": "00" * 16}) == (1 << 17, 8, 1)
    assert check_kdf(scrypt(n=1 << 20, r=2, p=2)) == (1 << 20, 2, 2)  # 256 MiB, work 2^22


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_bounds_refuse(case: str) -> None:
    with pytest.raises(KdfParametersError):
        check_kdf(scrypt(**ABSURD[case]))


def test_new_archives_use_the_stronger_default(archive: Path) -> None:
    kdf = header_kdf(archive)
    assert (kdf["name"], kdf["p"]) == ("scrypt", 1)
    assert kdf["n"] >= 1 << 17 and kdf["r"] >= 8


def limited_run(q: Qbhub, *args: str | Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the CLI with its address space capped at 1 GiB (a 4 GiB scrypt can't even start);
    return the result and the wall time. (Peak RSS as wait4 reports it includes what the forked
    test process held before exec, so it is no measure here.)"""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "qubes_backup_hub", *map(str, args)],
        env=q.env, capture_output=True, text=True, timeout=120, preexec_fn=cap,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return proc, time.monotonic() - start


@pytest.mark.parametrize("case", ["4GiB", "n-2^40", "work", "argon2"])
def test_absurd_header_is_refused_fast_and_small(qbhub: Qbhub, archive: Path, case: str) -> None:
    """Before: N=2^20, r=32 took 4 GiB; bigger gave "internal error". Now: exit 3, one line."""
    ok, _ = limited_run(qbhub, "list", "--dest", archive)
    assert ok.returncode == 0, ok.stderr  # the cap itself leaves room for a normal opening
    set_kdf(archive, **ABSURD[case])
    proc, elapsed = limited_run(qbhub, "list", "--dest", archive)
    line = assert_one_line_error(Result(proc.returncode, proc.stdout, proc.stderr), 3)
    assert "scrypt" in line or "key derivation" in line
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_archives_with_the_old_default_stay_readable(tmp_path: Path, qbhub: Qbhub) -> None:
    archive = tmp_path / "old"
    qbhub.run("init", "--dest", archive, env={"QBHUB_TEST_KDF_LOG2_N": "16"})
    assert header_kdf(archive)["n"] == 1 << 16
    image = write_image(tmp_path / "disk.img", 6, seed=2)
    qbhub.run("volume", "backup", "--dest", archive, f"{image}=disk")
    fresh = Qbhub(tmp_path / "fresh", {**qbhub.env, "QBHUB_HOME": str(tmp_path / "fresh")})
    out = tmp_path / "out.img"
    fresh.run("volume", "restore", "--dest", archive, "disk", "--to", out)
    assert out.read_bytes() == image.read_bytes()


def test_storage_cannot_lower_the_kdf(qbhub: Qbhub, archive: Path) -> None:
    """In-bounds but other parameters than the key was wrapped with: the unwrap fails (exit 5);
    the test knob lowers N only for archives this process creates."""
    set_kdf(archive, n=1 << 10)
    assert_one_line_error(qbhub.run("list", "--dest", archive, check=False), 5)


def test_test_knob_is_checked(tmp_path: Path, qbhub: Qbhub) -> None:
    result = qbhub.run(
        "init", "--dest", tmp_path / "a", check=False, env={"QBHUB_TEST_KDF_LOG2_N": "4"}
    )
    assert_one_line_error(result, 2)
