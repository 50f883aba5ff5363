"""Hostile storage directories and a hostile storage agent: nothing hangs, nothing is followed.

The file store (LocalDirStore), the storage agent (in-process, speaking its wire protocol) and the
dom0 side of the agent (QrexecStore, against the real agent or a fake one) each face:
- FIFOs (and other non-files) planted in place of the root, a pack, an index object, the lock
  file: every read refuses promptly (each such test runs the operation in a thread and fails if
  it has not returned within GUARD seconds, so a regression fails instead of hanging the suite);
- symlinked directories at each level below the archive directory, for every operation: refused,
  and nothing outside the archive is read, written or deleted;
- stray files (`Thumbs.db`, `.DS_Store`, `desktop.ini`, misnamed files) ignored by LIST;
- malformed request frames (agent), silent, slow and oversized replies (QrexecStore);
- a held lock, waited for or not.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from qubes_backup_hub.agent import storage as agent
from qubes_backup_hub.errors import StoreError
from qubes_backup_hub.platform.base import ServiceProcess
from qubes_backup_hub.store import qrexec
from qubes_backup_hub.store.local import LocalDirStore
from qubes_backup_hub.store.qrexec import QrexecStore

AGENT = Path(agent.__file__).resolve()
HEADER = struct.Struct(">BI")
PUT, GET, RANGE, LIST, DELETE, ROOT_GET, ROOT_PUT, CREATE, LOCK, EXISTS, CLEAN = range(1, 12)
GUARD = 10.0  # seconds any single operation may take before the test calls it a hang
PACK = "p" + "ab" * 32  # a pack-like and an index-like name, both in fan "ab"
INDEX = "i" + "cd" * 31 + "ab"
SECRET = b"outside the archive: must never be read"
T = TypeVar("T")


def promptly(operation: Callable[[], T], seconds: float = GUARD) -> T:
    """Run `operation` in a thread; fail the test if it has not finished within `seconds`."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = operation()
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"the operation did not return within {seconds} s (it hangs)")
    if "error" in outcome:
        raise outcome["error"]
    return cast(T, outcome.get("value"))


def tree(path: Path) -> dict[str, str]:
    """Relative path -> what it is (file digest, symlink target, dir): detects any change."""
    state = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            state[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            state[rel] = "dir"
        elif p.is_file():
            state[rel] = hashlib.blake2b(p.read_bytes()).hexdigest()
        else:
            state[rel] = "special"
    return state


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the archive that looks like parts of one, full of secrets."""
    out = tmp_path / "outside"
    for rel in (f"objects/ab/{PACK}", f"ab/{PACK}", f"ab/{INDEX}", "root", "lock", "ab/.tmp-x"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(SECRET)
    return out


def local_archive(path: Path) -> LocalDirStore:
    store = LocalDirStore(path)
    store.create()
    store.put(PACK, b"pack-bytes")
    store.put_root(b"root-bytes")
    return store


# -- the in-process agent ----------------------------------------------------------------------


def session(archive: Path, requests: list[tuple[int, bytes]], raw: bytes = b"") -> list[Any]:
    """Feed `requests` (then `raw` bytes) to one agent session; its replies and exit status."""
    stream = b"".join(HEADER.pack(op, len(p)) + p for op, p in requests) + raw
    out = io.BytesIO()
    code = agent.serve(agent.Archive(archive), io.BytesIO(stream), out)
    return [*parse_replies(out.getvalue()), code]


def parse_replies(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos < len(data):
        status, length = HEADER.unpack_from(data, pos)
        yield status, data[pos + HEADER.size : pos + HEADER.size + length]
        pos += HEADER.size + length
    assert pos == len(data), "a reply was cut short"


def agent_archive(path: Path) -> Path:
    replies = session(
        path, [(CREATE, b""), (PUT, PACK.encode() + b"\npack-bytes"), (ROOT_PUT, b"r")]
    )
    assert replies == [(0, b"")] * 3 + [0]
    return path


# -- FIFOs and other non-files ------------------------------------------------------------------


@pytest.mark.parametrize("name", [PACK, INDEX])
def test_local_store_refuses_a_fifo_object(tmp_path: Path, name: str) -> None:
    store = local_archive(tmp_path / "a")
    target = tmp_path / "a" / "objects" / "ab" / name
    target.unlink(missing_ok=True)
    os.mkfifo(target)
    with pytest.raises(StoreError, match="not a regular file"):
        promptly(lambda: store.get(name, 1000))
    with pytest.raises(StoreError, match="not a regular file"):
        promptly(lambda: store.get_range(name, 0, 4))
    assert promptly(lambda: sorted(store.list())) == ([] if name == PACK else [(PACK, 10)])


def test_local_store_refuses_a_fifo_root_lock_file_and_directory(tmp_path: Path) -> None:
    store = local_archive(tmp_path / "a")
    (tmp_path / "a" / "root").unlink()
    os.mkfifo(tmp_path / "a" / "root")
    os.mkfifo(tmp_path / "a" / "lock")
    with pytest.raises(StoreError, match="the root is not a regular file"):
        promptly(lambda: store.get_root(1000))
    assert promptly(store.exists) is False
    with pytest.raises(StoreError, match="the lock file is not a regular file"):
        promptly(lambda: store.lock().__enter__())
    os.mkfifo(tmp_path / "fifo-archive")
    with pytest.raises(StoreError):
        promptly(lambda: LocalDirStore(tmp_path / "fifo-archive").get_root(1000))


def test_local_store_refuses_a_directory_or_socket_in_place_of_an_object(tmp_path: Path) -> None:
    import socket

    store = local_archive(tmp_path / "a")
    (tmp_path / "a" / "objects" / "ab" / INDEX).mkdir()
    with pytest.raises(StoreError, match="not a regular file"):
        promptly(lambda: store.get(INDEX, 1000))
    sock_name = "s" + "0" * 5 + "ab"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "a" / "objects" / "ab" / sock_name))
        with pytest.raises(StoreError, match="not a regular file"):
            promptly(lambda: store.get(sock_name, 1000))
    assert sorted(store.list()) == [(PACK, 10)]


@pytest.mark.parametrize(
    ("where", "op", "payload"),
    [
        (f"objects/ab/{PACK}", GET, PACK.encode() + b"\n1000"),
        (f"objects/ab/{INDEX}", RANGE, INDEX.encode() + b"\n0\n4"),
        ("root", ROOT_GET, b"1000"),
        ("lock", LOCK, b""),
    ],
)
def test_agent_refuses_a_fifo(tmp_path: Path, where: str, op: int, payload: bytes) -> None:
    archive = agent_archive(tmp_path / "a")
    (archive / where).unlink(missing_ok=True)
    os.mkfifo(archive / where)
    replies = promptly(lambda: session(archive, [(op, payload), (LIST, b""), (EXISTS, b"")]))
    (status, message), listing, exists, code = replies
    assert status == 1 and b"not a regular file" in message
    assert listing == (0, b"" if where.endswith(PACK) else f"{PACK} 10\n".encode())
    assert exists == (0, b"0" if where == "root" else b"1") and code == 0


def test_agent_refuses_a_fifo_in_place_of_the_archive_directory(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "a")
    replies = promptly(lambda: session(tmp_path / "a", [(GET, b"pab\n10"), (LOCK, b"")]))
    assert [r[0] for r in replies[:2]] == [1, 1] and b"not a directory" in replies[0][1]


# -- symlinks at every level --------------------------------------------------------------------

LEVELS = {
    "objects": "objects",  # the whole objects directory
    "fan": "objects/ab",  # one fan directory
}


def plant(archive: Path, outside: Path, level: str) -> None:
    """Replace `level` of the archive by a symlink into `outside`."""
    link = archive / LEVELS[level]
    target = outside / ("objects" if level == "objects" else "ab")
    if link.exists():
        for child in sorted(link.rglob("*"), reverse=True):
            child.unlink() if not child.is_dir() else child.rmdir()
        link.rmdir()
    link.symlink_to(target, target_is_directory=True)


LOCAL_OPS: dict[str, Callable[[LocalDirStore], object]] = {
    "get": lambda s: s.get(PACK, 1000),
    "get_range": lambda s: s.get_range(PACK, 0, 8),
    "get_index": lambda s: s.get(INDEX, 1000),
    "put": lambda s: s.put("pnew" + "ab", b"new"),
    "delete": lambda s: s.delete(PACK),
    "list": lambda s: list(s.list()),
}


@pytest.mark.parametrize("level", sorted(LEVELS))
@pytest.mark.parametrize("op", sorted(LOCAL_OPS))
def test_local_store_never_follows_a_symlinked_directory(
    tmp_path: Path, outside: Path, level: str, op: str
) -> None:
    store = local_archive(tmp_path / "a")
    plant(tmp_path / "a", outside, level)
    before = tree(outside)
    with pytest.raises(StoreError, match="symlink"):
        promptly(lambda: LOCAL_OPS[op](store))
    assert tree(outside) == before


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_local_store_cleanup_never_follows_a_symlinked_directory(
    tmp_path: Path, outside: Path, level: str
) -> None:
    store = local_archive(tmp_path / "a")
    plant(tmp_path / "a", outside, level)
    (tmp_path / "a" / ".tmp-debris").write_bytes(b"x")
    before = tree(outside)
    assert store.remove_partial_uploads() == 1
    assert tree(outside) == before


def test_local_store_never_follows_symlinked_root_or_lock(tmp_path: Path, outside: Path) -> None:
    store = local_archive(tmp_path / "a")
    (tmp_path / "a" / "root").unlink()
    (tmp_path / "a" / "root").symlink_to(outside / "root")
    (tmp_path / "a" / "lock").symlink_to(outside / "newlock")
    before = tree(outside)
    with pytest.raises(StoreError, match="symlink"):
        store.get_root(1000)
    assert store.exists() is False
    with pytest.raises(StoreError, match="symlink"), store.lock():
        pass
    store.put_root(b"new root")  # replaces the link itself
    assert tree(outside) == before
    assert not (tmp_path / "a" / "root").is_symlink() and store.get_root(100) == b"new root"


def test_local_store_follows_symlinks_above_the_archive(tmp_path: Path) -> None:
    """The user chooses the archive directory: `--dest /some/symlinked/path` keeps working."""
    (tmp_path / "real").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "real", target_is_directory=True)
    store = local_archive(tmp_path / "via" / "a")
    (tmp_path / "link-to-archive").symlink_to(tmp_path / "real" / "a")
    again = LocalDirStore(tmp_path / "link-to-archive")
    assert again.get(PACK, 100) == b"pack-bytes" and again.get_root(100) == b"root-bytes"
    with again.lock():
        again.put("pother", b"x")
    assert sorted(store.list()) == [(PACK, 10), ("pother", 1)]


AGENT_OPS = {
    "get": (GET, PACK.encode() + b"\n1000"),
    "range": (RANGE, PACK.encode() + b"\n0\n8"),
    "get_index": (GET, INDEX.encode() + b"\n1000"),
    "put": (PUT, b"pnewab\nnew"),
    "delete": (DELETE, PACK.encode()),
    "list": (LIST, b""),
    "list_page": (LIST, b"\n10"),
}


@pytest.mark.parametrize("level", sorted(LEVELS))
@pytest.mark.parametrize("op", sorted(AGENT_OPS))
def test_agent_never_follows_a_symlinked_directory(
    tmp_path: Path, outside: Path, level: str, op: str
) -> None:
    archive = agent_archive(tmp_path / "a")
    plant(archive, outside, level)
    before = tree(outside)
    replies = promptly(lambda: session(archive, [(LOCK, b""), AGENT_OPS[op]]))
    (lock_status, _), (status, message), code = replies
    assert lock_status == 0 and status == 1 and b"symlink" in message, message
    assert SECRET not in message and code == 0
    assert tree(outside) == before


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_agent_clean_and_root_put_never_follow_a_symlinked_directory(
    tmp_path: Path, outside: Path, level: str
) -> None:
    archive = agent_archive(tmp_path / "a")
    plant(archive, outside, level)
    (archive / ".tmp-debris").write_bytes(b"x")
    before = tree(outside)
    replies = session(archive, [(LOCK, b""), (CLEAN, b""), (ROOT_PUT, b"new")])
    assert replies[1] == (0, b"1") and replies[2] == (0, b"")
    assert tree(outside) == before


def test_agent_never_follows_symlinked_root_or_lock(tmp_path: Path, outside: Path) -> None:
    archive = agent_archive(tmp_path / "a")
    (archive / "root").unlink()
    (archive / "root").symlink_to(outside / "root")
    (archive / "lock").unlink()
    (archive / "lock").symlink_to(outside / "newlock")
    before = tree(outside)
    (get_root, exists, lock, _code) = session(
        archive, [(ROOT_GET, b"100"), (EXISTS, b""), (LOCK, b"")]
    )
    assert get_root[0] == 1 and b"symlink" in get_root[1] and exists == (0, b"0")
    assert lock[0] == 1 and b"symlink" in lock[1]
    assert tree(outside) == before


# -- stray files --------------------------------------------------------------------------------

STRAYS = (
    "Thumbs.db",
    "desktop.ini",
    "objects/.DS_Store",
    "objects/Thumbs.db",
    "objects/ab/desktop.ini",
    "objects/ab/.DS_Store",
    "objects/ab/Thumbs.db",
    "objects/ab/PUPPERab",  # not an object name
    "objects/ab/pwrongfan",  # an object name, in the wrong fan directory
    "objects/ab/.tmp-pxab.1234",  # an interrupted upload
    "objects/zz",  # a file where a fan directory would be
    "objects/ab/pdirab/inner",  # a directory where an object would be
    "objects/Desktop Folder/pxxab",
)


def plant_strays(archive: Path) -> None:
    for rel in STRAYS:
        (archive / rel).parent.mkdir(parents=True, exist_ok=True)
        (archive / rel).write_bytes(b"stray")


def test_local_store_lists_past_stray_files(tmp_path: Path) -> None:
    store = local_archive(tmp_path / "a")
    plant_strays(tmp_path / "a")
    assert sorted(store.list()) == [(PACK, 10)]


def test_agent_lists_past_stray_files(tmp_path: Path) -> None:
    archive = agent_archive(tmp_path / "a")
    plant_strays(archive)
    assert session(archive, [(LIST, b""), (LIST, b"\n5")]) == [(0, f"{PACK} 10\n".encode())] * 2 + [
        0
    ]


# -- malformed requests -------------------------------------------------------------------------

BAD_REQUESTS = [
    (RANGE, PACK.encode() + b"\n" + str(1 << 63).encode() + b"\n4"),
    (RANGE, PACK.encode() + b"\n-1\n4"),
    (RANGE, PACK.encode() + b"\n0\n-4"),
    (RANGE, PACK.encode() + b"\n0\n" + str(1 << 64).encode()),
    (RANGE, PACK.encode() + b"\n+0\n4"),
    (RANGE, PACK.encode() + b"\n 0\n4"),
    (RANGE, PACK.encode() + b"\n1_0\n4"),
    (RANGE, PACK.encode() + b"\n\xd9\xa1\n4"),  # an Arabic-Indic digit: int() would take it
    (RANGE, PACK.encode() + b"\n0"),
    (RANGE, PACK.encode() + b"\n0\n4\n5"),
    (GET, PACK.encode() + b"\nabc"),
    (GET, PACK.encode() + b"\n1e3"),
    (GET, PACK.encode()),
    (GET, b"\xff\xfe\n10"),
    (GET, b"p\xc3\xa9ab\n10"),
    (PUT, b"no-newline-at-all"),
    (PUT, b"\xff\nbytes"),
    (DELETE, b"\xff"),
    (ROOT_GET, b"-5"),
    (ROOT_GET, b""),
    (ROOT_GET, b"99999999999999999999999"),
    (LIST, b"\n0x10"),
    (LIST, b"garbage"),
    (LIST, b"UPPER\n10"),
    (LOCK, b"-1"),
    (LOCK, b"1.5"),
    (CREATE, b"payload"),
    (0, b""),
    (12, b""),
    (255, b"x" * 100),
]


def test_agent_answers_every_malformed_request_with_an_error(tmp_path: Path) -> None:
    archive = agent_archive(tmp_path / "a")
    requests = [(LOCK, b"")]
    for request in BAD_REQUESTS:
        requests += [request, (EXISTS, b"")]
    replies = promptly(lambda: session(archive, requests))
    assert replies[0] == (0, b"") and replies[-1] == 0
    for i, request in enumerate(BAD_REQUESTS):
        status, message = replies[1 + 2 * i]
        assert status == 1 and message, request
        assert b"\n" not in message and b"Traceback" not in message
        assert replies[2 + 2 * i] == (0, b"1"), "the session goes on after an error"


@pytest.mark.parametrize(
    "raw",
    [
        b"\x02\x00",  # a short header
        HEADER.pack(GET, 100) + b"pab\n10",  # a short payload
        HEADER.pack(PUT, agent.MAX_REQUEST + 1) + b"x" * 100,  # a length above the cap
        HEADER.pack(PUT, 0xFFFFFFFF),
    ],
)
def test_agent_ends_with_an_error_reply_after_a_broken_frame(tmp_path: Path, raw: bytes) -> None:
    archive = agent_archive(tmp_path / "a")
    replies = promptly(lambda: session(archive, [(EXISTS, b"")], raw))
    assert replies[0] == (0, b"1")
    assert replies[1][0] == 1 and replies[1][1] and replies[2] == 1


# -- the dom0 side: QrexecStore against real and fake agents ------------------------------------


class Process(ServiceProcess):
    """A child process standing in for the qrexec service (no sandbox: the tests' own code)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True
        )
        assert self.popen.stdin and self.popen.stdout
        self.stdin, self.stdout = self.popen.stdin, self.popen.stdout

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()


class FakePlatform:
    """Starts the real agent over `base`, or `script` (Python source) as a fake one."""

    def __init__(self, base: Path, script: str | None = None) -> None:
        self.base, self.script = base, script
        self.started: list[Process] = []

    def call_service(self, vm: str, service: str, args: list[str]) -> Process:
        env = {"PATH": os.environ["PATH"], "QBHUB_STORAGE_BASE": str(self.base)}
        code = ["-c", self.script] if self.script else [str(AGENT)]
        process = Process([sys.executable, "-I", *code, *args], env)
        self.started.append(process)
        return process


def qstore(platform: FakePlatform, **kwargs: Any) -> QrexecStore:
    return QrexecStore("backupvm", "arch", lambda: cast(Any, platform), **kwargs)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[FakePlatform]:
    platform = FakePlatform(tmp_path / "base")
    yield platform
    for process in platform.started:
        if process.popen.poll() is None:
            process.kill()


def fake(tmp_path: Path, script: str) -> FakePlatform:
    return FakePlatform(tmp_path, "import sys, time, struct\n" + script)


SILENT = "sys.stdin.buffer.read(5)\ntime.sleep(60)"
DEAF = "time.sleep(60)"
HALF_REPLY = "sys.stdin.buffer.read(5)\nsys.stdout.buffer.write(b'\\0\\0\\0\\0\\x10ab')\n"
HALF_REPLY += "sys.stdout.buffer.flush()\ntime.sleep(60)"


@pytest.mark.parametrize(
    ("script", "call"),
    [
        (SILENT, lambda s: s.exists()),
        (SILENT, lambda s: s.get_root(100)),
        (DEAF, lambda s: s.put("pbig", b"x" * (8 << 20))),  # an agent that stops reading
        (HALF_REPLY, lambda s: s.get("pab", 100)),
    ],
)
def test_a_silent_or_slow_agent_hits_the_deadline(
    tmp_path: Path, script: str, call: Callable[[QrexecStore], object]
) -> None:
    platform = fake(tmp_path, script)
    store = qstore(platform, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"did not answer \w+ within 1 s"):
        promptly(lambda: call(store))
    assert time.monotonic() - started < 4
    assert platform.started[0].popen.wait(timeout=5) != 0  # killed, not left behind
    store.close()


def test_close_does_not_wait_forever_for_an_agent_that_ignores_eof(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = replies_with((0, 1), "sys.stdout.buffer.write(b'1')\nsys.stdout.buffer.flush()\n")
    platform = fake(tmp_path, script + "sys.stdin.buffer.read()\ntime.sleep(60)")
    store = qstore(platform, timeout=1.0)
    assert store.exists() is True
    monkeypatch.setattr(qrexec, "CLOSE_WAIT", 0.5)
    promptly(store.close)
    assert platform.started[0].popen.poll() is not None


def replies_with(header: tuple[int, int], then: str = "time.sleep(60)") -> str:
    return (
        "sys.stdin.buffer.read(5)\n"
        f"sys.stdout.buffer.write(struct.pack('>BI', {header[0]}, {header[1]}))\n"
        f"sys.stdout.buffer.flush()\n{then}"
    )


@pytest.mark.parametrize(
    ("header", "call"),
    [
        ((0, 250 << 20), lambda s: list(s.list())),  # the 250 MiB list reply
        ((0, 0xFFFFFFFF), lambda s: s.get("pab", 1000)),
        ((0, 1001), lambda s: s.get("pab", 1000)),
        ((0, 5), lambda s: s.get_range("pab", 0, 4)),
        ((0, 17 << 20), lambda s: s.get_root(16 << 20)),
        ((1, 1 << 20), lambda s: s.exists()),  # an error message of a MiB
        ((0, 1), lambda s: s.put("pab", b"x")),  # PUT answers nothing
        ((7, 0), lambda s: s.exists()),  # an unknown status
    ],
)
def test_oversized_or_malformed_replies_are_refused_before_reading(
    tmp_path: Path, header: tuple[int, int], call: Callable[[QrexecStore], object]
) -> None:
    store = qstore(fake(tmp_path, replies_with(header)), timeout=5.0)
    tracemalloc.start()
    try:
        with pytest.raises(StoreError, match=r"oversized|unknown status"):
            promptly(lambda: call(store))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        store.close()
    assert peak < 4 << 20, f"{peak} bytes allocated for a refused reply"


def test_list_is_paged_and_complete(agents: FakePlatform, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qrexec, "LIST_PAGE", 3)
    store = qstore(agents, timeout=10.0)
    store.create()
    names = sorted({f"p{i:03d}{fan}" for i in range(4) for fan in ("ab", "cd", "0f", "zz")})
    for name in names:
        store.put(name, name.encode())
    listed = list(store.list())
    assert sorted(listed) == [(n, len(n)) for n in names]
    assert len(listed) == len(names)
    store.close()


def test_list_stops_at_the_entry_cap(agents: FakePlatform) -> None:
    store = qstore(agents, timeout=10.0, max_list_entries=5)
    store.create()
    for i in range(8):
        store.put(f"p{i}", b"x")
    with pytest.raises(StoreError, match="more than 5 objects"):
        list(store.list())
    store.close()


LOOPING_LIST = """
out = sys.stdout.buffer
while True:
    head = sys.stdin.buffer.read(5)
    if len(head) < 5:
        break
    op, n = struct.unpack('>BI', head)
    sys.stdin.buffer.read(n)
    body = b''.join(b'p%05dab 1\\n' % i for i in range(PAGE))
    out.write(struct.pack('>BI', 0, len(body)) + body)
    out.flush()
"""


def test_an_agent_repeating_its_list_pages_is_caught(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(qrexec, "LIST_PAGE", 4)
    store = qstore(fake(tmp_path, "PAGE = 4\n" + LOOPING_LIST), timeout=5.0)
    with pytest.raises(StoreError, match="out of order or twice"):
        promptly(lambda: list(store.list()))
    store.close()


def test_qrexec_store_through_the_real_agent_lists_past_strays(agents: FakePlatform) -> None:
    store = qstore(agents, timeout=10.0)
    store.create()
    store.put(PACK, b"pack-bytes")
    store.close()
    plant_strays(agents.base / "arch")
    assert list(store.list()) == [(PACK, 10)]
    store.close()


# -- waiting for a lock -------------------------------------------------------------------------


def test_local_lock_fails_at_once_by_default_and_waits_when_asked(tmp_path: Path) -> None:
    first, second = local_archive(tmp_path / "a"), LocalDirStore(tmp_path / "a")
    with first.lock():
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"locked by another qbhub command \(did not wait"):
            second.lock().__enter__()
        assert time.monotonic() - started < 0.5
        with pytest.raises(StoreError, match=r"locked by another qbhub command \(waited 0.6 s\)"):
            second.lock(wait=0.6).__enter__()
        assert time.monotonic() - started >= 0.6
    release_later(first, tmp_path / "a", 0.5)
    second.lock_wait = 5.0  # as the CLI's --lock-wait sets it
    told: list[str] = []
    second.on_lock_wait = told.append  # the CLI prints it: a waiting command says why
    started = time.monotonic()
    with second.lock():
        assert 0.3 < time.monotonic() - started < 4
    assert told == [f"the archive {second.path} is locked by another qbhub command; "
                    "waiting up to 5 s (--lock-wait)"]  # fmt: skip


def release_later(store: Any, _path: Path, after: float) -> None:
    """Take `store`'s lock now and release it `after` seconds later, on a thread."""
    held = store.lock()
    held.__enter__()
    timer = threading.Timer(after, lambda: held.__exit__(None, None, None))
    timer.start()


def test_qrexec_lock_waits_when_asked(agents: FakePlatform) -> None:
    first, second = qstore(agents, timeout=5.0), qstore(agents, timeout=5.0)
    first.create()
    first.close()
    with first.lock():
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"locked by another qbhub command \(did not wait"):
            second.lock().__enter__()
        with pytest.raises(StoreError, match=r"locked by another qbhub command \(waited 0.6 s\)"):
            second.lock(wait=0.6).__enter__()
        assert time.monotonic() - started >= 0.6
    release_later(first, agents.base, 1.5)
    told: list[str] = []
    second.on_lock_wait = told.append
    started = time.monotonic()
    with second.lock(wait=5.0):
        assert 1.3 < time.monotonic() - started < 4.5
    assert len(told) == 1 and "waiting up to 5 s (--lock-wait)" in told[0]
