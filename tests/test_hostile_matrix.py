"""Hostile storage, generated: every (object kind x tamper class x command) that applies.

One archive is built per module: session 1 backs up ALPHA (image A1) and BETA (B1), session 2
backs up ALPHA again with some blocks changed (A2), and the machine's QBHUB_HOME has seen both
(rollback memory). Each case takes a private copy of the archive and of the home, tampers with one
object kind (root, a pack of session 1, a pack of session 2, an index object, the lock file, a
fan-out directory objects/XY, the objects/ directory itself) in one way, and runs one command:

* `volume restore ALPHA`: exit 0 only with output bit-identical to A2 (nothing else in OUT's
  directory); on failure OUT's directory stays empty.
* `list --json`: exit 0 only with the real sessions and volumes at the real generation.
* `verify`: exit 0 only if every session's volumes then restore bit-identical.
* `volume backup` of A3 (A2 with more blocks changed) as ALPHA: exit 0 only if a fresh restore
  of ALPHA is then bit-identical to A3 (a backup never builds on what storage lost); over a
  pack damaged in place with its size kept (which only reading it back finds), the damage may
  carry into the new session but never silently: the restore then fails as integrity (3) and
  `verify` names the new session.
* `tools/qbhub-extract ARCHIVE ALPHA OUT` (a subset): like restore.

Every failure must be exactly one `qbhub: error:` line on stderr (`qbhub-extract: error:` for
the extractor), optionally preceded by one `qbhub: first contact with ...` notice, with a
documented exit code (3 integrity, 4 rollback, 5 passphrase, 6 storage, 7 not found): never a
traceback, never exit 1, never a hang (every process is killed after TIMEOUT seconds, and that
is a failure), never a huge object read into memory. Special expectations: a replayed root is
exit 4; an archive substituted by an unencrypted one (a downgrade) is exit 3 and one under another
passphrase exit 3 or 5 (never 0), and nothing is written to it; a 10 GiB sparse object is refused
by its size quickly; a symlink to something outside the archive is neither read, written nor
deleted through (an inotify watch on the outside copy must see no event at all); and no file of
the archive (or outside it) holds the user's plaintext afterwards.

Cases run concurrently (HOSTILE_MATRIX_JOBS at a time, default: twice the CPUs) when the module's
fixture first needs them (only the selected ones), each on its own copies; each test then reports
its own case. HOSTILE_MATRIX_REPORT=FILE writes every case's outcome and processes to FILE.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import CHUNK, write_image
from hostile_cases import (
    CASES,
    MATRIX,
    PACKS,
    SAME_SIZE_DAMAGE,
    SUBSTITUTIONS,
    B,
    Case,
    L,
    R,
    V,
    X,
)
from inotify_watch import Watch
from matrix_processes import TIMEOUT, Run, extract_run, qbhub_ok, qbhub_run

pytestmark = [pytest.mark.hostile, pytest.mark.slow]

ALPHA = "alpha-private"
BETA = "beta-private"
ATTACKER_PASSPHRASE = "attacker's own passphrase"

HUGE_SECONDS = 10.0  # a 10 GiB object must be refused this fast (by its size, unread)
MAX_RSS = 512 * 1024 * 1024  # no command may hold anything like a huge object in memory
HUGE_SIZE = 10 * 1024**3
SCAN_LIMIT = 64 * 1024 * 1024  # plaintext scans skip files bigger than this (the sparse ones)
# Commands wait on fsync and sleep a lot: twice as many at a time as there are CPUs.
JOBS = int(os.environ.get("HOSTILE_MATRIX_JOBS", "0")) or 2 * (os.cpu_count() or 1)

# Every block the user's images hold a marker in is random (incompressible) data, so a chunk
# written anywhere in the clear shows the marker as is.
MARK = b"QBHUB-MATRIX-USER-PLAINTEXT:"
ATTACKER_MARK = b"QBHUB-MATRIX-ATTACKER-DATA:"


def tree_state(top: Path) -> dict[str, str]:
    """Relative path -> kind and digest (regular files), without following or opening others."""
    state: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, top)
            if os.path.islink(path):
                state[rel] = f"link {os.readlink(path)}"
            elif os.path.isdir(path):
                state[rel] = "dir"
            elif os.path.isfile(path) and st.st_size <= SCAN_LIMIT:
                with open(path, "rb") as f:
                    state[rel] = hashlib.blake2b(f.read()).hexdigest()
            else:
                state[rel] = f"mode {st.st_mode:o} size {st.st_size}"
    return state


def plaintext_in(top: Path) -> list[str]:
    """Regular files under `top` (symlinks not followed) holding a marker of the user's data."""
    found = []
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not os.path.isfile(path) or os.path.islink(path) or st.st_size > SCAN_LIMIT:
                continue
            with open(path, "rb") as f:
                if MARK in f.read():
                    found.append(path)
    return found


# -- the shared archive -----------------------------------------------------------------------


def marked_image(path: Path, blocks: int, seed: int, marked: list[int], tag: str) -> Path:
    """A conftest image whose blocks `marked` are random data with a user-data marker."""
    write_image(path, blocks, seed)
    rewrite_marked(path, marked, seed, tag)
    return path


def rewrite_marked(path: Path, marked: list[int], seed: int, tag: str) -> None:
    rng = random.Random(seed * 7919)
    with open(path, "r+b") as f:
        for block in marked:
            data = bytearray(rng.randbytes(CHUNK))
            marker = MARK + f"{tag}:{block}:{rng.getrandbits(64):016x}".encode()
            data[1000 : 1000 + len(marker)] = marker
            f.seek(block * CHUNK)
            f.write(data)


@dataclass
class Base:
    """The archive every case copies, and what was in it when."""

    top: Path
    archive: Path
    home: Path
    images: dict[str, Path]  # A1, A2, A3, B1
    packs: tuple[list[str], list[str]]  # packs written by session 1, by session 2
    indexes: tuple[list[str], list[str]]  # index objects written by session 1, by session 2
    root_after_first: bytes
    sessions: list[str]
    listing: dict[str, Any]  # `list --json` of the intact archive
    substitutes: dict[str, Path]  # tamper name -> an attacker's whole archive

    def obj(self, archive: Path, name: str) -> Path:
        return archive / "objects" / name[-2:] / name


def stored_objects(archive: Path) -> set[str]:
    return {p.name for p in (archive / "objects").glob("*/*") if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    top = tmp_path_factory.mktemp("matrix")
    images = {
        "A1": marked_image(top / "a1.img", 48, 31, [2, 6, 20, 40], "A1"),
        "B1": marked_image(top / "b1.img", 24, 32, [3, 17], "B1"),
    }
    images["A2"] = top / "a2.img"
    shutil.copyfile(images["A1"], images["A2"])
    rewrite_marked(images["A2"], [5, 6, 7, 8, 9, 30], 33, "A2")
    images["A3"] = top / "a3.img"
    shutil.copyfile(images["A2"], images["A3"])
    rewrite_marked(images["A3"], [12, 13, 44], 34, "A3")

    home, archive = top / "home", top / "archive"
    qbhub_ok(home, top, "init", "--dest", archive)
    qbhub_ok(
        home, top, "volume", "backup", "--dest", archive,
        f"{images['A1']}={ALPHA}", f"{images['B1']}={BETA}",
    )  # fmt: skip
    first = stored_objects(archive)
    root_after_first = (archive / "root").read_bytes()
    qbhub_ok(home, top, "volume", "backup", "--dest", archive, f"{images['A2']}={ALPHA}")
    second = stored_objects(archive) - first
    listing = json.loads(qbhub_ok(home, top, "list", "--dest", archive, "--json").stdout)
    sessions = [s["session"] for s in listing["sessions"]]
    assert len(sessions) == 2, listing

    def split(names: set[str]) -> tuple[list[str], list[str]]:
        return sorted(n for n in names if n[0] == "p"), sorted(n for n in names if n[0] == "i")

    packs1, indexes1 = split(first)
    packs2, indexes2 = split(second)
    assert packs1 and packs2 and indexes1 and indexes2, (first, second)

    # Two attackers' archives, each holding the attacker's data under the user's volume names.
    substitutes = {}
    evil = write_image(top / "evil.img", 8, 666)
    with open(evil, "r+b") as f:
        f.seek(CHUNK + 100)
        f.write(ATTACKER_MARK * 4)
    for tamper, init_args, passphrase in (
        ("subst-off", ["--encryption", "off", "--allow-unencrypted"], "unused"),
        ("subst-enc", [], ATTACKER_PASSPHRASE),
    ):
        attacker_home, dest = top / f"{tamper}-home", top / tamper
        flags = ["--allow-unencrypted"] if tamper == "subst-off" else []
        qbhub_ok(attacker_home, top, "init", "--dest", dest, *init_args, passphrase=passphrase)
        for volume in (ALPHA, BETA):
            qbhub_ok(
                attacker_home, top, "volume", "backup", "--dest", dest, *flags,
                f"{evil}={volume}", passphrase=passphrase,
            )  # fmt: skip
        substitutes[tamper] = dest

    return Base(
        top=top,
        archive=archive,
        home=home,
        images=images,
        packs=(packs1, packs2),
        indexes=(indexes1, indexes2),
        root_after_first=root_after_first,
        sessions=sessions,
        listing=listing,
        substitutes=substitutes,
    )


# -- one case's world -------------------------------------------------------------------------


@dataclass
class Ctx:
    """A private copy of the archive and home, and the directories a case may look at."""

    base: Base
    dir: Path
    archive: Path
    home: Path
    out: Path  # restore targets: must hold nothing but a correct output
    outside: Path  # outside the archive: symlink targets live here
    runs: list[Run] = field(default_factory=list)

    def qbhub(self, *args: str | Path) -> Run:
        run = qbhub_run(self.home, self.dir, *args)
        self.runs.append(run)
        return run

    def extract(self, *args: str | Path) -> Run:
        run = extract_run(self.dir, *args)
        self.runs.append(run)
        return run

    def obj(self, name: str) -> Path:
        return self.base.obj(self.archive, name)


def make_ctx(base: Base, directory: Path) -> Ctx:
    ctx = Ctx(
        base,
        directory,
        directory / "archive",
        directory / "home",
        directory / "out",
        directory / "outside",
    )
    shutil.copytree(base.archive, ctx.archive, symlinks=True)
    shutil.copytree(base.home, ctx.home, symlinks=True)
    ctx.out.mkdir()
    ctx.outside.mkdir()
    return ctx


# -- object kinds -----------------------------------------------------------------------------


def _target(ctx: Ctx, kind: str) -> Path:
    """The path of the object of `kind` in this case's archive."""
    b = ctx.base
    return {
        "root": lambda: ctx.archive / "root",
        "pack1": lambda: ctx.obj(b.packs[0][0]),
        "pack2": lambda: ctx.obj(b.packs[1][0]),
        "index": lambda: ctx.obj(b.indexes[0][0]),
        "lock": lambda: ctx.archive / "lock",
        "fanout": lambda: ctx.obj(b.packs[0][0]).parent,
        "objects": lambda: ctx.archive / "objects",
    }[kind]()


def _other(ctx: Ctx, kind: str) -> Path:
    """Another object of the same kind (for swaps)."""
    b = ctx.base
    if kind == "pack1":
        return ctx.obj(b.packs[1][0])
    if kind == "pack2":
        return ctx.obj(b.packs[0][0])
    if kind == "index":
        return ctx.obj(b.indexes[1][0])
    if kind == "fanout":
        mine = _target(ctx, "fanout").name
        names = b.packs[1] + b.indexes[1] + b.indexes[0] + b.packs[0]
        return next(ctx.obj(n).parent for n in names if n[-2:] != mine)
    raise AssertionError(f"no swap for {kind}")


# -- tamper classes ---------------------------------------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _delete(ctx: Ctx, path: Path, kind: str) -> None:
    _remove(path)


def _truncate(fraction: float | None, minus: int = 0) -> Callable[[Ctx, Path, str], None]:
    def tamper(ctx: Ctx, path: Path, kind: str) -> None:
        size = path.stat().st_size
        assert size > minus, (path, size)
        os.truncate(path, int(size * fraction) if fraction is not None else size - minus)

    return tamper


def _append(ctx: Ctx, path: Path, kind: str) -> None:
    with open(path, "ab") as f:
        f.write(random.Random(7).randbytes(4096))


def _flip(where: str) -> Callable[[Ctx, Path, str], None]:
    def tamper(ctx: Ctx, path: Path, kind: str) -> None:
        data = bytearray(path.read_bytes())
        assert data, path
        offset = {"start": 0, "mid": len(data) // 2, "end": len(data) - 1}[where]
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))

    return tamper


def _swap(ctx: Ctx, path: Path, kind: str) -> None:
    other = _other(ctx, kind)
    if kind == "fanout":  # the two directories exchange names
        parking = path.with_name(".parked")
        path.rename(parking)
        other.rename(path)
        parking.rename(other)
    else:  # another object's bytes under this object's name
        path.write_bytes(other.read_bytes())


def _replay(ctx: Ctx, path: Path, kind: str) -> None:
    path.write_bytes(ctx.base.root_after_first)


def _fifo(ctx: Ctx, path: Path, kind: str) -> None:
    _remove(path)
    os.mkfifo(path)


def _symlink(ctx: Ctx, path: Path, kind: str) -> None:
    """A symlink to a copy outside the archive, so that a follower would 'succeed'."""
    copy = ctx.outside / path.name
    if path.is_dir():
        shutil.copytree(path, copy, symlinks=True)
    else:
        shutil.copy2(path, copy)
    _remove(path)
    path.symlink_to(copy)


def _directory(ctx: Ctx, path: Path, kind: str) -> None:
    _remove(path)
    path.mkdir()


def _regular_file(ctx: Ctx, path: Path, kind: str) -> None:
    _remove(path)
    path.write_bytes(b"")


def _huge(ctx: Ctx, path: Path, kind: str) -> None:
    os.truncate(path, HUGE_SIZE)  # sparse: the real bytes first, then 10 GiB of holes


def _substitute(ctx: Ctx, path: Path, kind: str) -> None:
    """The whole archive replaced by an attacker's (`kind` here names which substitute)."""
    shutil.rmtree(ctx.archive)
    shutil.copytree(ctx.base.substitutes[kind], ctx.archive, symlinks=True)


TAMPERS: dict[str, Callable[[Ctx, Path, str], None]] = {
    "delete": _delete,
    "trunc0": _truncate(0.0),
    "trunc-half": _truncate(0.5),
    "trunc1": _truncate(None, minus=1),
    "append": _append,
    "flip-start": _flip("start"),
    "flip-mid": _flip("mid"),
    "flip-end": _flip("end"),
    "swap": _swap,
    "replay": _replay,
    "fifo": _fifo,
    "symlink": _symlink,
    "dir": _directory,
    "file": _regular_file,
    "huge": _huge,
    "subst-off": lambda ctx, path, kind: _substitute(ctx, path, "subst-off"),
    "subst-enc": lambda ctx, path, kind: _substitute(ctx, path, "subst-enc"),
}


# -- checks -----------------------------------------------------------------------------------


def check_process(case: Case, run: Run) -> None:
    """What every process must do, whatever its exit code."""
    assert not run.timed_out, f"no answer within {TIMEOUT:.0f} s (killed): {run.describe()}"
    assert "Traceback" not in run.stderr, run.describe()
    assert run.peak_rss < MAX_RSS, f"peak RSS {run.peak_rss >> 20} MiB: {run.describe()}"
    if case.tamper == "huge":
        assert run.elapsed < HUGE_SECONDS, f"a huge object was read: {run.describe()}"


def check_refusal(case: Case, run: Run) -> None:
    """A failure: a documented exit code and exactly one error line."""
    allowed = case.allowed_codes()
    assert run.returncode in allowed, f"expected exit in {sorted(allowed)}: {run.describe()}"
    lines = run.stderr.splitlines()
    # The one notice allowed beside the error: qbhub's on first contact with an archive, the
    # stateless extractor's identification of the archive it found (it has no memory).
    prefix, notice = (
        ("qbhub-extract: error: ", "qbhub-extract: archive ")
        if case.command == X
        else ("qbhub: error: ", "qbhub: first contact with ")
    )
    errors = [line for line in lines if line.startswith(prefix)]
    notices = [line for line in lines if line.startswith(notice)]
    assert len(errors) == 1 and len(notices) <= 1, f"not one error line: {run.describe()}"
    assert len(lines) == len(errors) + len(notices), f"extra stderr lines: {run.describe()}"


def check_restored(ctx: Ctx, run: Run, target: Path, expected: Path, what: str) -> None:
    """A restore that exited 0 wrote exactly the expected image, and nothing else beside it."""
    assert target.is_file() and not target.is_symlink(), f"{what}: no output: {run.describe()}"
    assert target.read_bytes() == expected.read_bytes(), (
        f"{what}: exit 0 but the output differs from {expected.name}: {run.describe()}"
    )
    assert sorted(p.name for p in ctx.out.iterdir()) == [target.name], (
        f"{what}: other files beside the output: {sorted(p.name for p in ctx.out.iterdir())}"
    )
    target.unlink()


def check_restore_after(ctx: Ctx, case: Case, volume: str, expected: Path, *extra: str) -> None:
    """An oracle restore after a command claimed success: must succeed bit-identical."""
    target = ctx.out / "check.img"
    run = ctx.qbhub("volume", "restore", "--dest", ctx.archive, volume, "--to", target, *extra)
    check_process(case, run)
    assert run.returncode == 0, (
        f"{case.command} exited 0, but then {volume} {' '.join(extra)} does not restore: "
        f"{run.describe()}"
    )
    check_restored(ctx, run, target, expected, f"restore after {case.command}")


def check_damage_never_silent(ctx: Ctx, case: Case, backup: Run, expected: Path) -> None:
    """After a backup over a pack damaged in place (right size, bytes changed).

    A backup checks that the packs it reuses are present and rightly sized (a lost pack is
    stored again); it does not read back what it reuses, which would cost a full restore's
    reads from storage every night (restic and Borg do not either). So the new session may
    build on the damaged blobs, and then the damage must never be silent: the restore refuses
    with an integrity error, and `verify` reports the damage as affecting the new session.
    """
    target = ctx.out / "check.img"
    run = ctx.qbhub("volume", "restore", "--dest", ctx.archive, ALPHA, "--to", target)
    check_process(case, run)
    if run.returncode == 0:
        check_restored(ctx, run, target, expected, "restore after backup")
        return
    assert run.returncode == 3, f"a damaged new session must fail as integrity: {run.describe()}"
    target.unlink(missing_ok=True)
    committed = re.search(r"^Session (\S+) committed", backup.stdout, re.MULTILINE)
    assert committed, f"the backup names no session: {backup.describe()}"
    newest = committed.group(1)
    verify = ctx.qbhub("verify", "--dest", ctx.archive)
    check_process(case, verify)
    assert verify.returncode == 3, f"verify must report the damage: {verify.describe()}"
    assert newest in verify.stdout + verify.stderr, (
        f"verify does not name the new session {newest}: {verify.describe()}"
    )


def listing_facts(listing: dict[str, Any]) -> Any:
    return (
        listing.get("archive_id"),
        listing.get("generation"),
        [
            (s.get("session"), sorted((v.get("name"), v.get("size")) for v in s.get("volumes", [])))
            for s in listing.get("sessions", [])
        ],
    )


def run_command(ctx: Ctx, case: Case) -> None:
    """Run the case's command and check its outcome."""
    images = ctx.base.images
    if case.command in (R, X):
        target = ctx.out / "restored.img"
        if case.command == R:
            run = ctx.qbhub("volume", "restore", "--dest", ctx.archive, ALPHA, "--to", target)
        else:
            run = ctx.extract(ctx.archive, ALPHA, target)
        check_process(case, run)
        if run.returncode != 0:
            check_refusal(case, run)
            left = sorted(p.name for p in ctx.out.iterdir())
            assert left == [], f"a failed restore left files: {left}: {run.describe()}"
            return
        assert case.may_succeed(), f"must be refused, exited 0: {run.describe()}"
        check_restored(ctx, run, target, images["A2"], case.command)
    elif case.command == L:
        run = ctx.qbhub("list", "--dest", ctx.archive, "--json")
        check_process(case, run)
        if run.returncode != 0:
            check_refusal(case, run)
            return
        assert case.may_succeed(), f"must be refused, exited 0: {run.describe()}"
        try:
            listing = json.loads(run.stdout)
        except ValueError:
            raise AssertionError(f"list exited 0 without JSON: {run.stdout!r}") from None
        assert listing_facts(listing) == listing_facts(ctx.base.listing), (
            f"list exited 0 with a wrong listing: {listing_facts(listing)}, expected "
            f"{listing_facts(ctx.base.listing)}"
        )
    elif case.command == V:
        run = ctx.qbhub("verify", "--dest", ctx.archive)
        check_process(case, run)
        if run.returncode != 0:
            check_refusal(case, run)
            return
        assert case.may_succeed(), f"must be refused, exited 0: {run.describe()}"
        # "Archive OK" must mean it: every volume of every session restores bit-identical.
        check_restore_after(ctx, case, ALPHA, images["A2"])
        check_restore_after(ctx, case, BETA, images["B1"])
        check_restore_after(ctx, case, ALPHA, images["A1"], "--session", ctx.base.sessions[0])
    elif case.command == B:
        source = ctx.dir / "src"
        source.mkdir()
        image = source / "alpha.img"
        shutil.copyfile(images["A3"], image)
        run = ctx.qbhub("volume", "backup", "--dest", ctx.archive, f"{image}={ALPHA}")
        check_process(case, run)
        if run.returncode != 0:
            check_refusal(case, run)
            return
        assert case.may_succeed(), f"must be refused, exited 0: {run.describe()}"
        if case.kind in PACKS and case.tamper in SAME_SIZE_DAMAGE:
            check_damage_never_silent(ctx, case, run, images["A3"])
        else:
            # A backup never builds on what storage lost: what it stored restores bit-identical.
            check_restore_after(ctx, case, ALPHA, images["A3"])
    else:
        raise AssertionError(case.command)


def run_case(base: Base, case: Case, directory: Path, runs: list[Run]) -> None:
    ctx = make_ctx(base, directory)
    ctx.runs = runs
    TAMPERS[case.tamper](ctx, _target(ctx, case.kind), case.kind)
    outside_before = tree_state(ctx.outside)
    archive_before = tree_state(ctx.archive) if case.tamper in SUBSTITUTIONS else {}
    watch = Watch(ctx.outside)  # from here on, only the commands may touch it (nothing may)
    try:
        run_command(ctx, case)
        events = watch.events()
    finally:
        watch.close()
    done = "; ".join(run.describe() for run in ctx.runs)
    assert events == [], f"touched outside the archive: {events[:6]} ({len(events)}); {done}"
    assert tree_state(ctx.outside) == outside_before, f"changed outside the archive; {done}"
    if case.tamper in SUBSTITUTIONS:
        after = tree_state(ctx.archive)
        changed = sorted(
            k for k in set(after) | set(archive_before) if after.get(k) != archive_before.get(k)
        )
        assert changed == [], f"wrote to an archive not under the user's key: {changed}; {done}"
    leaks = plaintext_in(ctx.archive) + plaintext_in(ctx.outside)
    assert leaks == [], f"the user's plaintext was written to {leaks}; {done}"


# -- running the matrix -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def outcomes(
    base: Base, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, BaseException | None]:
    """Run every selected case (concurrently, each on its own copies) once; keep each outcome."""
    here = Path(__file__).resolve()
    wanted = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "case" in callspec.params and item.path.resolve() == here:
            wanted.append(callspec.params["case"])
    top = tmp_path_factory.mktemp("cases")
    directories = {}
    for case in wanted:
        directories[case.id] = top / case.id
        directories[case.id].mkdir()

    runs_seen: dict[str, list[Run]] = {}

    def one(case: Case) -> BaseException | None:
        try:
            run_case(base, case, directories[case.id], runs_seen.setdefault(case.id, []))
        except Exception as exc:
            return exc
        shutil.rmtree(directories[case.id], ignore_errors=True)  # kept only when it failed
        return None

    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        results = dict(zip([c.id for c in wanted], pool.map(one, wanted), strict=True))
    report = os.environ.get("HOSTILE_MATRIX_REPORT")
    if report:  # for people reading the matrix: every case's processes and outcome
        with open(report, "w") as f:
            json.dump({k: str(v) if v else "ok" for k, v in results.items()}, f, indent=1)
            f.write("\n")
            for case in wanted:
                for run in runs_seen.get(case.id, []):
                    f.write(f"{case.id}: {run.describe()}\n")
    return results


# Open defects found by this matrix, recorded (strict: a fixed one fails until removed here).
KNOWN_GAPS: dict[str, str] = {}


def _param(case: Case) -> object:
    gap = KNOWN_GAPS.get(case.id)
    marks = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_hostile_matrix(case: Case, outcomes: dict[str, BaseException | None]) -> None:
    """One (object kind, tamper class, command): a correct result or one clean refusal."""
    failure = outcomes[case.id]
    if failure is not None:
        raise failure


def test_matrix_is_large_enough() -> None:
    """The matrix covers every kind and at least 150 cases."""
    assert len(CASES) >= 150
    assert {c.kind for c in CASES} == set(MATRIX) and len(MATRIX) == 7
