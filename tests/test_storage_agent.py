"""The storage agent (backup-VM side of `qubes://`): stdlib only, one directory, hostile caller."""

from __future__ import annotations

import ast
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parent.parent / "qubes_backup_hub" / "agent" / "storage.py"
HEADER = struct.Struct(">BI")
PUT, GET, RANGE, LIST, DELETE, ROOT_GET, ROOT_PUT, CREATE, LOCK, EXISTS, CLEAN = range(1, 12)


class Agent:
    """The agent as a child process, spoken to over its pipes like dom0 does."""

    def __init__(self, base: Path, archive: str = "arch") -> None:
        env = {"PATH": os.environ["PATH"], "QBHUB_STORAGE_BASE": str(base)}
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(AGENT), archive],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )

    def call(self, op: int, payload: bytes = b"") -> tuple[int, bytes]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(HEADER.pack(op, len(payload)) + payload)
        self.proc.stdin.flush()
        status, length = HEADER.unpack(self.proc.stdout.read(HEADER.size))
        return status, self.proc.stdout.read(length)

    def close(self) -> int:
        assert self.proc.stdin
        self.proc.stdin.close()
        return self.proc.wait(timeout=10)


@pytest.fixture
def agent(tmp_path: Path):
    a = Agent(tmp_path / "base")
    yield a
    a.close()


def test_agent_imports_only_the_standard_library() -> None:
    tree = ast.parse(AGENT.read_text())
    modules = {
        (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert modules <= set(sys.stdlib_module_names) | {"__future__"}, modules


def test_objects_round_trip_and_are_immutable(agent: Agent, tmp_path: Path) -> None:
    assert agent.call(CREATE) == (0, b"")
    assert agent.call(PUT, b"pabc\nhello") == (0, b"")
    assert agent.call(GET, b"pabc\n100") == (0, b"hello")
    assert agent.call(RANGE, b"pabc\n1\n3") == (0, b"ell")
    status, message = agent.call(PUT, b"pabc\nother")
    assert status == 1 and b"immutable" in message
    assert agent.call(LIST) == (0, b"pabc 5\n")
    assert (tmp_path / "base" / "arch" / "objects" / "bc" / "pabc").read_bytes() == b"hello"
    assert agent.call(ROOT_PUT, b"root-bytes") == (0, b"")
    assert agent.call(ROOT_GET, b"1000") == (0, b"root-bytes")
    assert agent.call(EXISTS) == (0, b"1")


@pytest.mark.parametrize(
    "payload",
    [b"../../etc/passwd\n10", b"/etc/passwd\n10", b"p/../../x\n10", b"UPPER\n10", b"\n10"],
)
def test_hostile_names_are_refused(agent: Agent, payload: bytes) -> None:
    status, message = agent.call(GET, payload)
    assert status == 1 and b"refused object name" in message


def test_size_caps_are_enforced(agent: Agent) -> None:
    agent.call(CREATE)
    agent.call(PUT, b"pbig\n" + b"x" * 1000)
    status, message = agent.call(GET, b"pbig\n999")
    assert status == 1 and b"more than" in message
    status, _ = agent.call(RANGE, b"pbig\n900\n200")
    assert status == 1


def test_symlinks_are_not_followed(agent: Agent, tmp_path: Path) -> None:
    agent.call(CREATE)
    secret = tmp_path / "secret"
    secret.write_text("dom0 secret")
    fan = tmp_path / "base" / "arch" / "objects" / "ak"
    fan.mkdir(parents=True)
    (fan / "pleak").symlink_to(secret)
    status, data = agent.call(RANGE, b"pleak\n0\n5")
    assert status == 1 and b"secret" not in data


def test_archive_argument_must_be_one_name(tmp_path: Path) -> None:
    for bad in ("../x", "a/b", "", ".hidden"):
        agent = Agent(tmp_path / "base", bad)
        assert agent.close() == 2


def test_second_writer_is_refused(tmp_path: Path) -> None:
    first, second = Agent(tmp_path / "base"), Agent(tmp_path / "base")
    try:
        assert first.call(LOCK) == (0, b"")
        status, message = second.call(LOCK)
        assert status == 1 and b"in use" in message
    finally:
        first.close()
        second.close()


def test_unknown_operation_gets_an_error_reply_and_the_agent_goes_on(tmp_path: Path) -> None:
    agent = Agent(tmp_path / "base")
    assert agent.call(200, b"hello")[0] == 1
    assert agent.call(EXISTS) == (0, b"0")
    assert agent.close() == 0


def test_oversized_request_gets_an_error_reply_then_the_agent_ends(tmp_path: Path) -> None:
    agent = Agent(tmp_path / "base")
    assert agent.proc.stdin and agent.proc.stdout and agent.proc.stderr
    agent.proc.stdin.write(HEADER.pack(PUT, 0xFFFFFFFF) + b"hello")
    agent.proc.stdin.flush()
    status, length = HEADER.unpack(agent.proc.stdout.read(HEADER.size))
    assert status == 1 and b"larger than allowed" in agent.proc.stdout.read(length)
    agent.proc.stdin.close()
    assert agent.proc.wait(timeout=10) == 1
    assert b"Traceback" not in agent.proc.stderr.read()


@pytest.mark.parametrize(
    ("op", "payload"),
    [(PUT, b"pabc\nhello"), (DELETE, b"pabc"), (ROOT_PUT, b"root"), (CLEAN, b"")],
)
def test_mutations_need_the_lock(tmp_path: Path, op: int, payload: bytes) -> None:
    writer = Agent(tmp_path / "base")
    try:
        assert writer.call(CREATE) == (0, b"")  # CREATE takes the lock for its session
        assert writer.call(PUT, b"pabc\nhello") == (0, b"")
        other = Agent(tmp_path / "base")
        try:
            status, message = other.call(op, payload)
            assert status == 1 and b"needs the archive lock" in message
        finally:
            other.close()
    finally:
        writer.close()
    archive = tmp_path / "base" / "arch"
    assert (archive / "objects" / "bc" / "pabc").read_bytes() == b"hello"
    assert not (archive / "root").exists()
