"""Property-based fuzzing of the storage agent protocol, both ways (hypothesis, fixed budget).

(a) The agent (backup VM) gets arbitrary request streams, from raw bytes to well-framed requests
    with hostile names, numbers and lengths, in-process against an archive that holds objects, a
    root, stray files, a FIFO and symlinks pointing out of it. It must answer with well-formed
    replies only (never a traceback, never an "internal error" it did not foresee), end within
    seconds, and leave everything outside the archive directory untouched.
(b) QrexecStore (dom0) gets arbitrary reply streams for every call it makes. It must raise only
    the project's QbhubError subclasses, return only what the call promises, and never wait
    past its deadline.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qubes_backup_hub.agent import storage as agent
from qubes_backup_hub.errors import QbhubError
from qubes_backup_hub.platform.base import ServiceProcess
from qubes_backup_hub.store import qrexec
from qubes_backup_hub.store.qrexec import QrexecStore

pytestmark = pytest.mark.fuzz
BUDGET = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
HEADER = struct.Struct(">BI")
GUARD = 10.0  # seconds one example may take before it counts as a hang
PACK = "p" + "ab" * 32
SECRET = b"outside: never to be read, written or removed"
# The agent fsyncs every write; on tmpfs that costs nothing, so the budget goes to examples.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


# -- (a) requests into the agent ----------------------------------------------------------------

NAMES = st.one_of(
    st.sampled_from(
        [PACK, "pab", "pleakab", "pfifoab", "root", "lock", "objects", "..", ".", "", "p/../x"]
    ),
    st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True),
    st.text(max_size=20),
).map(lambda s: s.encode("utf-8", "surrogatepass"))
NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70).map(lambda n: str(n).encode()),
    st.sampled_from([b"", b"0", b"1e3", b"+5", b" 5", b"5_0", b"\xd9\xa1", b"0x10", b"nan"]),
)
FIELD = st.one_of(NAMES, NUMBERS, st.binary(max_size=40))
PAYLOAD = st.one_of(
    st.lists(FIELD, min_size=1, max_size=4).map(b"\n".join),
    st.binary(max_size=80),
)
OP_CODE = st.one_of(st.integers(1, 11), st.integers(0, 255))


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A request frame: usually well-framed, sometimes with a length that lies."""
    op, payload = draw(OP_CODE), draw(PAYLOAD)
    length = len(payload) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**32 - 1))
    return HEADER.pack(op, length) + payload


STREAMS = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.lists(frames(), max_size=8), st.binary(max_size=12)).map(
        lambda parts: b"".join(parts[0]) + parts[1]
    ),
)


def snapshot(path: Path) -> dict[str, str]:
    """Every entry under `path` with what it is (content digest, link target, kind)."""
    state = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            state[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            state[rel] = hashlib.blake2b(p.read_bytes()).hexdigest()
        else:
            state[rel] = "dir" if p.is_dir() else "special"
    return state


def hostile_archive(root: Path) -> tuple[Path, Path]:
    """An archive (objects, root, strays, a FIFO, symlinks out) and the directory it points to."""
    outside = root / "outside"
    (outside / "ab").mkdir(parents=True)
    for rel in ("secret", "root", "ab/pleakab", f"ab/{PACK}", "ab/.tmp-x"):
        (outside / rel).write_bytes(SECRET)
    archive = root / "base" / "arch"
    fan = archive / "objects" / "ab"
    fan.mkdir(parents=True)
    (fan / PACK).write_bytes(b"pack-bytes")
    (fan / "pleakab").symlink_to(outside / "secret")
    os.mkfifo(fan / "pfifoab")
    (fan / "Thumbs.db").write_bytes(b"stray")
    (archive / "objects" / "cd").symlink_to(outside / "ab", target_is_directory=True)
    (archive / "objects" / ".DS_Store").write_bytes(b"stray")
    (archive / "root").write_bytes(b"root-bytes")
    return archive, outside


def run_agent(archive: Path, stream: bytes) -> tuple[int, bytes]:
    """serve() the stream in a thread (a hang fails the example); its status and reply bytes."""
    out = io.BytesIO()
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["code"] = agent.serve(agent.Archive(archive), io.BytesIO(stream), out)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(GUARD)
    assert not thread.is_alive(), "the agent hangs on this request stream"
    if "error" in result:
        raise AssertionError(f"the agent raised {result['error']!r}")
    return result["code"], out.getvalue()


def check_replies(data: bytes) -> int:
    """Assert `data` is a sequence of well-formed replies; return how many."""
    pos = count = 0
    while pos < len(data):
        status, length = HEADER.unpack_from(data, pos)
        body = data[pos + HEADER.size : pos + HEADER.size + length]
        assert len(body) == length and status in (0, 1)
        if status == 1:
            assert body and b"\n" not in body and len(body) <= agent.MAX_ERROR
            assert b"internal error" not in body, body
            body.decode("utf-8")
        assert SECRET not in body
        pos += HEADER.size + length
        count += 1
    return count


@BUDGET
@given(stream=STREAMS, locked=st.booleans())
def test_agent_survives_any_request_stream(stream: bytes, locked: bool) -> None:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        root = Path(tmp)
        archive, outside = hostile_archive(root)
        if locked:
            stream = HEADER.pack(9, 0) + stream  # LOCK first, so mutations get through
        before, top = snapshot(outside), sorted(os.listdir(root))
        code, replies = run_agent(archive, stream)
        assert code in (0, 1)
        check_replies(replies)
        assert snapshot(outside) == before
        assert sorted(os.listdir(root)) == top and os.listdir(root / "base") == ["arch"]
        assert (archive / "objects" / "cd").is_symlink()


@BUDGET
@given(op=st.sampled_from(sorted(agent.OPS.values())), payload=PAYLOAD)
def test_agent_handles_any_payload_for_every_operation(op: str, payload: bytes) -> None:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        archive, outside = hostile_archive(Path(tmp))
        before = snapshot(outside)
        stream = HEADER.pack(9, 0) + HEADER.pack(
            next(code for code, name in agent.OPS.items() if name == op), len(payload)
        )
        code, replies = run_agent(archive, stream + payload)
        assert code == 0 and check_replies(replies) == 2
        assert snapshot(outside) == before


# -- (b) replies into QrexecStore ---------------------------------------------------------------


class ReplayProcess(ServiceProcess):
    """An "agent" that has already said `reply` and then hung up; it reads nothing."""

    def __init__(self, reply: bytes) -> None:
        read_end, write_end = os.pipe()
        os.write(write_end, reply)  # under the pipe's 64 KiB: never blocks
        os.close(write_end)
        self.stdout = os.fdopen(read_end, "rb")
        self.stdin = open(os.devnull, "wb")  # noqa: SIM115 - closed by the store or by wait()

    def wait(self, timeout: float | None = None) -> int:
        self.stdout.close()
        return 0

    def kill(self) -> None:
        self.stdout.close()


class ReplayPlatform:
    def __init__(self, replies: list[bytes]) -> None:
        self.replies, self.started = list(replies), []

    def call_service(self, vm: str, service: str, args: list[str]) -> ReplayProcess:
        process = ReplayProcess(self.replies.pop(0) if self.replies else b"")
        self.started.append(process)
        return process


def exercise_lock(store: QrexecStore) -> None:
    with store.lock(wait=0.1):
        pass


CALLS: dict[str, Callable[[QrexecStore], Any]] = {
    "exists": lambda s: s.exists(),
    "create": lambda s: s.create(),
    "put": lambda s: s.put("pab", b"data"),
    "get": lambda s: s.get("pab", 64),
    "range": lambda s: s.get_range("pab", 3, 5),
    "list": lambda s: list(s.list()),
    "delete": lambda s: s.delete("pab"),
    "root_get": lambda s: s.get_root(64),
    "root_put": lambda s: s.put_root(b"root"),
    "clean": lambda s: s.remove_partial_uploads(),
    "lock": exercise_lock,
}
EXPECT: dict[str, Callable[[Any], bool]] = {
    "exists": lambda v: isinstance(v, bool),
    "get": lambda v: isinstance(v, bytes) and len(v) <= 64,
    "range": lambda v: isinstance(v, bytes) and len(v) == 5,
    "list": lambda v: all(isinstance(n, str) and isinstance(z, int) and z >= 0 for n, z in v),
    "root_get": lambda v: v is None or (isinstance(v, bytes) and 0 < len(v) <= 64),
    "clean": lambda v: isinstance(v, int) and v >= 0,
}
LIST_LINES = st.lists(
    st.tuples(
        st.one_of(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,8}", fullmatch=True), st.text(max_size=9)),
        st.one_of(st.integers(0, 2**64).map(str), st.text(max_size=4)),
    ),
    max_size=6,
).map(lambda lines: "".join(f"{n} {z}\n" for n, z in lines).encode("utf-8", "surrogatepass"))


@st.composite
def reply_frames(draw: st.DrawFn) -> bytes:
    """One reply frame: a plausible or arbitrary status and body, an honest or lying length."""
    status = draw(st.one_of(st.sampled_from([0, 0, 1]), st.integers(0, 255)))
    body = draw(st.one_of(LIST_LINES, st.binary(max_size=80), st.sampled_from([b"0", b"1", b""])))
    length = len(body) if draw(st.integers(0, 5)) else draw(st.integers(0, 2**32 - 1))
    return HEADER.pack(status, length) + body


REPLIES = st.one_of(
    st.binary(max_size=300),
    st.lists(reply_frames(), max_size=5).map(b"".join),
)


@BUDGET
@given(call=st.sampled_from(sorted(CALLS)), replies=st.lists(REPLIES, min_size=1, max_size=3))
def test_qrexec_store_survives_any_reply(
    call: str, replies: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qrexec, "LIST_PAGE", 3)  # short pages: the fuzz reaches page two
    platform = ReplayPlatform(replies)
    store = QrexecStore("backupvm", "arch", lambda: cast(Any, platform), timeout=2.0)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = CALLS[call](store)
        except QbhubError as exc:
            outcome["refused"] = exc
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            store.close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(GUARD)
    assert not thread.is_alive(), "QrexecStore waited past its deadline"
    assert "error" not in outcome, f"{call} raised {outcome.get('error')!r}"
    if "refused" in outcome:  # one line, nothing the agent sent can drive the terminal
        assert str(outcome["refused"]).isprintable(), repr(outcome["refused"])
    elif call in EXPECT:
        assert EXPECT[call](outcome["value"]), outcome["value"]
    for process in platform.started:
        process.stdout.close()
        process.stdin.close()


def test_the_fuzzed_archive_is_what_the_agent_tests_expect(tmp_path: Path) -> None:
    """A sanity check of the fixture: the agent serves it, and refuses its traps."""
    archive, _ = hostile_archive(tmp_path)
    stream = b"".join(
        HEADER.pack(op, len(p)) + p
        for op, p in [(2, PACK.encode() + b"\n100"), (2, b"pleakab\n100"), (2, b"pfifoab\n100")]
    )
    code, replies = run_agent(archive, stream + HEADER.pack(4, 0) + HEADER.pack(6, 3) + b"100")
    assert code == 0 and check_replies(replies) == 5
    assert b"pack-bytes" in replies and b"root-bytes" in replies
    assert b"is a symlink" in replies and b"not a regular file" in replies
    shutil.rmtree(archive)
