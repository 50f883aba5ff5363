"""The Borg engine's own checks: marker, rollback memory, restore header, and end to end with
real borg in real bubblewrap sandboxes (skipped only when either is missing)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qubes_backup_hub.errors import IntegrityError, RollbackError
from qubes_backup_hub.platform.local.sandbox import Sandbox
from qubes_backup_hub.progress import Progress
from qubes_backup_hub.safety.restore_channel import DATA, END, HEADER
from qubes_backup_hub.safety.restore_header import RestoreHeader, RestoreVolume

pytest.importorskip("qbhub_borg", reason="qbhub-borg is not installed")

from qbhub_borg import marker as markers
from qbhub_borg.memory import Memory, Seen
from qbhub_borg.receive import parse_header, receive_volume
from qbhub_borg.sessions import next_session, session_key
from qbhub_borg.worker import decode_comment, encode_comment, session_volumes

S1, S2, S3 = "20260101T000000Z", "20260102T000000Z", "20260102T000000Z-1"


def _missing() -> str | None:
    if shutil.which("borg") is None:
        return "borg is not installed (apt install borgbackup)"
    if not Sandbox().sandboxed:
        return "bubblewrap is not usable here; the borg engine runs borg only in a sandbox"
    return None


needs_borg = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


# -- pure parts -------------------------------------------------------------------------------


def test_marker_round_trip_and_strictness() -> None:
    marker = markers.Marker.new(append_only=True)
    assert markers.decode(marker.encode()) == marker
    assert markers.is_marker(marker.encode()) and not markers.is_marker(b"QBHUB-ROOT\n")
    body = json.loads(marker.encode()[len(markers.MAGIC) :])
    for bad in (
        {**body, "engine": "native"},
        {**body, "archive_id": "../x"},
        {**body, "append_only": "yes"},
        {**body, "extra": 1},
        {**body, "encryption": "none"},
    ):
        with pytest.raises(IntegrityError):
            markers.decode(markers.MAGIC + json.dumps(bad).encode())
    with pytest.raises(IntegrityError):
        markers.decode(markers.MAGIC + b"{" * 5000)


def test_session_order_and_next_session() -> None:
    assert sorted([S3, "20260102T000000Z-10", S2, "20260102T000000Z-2"], key=session_key) == [
        S2, S3, "20260102T000000Z-2", "20260102T000000Z-10"
    ]  # fmt: skip
    assert next_session([], now=0) == "19700101T000000Z"
    assert next_session([S3], now=0) == "20260102T000000Z-2"


def test_rollback_memory_refuses_lost_or_older_sessions(tmp_path: Path) -> None:
    memory = Memory(tmp_path, "ab" * 16)
    with memory.locked() as seen:
        assert not seen.known
        seen.check([S1])
        seen.add([S1, S2])
    with memory.locked() as seen:
        assert seen.known and seen.newest == S2
        seen.check([S1, S2, S3])  # a newer session made elsewhere is fine
        with pytest.raises(RollbackError, match="lacks 1 session"):
            seen.check([S2])
        seen.sessions.discard(S1)  # pruned here
        seen.check([S2])
    with pytest.raises(RollbackError, match="older than"):
        Seen({S1}, S2, True).check([S1])


def test_comment_round_trip_skips_malformed_entries() -> None:
    comment = encode_comment("ab" * 16, [("disk", 5), ("vm:private", 0)])
    assert "{" not in comment  # borg expands {placeholders} in comments
    assert session_volumes(comment) == [("disk", 5), ("vm:private", 0)]
    assert decode_comment("not base64!") is None
    bad = encode_comment("x", [("../etc", 1), ("ok", -1), ("fine", 2)])  # type: ignore[list-item]
    assert session_volumes(bad) == [("fine", 2)]


@pytest.mark.parametrize(
    "header",
    [
        {"session": S1, "volumes": [{"name": "other", "size": 1}]},
        {"session": S1, "volumes": [{"name": "disk", "size": -1}]},
        {"session": S1, "volumes": [{"name": "disk", "size": True}]},
        {"session": S1, "volumes": [{"name": "disk", "size": 1 << 60}]},
        {"session": S2, "volumes": [{"name": "disk", "size": 1}]},
        {"session": S1, "volumes": [{"name": "disk", "size": 1}, {"name": "disk", "size": 1}]},
        {"session": S1, "volumes": [{"name": "disk", "size": 1, "x": 1}]},
        {"session": S1, "volumes": [], "vms": []},
    ],
)
def test_restore_header_is_checked_field_by_field(header: dict[str, object]) -> None:
    with pytest.raises(IntegrityError):
        parse_header(json.dumps(header).encode(), name="disk", session=None, known={S1})


def test_restore_header_accepts_the_expected_volume() -> None:
    payload = json.dumps({"session": S1, "volumes": [{"name": "disk", "size": 7}]}).encode()
    header = parse_header(payload, name="disk", session=S1, known={S1, S2})
    assert header.session == S1 and header.volumes[0].size == 7


# -- end to end -------------------------------------------------------------------------------


def qbhub(home: Path, *args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QBHUB_HOME": str(home), "QBHUB_PASSPHRASE": "pw"}
    argv = [sys.executable, "-m", "qubes_backup_hub", *map(str, args)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@needs_borg
def test_storage_rolled_back_is_refused_and_dom0_never_holds_borg_state(tmp_path: Path) -> None:
    home, archive, disk = tmp_path / "home", tmp_path / "archive", tmp_path / "disk.img"
    disk.write_bytes(os.urandom(300_000))
    assert qbhub(home, "init", "--engine", "borg", "--dest", archive).returncode == 0
    assert qbhub(home, "volume", "backup", "--dest", archive, disk).returncode == 0
    shutil.copytree(archive, tmp_path / "old")
    assert qbhub(home, "volume", "backup", "--dest", archive, disk).returncode == 0
    shutil.rmtree(archive)
    shutil.copytree(tmp_path / "old", archive)
    refused = qbhub(home, "list", "--dest", archive)
    assert refused.returncode == 4, refused.stderr
    assert "rolled it back" in refused.stderr or "lacks 1 session" in refused.stderr
    out = tmp_path / "out.img"
    refused = qbhub(home, "volume", "restore", "--dest", archive, "disk.img", "--to", out)
    assert refused.returncode == 4 and not out.exists()
    # dom0 keeps only the rollback memory: no borg cache, keys or security dirs here
    assert sorted(p.name for p in (home / "borg").iterdir())[0].endswith(".json")
    assert not any("cache" in p.parts or "security" in p.parts for p in home.rglob("*"))


@needs_borg
def test_wrong_passphrase_and_hostile_volume_names(tmp_path: Path) -> None:
    home, archive, disk = tmp_path / "home", tmp_path / "archive", tmp_path / "disk.img"
    disk.write_bytes(b"x" * 1000)
    assert qbhub(home, "init", "--engine", "borg", "--dest", archive).returncode == 0
    env = {**os.environ, "QBHUB_HOME": str(home), "QBHUB_PASSPHRASE": "not it"}
    argv = [sys.executable, "-m", "qubes_backup_hub", "list", "--dest", str(archive)]
    wrong = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 5, wrong.stderr
    bad = qbhub(home, "volume", "backup", "--dest", archive, f"{disk}=../x")
    assert bad.returncode == 2


@needs_borg
def test_vm_backup_on_the_local_platform_keeps_volumes_and_settings(tmp_path: Path) -> None:
    home, archive = tmp_path / "home", tmp_path / "archive"
    env = {**os.environ, "QBHUB_HOME": str(home), "QBHUB_PASSPHRASE": "pw"}
    env["QBHUB_PLATFORM"] = "local"

    def run(*args: object) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "qubes_backup_hub", *map(str, args)]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)

    made = run(
        "local", "vm-create", "work", "--class", "StandaloneVM", "--label", "red", "--size", "8M"
    )
    assert made.returncode == 0, made.stderr
    private = home / "local" / "pools" / "default" / "work" / "private.img"
    with open(private, "r+b") as f:
        f.write(os.urandom(100_000))
    assert run("init", "--engine", "borg", "--dest", archive).returncode == 0
    backup = run("backup", "--dest", archive, "work", "--json", "--comment", "before upgrade",
                 "--tag", "weekly")  # fmt: skip
    assert backup.returncode == 0, backup.stderr
    # qbhub list shows what it shows for native sessions (from the encrypted archive comment).
    listed_sessions = json.loads(run("list", "--dest", archive, "--json").stdout)["sessions"]
    assert len(listed_sessions) == 1
    one = listed_sessions[0]
    assert one["engine"] == "borg" and one["vms"] == ["work"] and one["tags"] == ["weekly"]
    assert one["comment"] == "before upgrade" and one["host"] and one["started"][:2] == "20"
    assert one["bytes_read"] == sum(v["size"] for v in one["volumes"]) > 0
    shown = json.loads(run("list", "--dest", archive, "--settings", "--json").stdout)
    assert shown["session"] == one["session"] and [vm["name"] for vm in shown["vms"]] == ["work"]
    assert shown["vms"][0]["settings"]["properties"]["label"] == "red"
    text = run("list", "--dest", archive, "--settings").stdout
    assert "work (StandaloneVM)" in text and "property label = red" in text
    unknown = run("list", "--dest", archive, "--settings", "--session", "20200101T000000Z")
    assert unknown.returncode == 7, unknown.stderr
    assert {v["name"] for v in json.loads(backup.stdout)["volumes"]} == {
        "work:root",
        "work:private",
    }
    out = tmp_path / "private.out"
    restored = run("volume", "restore", "--dest", archive, "work:private", "--to", out)
    assert restored.returncode == 0, restored.stderr
    assert out.read_bytes() == private.read_bytes()
    # VM level, through the Borg worker's own restore stream, checked by dom0 as the native one.
    renamed = run("restore", "--dest", archive, "work", "--rename", "work:work2", "--json")
    assert renamed.returncode == 0, renamed.stderr
    assert json.loads(renamed.stdout)["vms"] == ["work2"]
    listed = {vm["name"]: vm for vm in json.loads(run("local", "list", "--json").stdout)["vms"]}
    copy = Path(next(v["path"] for v in listed["work2"]["volumes"] if v["name"] == "private"))
    assert copy.read_bytes() == private.read_bytes()
    assert listed["work2"]["class"] == "StandaloneVM"
    assert listed["work2"]["properties"]["label"] == "red"
    # --replace: the VM comes back as it was backed up; nothing is left of the holder.
    with open(private, "r+b") as f:
        f.write(b"changed after the backup")
    replaced = run("restore", "--dest", archive, "work", "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert private.read_bytes() == copy.read_bytes()
    # Not found (exit 7), said in one line: a VM or a session the archive lacks.
    for extra in (["nosuchvm"], ["work", "--session", "20200101T000000Z"]):
        missing = run("restore", "--dest", archive, *extra, "--rename", "work:work3")
        assert missing.returncode == 7, missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    all_vms = run("restore", "--dest", archive, "--all")
    assert all_vms.returncode == 2 and "name the VMs" in all_vms.stderr


class FakeWorker:
    """Frames as a (possibly hostile) worker would send them after its header."""

    def __init__(self, frames: list[tuple[bytes, bytes]]) -> None:
        self.frames = frames

    def receive(self, limits: dict[bytes, int]) -> tuple[bytes, bytes]:
        if not self.frames:
            raise IntegrityError("the restore worker ended without finishing its stream")
        kind, payload = self.frames.pop(0)
        assert kind in limits and len(payload) <= limits[kind]
        return kind, payload


def _header(size: int) -> RestoreHeader:
    return RestoreHeader(volumes=(RestoreVolume("disk", size),), session=S1)


@pytest.mark.parametrize(
    "frames",
    [
        [(DATA, b"a" * 10), (DATA, b"b")],  # one byte too many
        [(DATA, b"a" * 9), (END, b"")],  # one byte short
        [(DATA, b"a" * 5)],  # the stream just stops
    ],
)
def test_restore_stream_lies_leave_the_target_untouched(
    tmp_path: Path, frames: list[tuple[bytes, bytes]]
) -> None:
    target = tmp_path / "disk.img"
    target.write_bytes(b"old")
    with pytest.raises(IntegrityError):
        receive_volume(FakeWorker(frames), _header(10), target, Progress(enabled=False))  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img"]


def test_restore_stream_exact_length_is_written_sparse(tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    frames = [(DATA, bytes(1 << 20)), (DATA, b"x" * 7), (END, b"")]
    written = receive_volume(
        FakeWorker(frames), _header((1 << 20) + 7), target, Progress(enabled=False)
    )  # type: ignore[arg-type]
    assert written == 7
    assert target.read_bytes() == bytes(1 << 20) + b"x" * 7
    assert target.stat().st_blocks * 512 < 1 << 20  # the zero megabyte is a hole


@pytest.mark.slow
@needs_borg
def test_append_only_archives(tmp_path: Path) -> None:
    home, disk = tmp_path / "home", tmp_path / "disk.img"
    disk.write_bytes(os.urandom(50_000))
    native = qbhub(home, "init", "--dest", tmp_path / "n", "--append-only")
    assert native.returncode == 2 and "cannot make append-only" in native.stderr
    archive = tmp_path / "archive"
    assert (
        qbhub(home, "init", "--engine", "borg", "--dest", archive, "--append-only").returncode == 0
    )
    assert markers.decode((archive / "root").read_bytes()).append_only
    for _ in range(2):
        assert qbhub(home, "volume", "backup", "--dest", archive, disk).returncode == 0
    pruned = qbhub(home, "prune", "--dest", archive, "--keep-last", "1")
    assert pruned.returncode == 0, pruned.stderr
    out = tmp_path / "out.img"
    assert (
        qbhub(home, "volume", "restore", "--dest", archive, "disk.img", "--to", out).returncode == 0
    )
    assert out.read_bytes() == disk.read_bytes()


def hostile_borg_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, object]:
    """An archive marker and an engine context whose Borg worker is tests/hostile_borg_worker.py,
    started by the real runner in the real sandbox."""
    from qbhub_borg import runner

    from qubes_backup_hub.engine import EngineContext
    from qubes_backup_hub.passphrase import PassphraseSource
    from qubes_backup_hub.registry import load_registry

    tests_dir = Path(__file__).resolve().parent
    roots = runner.import_roots()
    monkeypatch.setattr(runner, "WORKER_MODULE", "hostile_borg_worker")
    monkeypatch.setattr(runner, "import_roots", lambda: (*roots, tests_dir))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    original_spec = runner._spec

    def spec_with_tests(module: str, home: Path, **kw: object) -> object:
        made = original_spec(module, home, **kw)  # type: ignore[arg-type]
        return dataclasses.replace(made, python_path=(tests_dir,))

    monkeypatch.setattr(runner, "_spec", spec_with_tests)
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "root").write_bytes(markers.Marker.new(append_only=False).encode())
    context = EngineContext(
        hook=load_registry().pm.hook,
        passphrase=PassphraseSource(value=b"pw"),
        state_dir=tmp_path / "home",
        progress=Progress(enabled=False),
    )
    return archive, context


@needs_borg
@pytest.mark.parametrize(
    ("lie", "refusal"),
    [
        ("othervm", "other VMs than asked for"),
        ("unsession", "sent session"),
        ("dom0net", "dom0"),
        ("longer", "more bytes than its header declared"),
        ("shorter", "shorter than its header declared"),
        ("flood", "frame \\(limit"),
        ("damaged", "settings document is not JSON"),
    ],
)
def test_hostile_worker_vm_restore_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lie: str, refusal: str
) -> None:
    """A VM-level restore from a Borg worker that lies: dom0's checks (the same as for the hub's
    restore worker) refuse it, and the platform is as before: no VM created, no file left."""
    from qbhub_borg.engine import BorgEngine

    from qubes_backup_hub.errors import QbhubError
    from qubes_backup_hub.jobs.restore import RestoreRequest, restore_vms
    from qubes_backup_hub.platform.base import VMSettings
    from qubes_backup_hub.platform.local.platform import LocalPlatform
    from qubes_backup_hub.store.local import LocalDirStore

    archive, context = hostile_borg_setup(tmp_path, monkeypatch)
    platform = LocalPlatform(tmp_path / "platform")
    platform.create_vm(VMSettings("fedora", "TemplateVM", properties={"label": "black"}), size=4096)
    before = sorted(str(p) for p in (tmp_path / "platform").rglob("*") if "logs" not in p.parts)
    with pytest.raises(QbhubError, match=refusal) as caught:
        restore_vms(
            platform,
            LocalDirStore(archive),
            context.hook,  # type: ignore[attr-defined]
            BorgEngine(context),  # type: ignore[arg-type]
            RestoreRequest(vms=[lie], engine="borg"),
        )
    if lie == "damaged":  # exit 3, like a damaged native session
        assert isinstance(caught.value, IntegrityError)
    assert [vm.name for vm in platform.list_vms()] == ["dom0", "fedora"]
    after = sorted(str(p) for p in (tmp_path / "platform").rglob("*") if "logs" not in p.parts)
    assert after == before


@needs_borg
@pytest.mark.parametrize(
    ("lie", "refusal"),
    [
        ("oversize", "more bytes than it declared"),
        ("undersize", "sent 9 of 10"),
        ("wrongname", "another volume"),
        ("unsession", "did not expect"),
        ("flood", "frame \\(limit"),
    ],
)
def test_hostile_worker_restore_stream_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lie: str, refusal: str
) -> None:
    """The real runner and sandboxes, with a worker that lies: nothing lands, nothing is left."""
    from qbhub_borg.engine import BorgEngine

    from qubes_backup_hub.store.local import LocalDirStore

    archive, context = hostile_borg_setup(tmp_path, monkeypatch)
    target = tmp_path / "out" / "disk.img"
    target.parent.mkdir()
    with pytest.raises(IntegrityError, match=refusal):
        BorgEngine(context).restore_volume(
            LocalDirStore(archive), lie, target, session=None, overwrite=False
        )
    assert list(target.parent.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("qbhub-borg-")]


class ScriptedStream:
    """A Borg-like restore stream: the worker's listing, then an honest stream of the session
    the job names (else the newest listed); one 10-byte private volume per VM."""

    def __init__(self, sessions: list[str], job: object) -> None:
        self.sessions = sessions
        session = getattr(job, "session", None) or sessions[-1]
        vms = [
            {"name": name, "class": "AppVM",
             "settings": {"properties": {"label": "red", "template": "fedora"}},
             "volumes": [{"name": "private", "size": 10}]}
            for name in getattr(job, "vms", [])
        ]  # fmt: skip
        header = json.dumps({"session": session, "vms": vms}).encode()
        data = [(DATA, session.encode()[:10])] * len(vms)
        self.frames = [(HEADER, header), *data, (END, b"")]

    def next_frame(self) -> tuple[bytes, bytes]:
        return self.frames.pop(0)

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("flag", ["replace", "data_only"])
def test_second_run_of_a_two_pass_restore_reads_the_session_the_first_checked(
    tmp_path: Path, flag: str
) -> None:
    """--replace and --data-only receive the whole stream once before importing it from a second
    run of the worker. An engine with a worker of its own lists the sessions again for that run:
    a session committed in between (a concurrent backup, or a worker that says so) must not be
    what the second run imports, unchecked; it reads the session the first run checked."""
    from qubes_backup_hub.errors import UsageError
    from qubes_backup_hub.jobs.restore import RestoreRequest, restore_vms
    from qubes_backup_hub.platform.base import VMSettings
    from qubes_backup_hub.platform.local.platform import LocalPlatform
    from qubes_backup_hub.registry import load_registry
    from qubes_backup_hub.store.local import LocalDirStore

    listings = [[S1], [S1, S2]]
    jobs: list[object] = []

    class OwnWorkerEngine:
        restores_in_own_worker = True

        def describe_session(self, store: object, session: str | None) -> dict[str, object]:
            raise UsageError("only the worker reads sessions")

        def open_vm_restore(self, store: object, job: object) -> ScriptedStream:
            jobs.append(job)
            return ScriptedStream(listings[len(jobs) - 1], job)

    platform = LocalPlatform(tmp_path / "platform")
    platform.create_vm(VMSettings("fedora", "TemplateVM", properties={"label": "black"}), size=4096)
    props = {"label": "red", "template": "fedora"}
    platform.create_vm(VMSettings("work", "AppVM", properties=props), size=4096)
    result = restore_vms(
        platform,
        LocalDirStore(tmp_path),
        load_registry().pm.hook,
        OwnWorkerEngine(),  # type: ignore[arg-type]
        RestoreRequest(vms=["work"], engine="borg", **{flag: True}),  # type: ignore[arg-type]
    )
    assert [getattr(job, "session", None) for job in jobs] == [None, S1]
    assert result["session"] == S1


@needs_borg
@pytest.mark.parametrize("lie", ["honest", "escapes", "huge", "types"])
def test_hostile_worker_listing_prints_safely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lie: str
) -> None:
    """`qbhub list` of a Borg archive shows what the worker relays of each session's comment
    (a comment a compromised backup worker wrote): volume names with terminal escapes, sizes no
    volume has, values of the wrong type. The listing is printable, bounded, and no traceback."""
    from qbhub_borg.engine import BorgEngine

    from qubes_backup_hub.cli.cmd_archive import archive_totals
    from qubes_backup_hub.cli.format import list_text
    from qubes_backup_hub.passphrase import PassphraseSource
    from qubes_backup_hub.store.local import LocalDirStore

    archive, context = hostile_borg_setup(tmp_path, monkeypatch)
    context = dataclasses.replace(context, passphrase=PassphraseSource(value=lie.encode()))  # type: ignore[type-var]
    listing = BorgEngine(context).list_sessions(LocalDirStore(archive), session=None)  # type: ignore[arg-type]
    text = list_text(listing)
    assert all(line.isprintable() for line in text.splitlines()), text
    assert len(text) < 2000, text
    json.dumps(archive_totals(listing))
    (session,) = listing["sessions"]
    if lie == "honest":
        assert session["vms"] == ["work"] and session["tags"] == ["t"], session
        assert session["bytes_read"] == 10 and "private" in text, text


@needs_borg
@pytest.mark.parametrize("lie", ["escapes", "types"])
def test_hostile_worker_settings_print_safely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lie: str
) -> None:
    """`list --settings` of a Borg archive shows the VM documents the worker relays: escapes are
    shown escaped, documents of the wrong type are left out, the session shown is the one dom0
    named (not the worker's), and nothing raises."""
    from qbhub_borg.engine import BorgEngine

    from qubes_backup_hub.cli.format import settings_text
    from qubes_backup_hub.passphrase import PassphraseSource
    from qubes_backup_hub.store.local import LocalDirStore

    archive, context = hostile_borg_setup(tmp_path, monkeypatch)
    context = dataclasses.replace(context, passphrase=PassphraseSource(value=lie.encode()))  # type: ignore[type-var]
    shown = BorgEngine(context).session_settings(LocalDirStore(archive), None)  # type: ignore[arg-type]
    assert shown["session"] == "20260101T000000Z"
    text = settings_text(shown)
    assert all(line.isprintable() for line in text.splitlines()), text
    if lie == "types":
        assert shown["vms"] == []


@needs_borg
@pytest.mark.parametrize("lie", ["escapes", "types"])
def test_hostile_worker_verify_failure_prints_safely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lie: str
) -> None:
    """The worker's account of damage reaches the terminal in the error line: escaped, and a
    list of problems of the wrong type is no traceback."""
    from qbhub_borg.engine import BorgEngine

    from qubes_backup_hub.passphrase import PassphraseSource
    from qubes_backup_hub.store.local import LocalDirStore

    archive, context = hostile_borg_setup(tmp_path, monkeypatch)
    context = dataclasses.replace(context, passphrase=PassphraseSource(value=lie.encode()))  # type: ignore[type-var]
    with pytest.raises(IntegrityError, match="borg check found damage") as caught:
        BorgEngine(context).verify(LocalDirStore(archive), quick=True)  # type: ignore[arg-type]
    assert str(caught.value).isprintable(), caught.value
