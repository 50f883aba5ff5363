"""Hostile storage: tampering with an archive is caught, as one line and a non-zero exit.

Acceptance: one authenticated root with a monotonic generation, dom0 remembering the newest
generation it saw (an older root is refused, exit 4); the hash tree catches any swapped, replayed,
truncated, missing or bit-flipped object; each failure is one `qbhub: error:` line, never a
traceback; a restore writes only authenticated data. And names and sizes reveal nothing.

Most tests work on a private copy of one archive built once per module: session 1 backs up volume
ALPHA, session 2 volume BETA, so the packs of each session hold only that volume's chunks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CHUNK, PASSPHRASE, Qbhub, Result, write_image

ALPHA = "vault-banking-private"
BETA = "work-email-secret"
MARKERS = {
    ALPHA: b"QBHUB-PLAINTEXT-MARKER:alpha:7f3a9c51e2d04b68",
    BETA: b"QBHUB-PLAINTEXT-MARKER:beta:0c1d2e3f4a5b6c7d",
}
OBJECT_NAME = re.compile(r"[pi][0-9a-f]{64}")
ROOT_MAGIC = b"QBHUB-ROOT\n"
PACK_MAGIC = b"QBPACK01"
PACK_FOOTER = struct.Struct("<I8s")
PAD_TO = 4096
HUGE = 300 * 1024 * 1024
WINDOW = 16
# Peak memory a command may use without having read a 300 MiB object: scrypt alone takes
# 128 MiB at the default N=2^17, r=8; reading the object would add at least 300 MiB on top.
MAX_RSS_WITHOUT_READING = 400 * 1024 * 1024
FIRST_BLOB_BYTE = 64  # inside the first sealed blob of a pack: a data chunk of the session


# -- helpers ----------------------------------------------------------------------------------


def make_qbhub(home: Path, passphrase: str = PASSPHRASE) -> Qbhub:
    """A CLI runner like the `qbhub` fixture, for a given home (module fixtures need their own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBHUB_")}
    env.update({"QBHUB_HOME": str(home), "QBHUB_PASSPHRASE": passphrase})
    return Qbhub(home, env)


def marked_image(path: Path, blocks: int, seed: int, marker: bytes, tail: bytes = b"") -> Path:
    """A conftest image with `marker` written into its second and its last full block."""
    write_image(path, blocks, seed, tail=tail)
    with open(path, "r+b") as f:
        for block in (1, blocks - 1):
            f.seek(block * CHUNK + 1000)
            f.write(marker)
    return path


def objects(archive: Path) -> dict[str, Path]:
    """Every stored object of a local archive: name -> path."""
    return {p.name: p for p in (archive / "objects").glob("*/*") if not p.name.startswith(".")}


def archive_state(archive: Path) -> dict[str, str]:
    """Relative path -> digest of every file under `archive`: detects any change at all."""
    return {
        str(p.relative_to(archive)): hashlib.blake2b(p.read_bytes()).hexdigest()
        for p in sorted(archive.rglob("*"))
        if p.is_file()
    }


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    """XOR the byte at `offset` (negative: from the end) of `path` with `mask`."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def trailer_offset(pack: Path) -> int:
    """Where a pack's sealed trailer starts (the footer, b"QBPACK01" last, is unencrypted)."""
    data = pack.read_bytes()
    length, magic = PACK_FOOTER.unpack(data[-PACK_FOOTER.size :])
    assert magic == PACK_MAGIC
    return len(data) - PACK_FOOTER.size - length


def make_huge(path: Path) -> None:
    """Grow `path` into a sparse file of HUGE bytes, its real content first."""
    with open(path, "r+b") as f:
        f.truncate(HUGE)


def partial_files(directory: Path) -> list[str]:
    """Names of restore temporaries left in `directory`."""
    return [p.name for p in directory.iterdir() if "qbhub-partial" in p.name]


def assert_one_line_error(result: Result, codes: int | set[int]) -> str:
    """The failure contract: an expected non-zero exit, one `qbhub: error:` line, no traceback."""
    allowed = {codes} if isinstance(codes, int) else codes
    assert 0 not in allowed
    context = f"exit {result.returncode}, stderr: {result.stderr!r}"
    assert result.returncode in allowed, context
    assert "Traceback" not in result.stderr, context
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, context
    assert lines[0].startswith("qbhub: error:"), context
    return lines[0]


def run_measured(q: Qbhub, *args: str | Path, timeout: float = 120) -> tuple[Result, float, int]:
    """Run the CLI; return its result, wall time (s) and the peak RSS of that process (bytes)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "qubes_backup_hub", *map(str, args)],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=q.env,
        )
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        elapsed = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = Result(proc.returncode, out.read().decode(), err.read().decode())
    return result, elapsed, usage.ru_maxrss * 1024


def root_header(root: bytes) -> tuple[int, int, dict[str, object]]:
    """(start, end, parsed JSON) of the readable root header."""
    (hlen,) = struct.unpack_from("<I", root, len(ROOT_MAGIC))
    start = len(ROOT_MAGIC) + 4
    return start, start + hlen, json.loads(root[start : start + hlen])


def with_header(root: bytes, **changes: object) -> bytes:
    """The root with its header JSON fields changed (and the header length fixed up)."""
    _, end, header = root_header(root)
    header.update(changes)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return ROOT_MAGIC + struct.pack("<I", len(raw)) + raw + root[end:]


def value_offset(root: bytes, key: str) -> int:
    """Offset in `root` of the first character of header field `key`'s value (inside quotes)."""
    start, end, _ = root_header(root)
    pos = root.index(f'"{key}":'.encode(), start, end) + len(key) + 3
    return pos + 1 if root[pos : pos + 1] == b'"' else pos


def digit_offset(root: bytes, key: str, last: bool = False) -> int:
    """Offset of the first (or last) decimal digit in the value of header field `key`."""
    pos = value_offset(root, key)
    value_end = re.compile(rb'[",}]').search(root, pos)
    assert value_end is not None
    digits = [i for i in range(pos, value_end.start()) if root[i : i + 1].isdigit()]
    return digits[-1] if last else digits[0]


def plaintext_windows(*images: Path) -> set[bytes]:
    """Every 16-byte run at a multiple of 16 in the images, except all-zero ones.

    Any leaked run of 31 or more consecutive plaintext bytes contains one of these.
    """
    windows: set[bytes] = set()
    zero = bytes(WINDOW)
    for image in images:
        data = image.read_bytes()
        for i in range(0, len(data) - WINDOW + 1, WINDOW):
            piece = data[i : i + WINDOW]
            if piece != zero:
                windows.add(piece)
    return windows


def find_leak(windows: set[bytes], data: bytes) -> int | None:
    """The first offset in `data` where one of `windows` occurs, or None."""
    for i in range(len(data) - WINDOW + 1):
        if data[i : i + WINDOW] in windows:
            return i
    return None


# -- the shared archive -----------------------------------------------------------------------


@dataclass
class World:
    """A two-session archive: ALPHA in session 1, BETA in session 2, and what was written when."""

    archive: Path
    qbhub: Qbhub
    out: Path  # an empty directory for restore targets
    images: dict[str, Path]
    packs: tuple[list[str], list[str]]  # packs written by session 1, by session 2
    indexes: tuple[list[str], list[str]]  # index objects written by session 1, by session 2
    root_after_first: bytes
    archive_after_first: Path  # a whole copy of the archive right after session 1

    def obj(self, name: str) -> Path:
        """The path of stored object `name`."""
        return self.archive / "objects" / name[-2:] / name

    def cli(self, *args: str | Path) -> Result:
        """Run the CLI on this world's machine; failures are results, not exceptions."""
        return self.qbhub.run(*args, check=False)

    def restore(self, volume: str, target: Path, *extra: str) -> Result:
        """Restore `volume` to `target`."""
        return self.cli("volume", "restore", "--dest", self.archive, volume, "--to", target, *extra)

    def backup(self, volume: str) -> Result:
        """Back up `volume` again, from its image."""
        image = self.images[volume]
        return self.cli("volume", "backup", "--dest", self.archive, f"{image}={volume}")


def _split(names: set[str]) -> tuple[list[str], list[str]]:
    """(pack names, index object names) among `names`, sorted."""
    return sorted(n for n in names if n[0] == "p"), sorted(n for n in names if n[0] == "i")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Build the two-session archive once; tests that change it use `world` (a copy)."""
    top = tmp_path_factory.mktemp("hostile")
    images = {
        ALPHA: marked_image(top / "alpha.img", 32, 11, MARKERS[ALPHA], tail=b"odd tail"),
        BETA: marked_image(top / "beta.img", 32, 22, MARKERS[BETA]),
    }
    q = make_qbhub(top / "home")
    archive = top / "archive"
    q.run("init", "--dest", archive)
    q.run("volume", "backup", "--dest", archive, f"{images[ALPHA]}={ALPHA}")
    first = set(objects(archive))
    root_after_first = (archive / "root").read_bytes()
    shutil.copytree(archive, top / "archive-after-1")
    q.run("volume", "backup", "--dest", archive, f"{images[BETA]}={BETA}")
    second = set(objects(archive)) - first
    packs1, indexes1 = _split(first)
    packs2, indexes2 = _split(second)
    assert packs1 and packs2 and indexes1 and indexes2
    out = top / "out"
    out.mkdir()
    return World(
        archive,
        q,
        out,
        images,
        (packs1, packs2),
        (indexes1, indexes2),
        root_after_first,
        top / "archive-after-1",
    )


@pytest.fixture
def world(base: World, tmp_path: Path) -> World:
    """A private copy of the shared archive and of the local state that has seen it."""
    shutil.copytree(base.archive, tmp_path / "archive")
    shutil.copytree(base.qbhub.home, tmp_path / "home")
    (tmp_path / "out").mkdir()
    return dataclasses.replace(
        base,
        archive=tmp_path / "archive",
        qbhub=make_qbhub(tmp_path / "home"),
        out=tmp_path / "out",
    )


# -- rollback of the root ---------------------------------------------------------------------

REPLAY_COMMANDS: dict[str, Callable[[World], Result]] = {
    "list": lambda w: w.cli("list", "--dest", w.archive),
    "verify": lambda w: w.cli("verify", "--dest", w.archive),
    "restore": lambda w: w.restore(ALPHA, w.out / "alpha.img"),
    "backup": lambda w: w.backup(ALPHA),
}


@pytest.mark.parametrize("command", sorted(REPLAY_COMMANDS))
def test_replayed_old_root_is_refused(world: World, command: str) -> None:
    """Put back the root of session 1 after session 2: every command refuses (exit 4)."""
    (world.archive / "root").write_bytes(world.root_after_first)
    before = archive_state(world.archive)
    line = assert_one_line_error(REPLAY_COMMANDS[command](world), 4)
    assert "rollback" in line.lower()
    assert archive_state(world.archive) == before, "a refused command changed the archive"
    assert list(world.out.iterdir()) == []


def test_whole_archive_rollback_is_refused(world: World) -> None:
    """Replace the whole archive directory by its copy from after session 1: refused too."""
    shutil.rmtree(world.archive)
    shutil.copytree(world.archive_after_first, world.archive)
    before = archive_state(world.archive)
    for command in ("list", "backup"):
        assert_one_line_error(REPLAY_COMMANDS[command](world), 4)
    assert archive_state(world.archive) == before


# -- damaged packs ----------------------------------------------------------------------------


@pytest.mark.parametrize("target_exists", [False, True], ids=["new-target", "overwrite"])
def test_bit_flip_in_data_fails_restore_without_partial_file(
    world: World, target_exists: bool
) -> None:
    """A flipped bit in a data chunk: exit 3, and the target is neither created nor touched."""
    flip(world.obj(world.packs[0][0]), FIRST_BLOB_BYTE)
    target = world.out / "alpha.img"
    extra: list[str] = []
    if target_exists:
        target.write_bytes(b"the user's existing file, to be kept on failure")
        extra = ["--overwrite"]
    line = assert_one_line_error(world.restore(ALPHA, target, *extra), 3)
    assert "restore" in line.lower(), "the error should say that the restore failed"
    assert partial_files(world.out) == []
    if target_exists:
        assert target.read_bytes() == b"the user's existing file, to be kept on failure"
        assert sorted(p.name for p in world.out.iterdir()) == ["alpha.img"]
    else:
        assert not target.exists()
        assert list(world.out.iterdir()) == []


def _damage_first_blob(pack: Path) -> None:
    """A byte inside the first sealed blob (a data chunk)."""
    flip(pack, FIRST_BLOB_BYTE)


def _damage_padding(pack: Path) -> None:
    """The byte just before the trailer: random padding (or, 1 time in 4096, the last blob)."""
    flip(pack, trailer_offset(pack) - 1)


def _damage_trailer(pack: Path) -> None:
    """A byte inside the sealed trailer that lists the pack's blobs."""
    flip(pack, trailer_offset(pack) + 20)


def _damage_footer(pack: Path) -> None:
    """The last byte of the b"QBPACK01" footer magic."""
    flip(pack, -1)


def _truncate_tail(pack: Path) -> None:
    """Drop the pack's last byte."""
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size - 1)


PACK_DAMAGE: dict[str, Callable[[Path], None]] = {
    "first-blob": _damage_first_blob,
    "padding": _damage_padding,
    "trailer": _damage_trailer,
    "footer": _damage_footer,
    "truncated-by-one-byte": _truncate_tail,
}


@pytest.mark.parametrize("damage", list(PACK_DAMAGE))
def test_full_verify_catches_any_damage_to_a_pack(world: World, damage: str) -> None:
    """A pack is named by the hash of its bytes: full verify must notice any change to them."""
    PACK_DAMAGE[damage](world.obj(world.packs[0][0]))
    assert_one_line_error(world.cli("verify", "--dest", world.archive), 3)


def test_truncated_pack_fails_restore_and_quick_verify(world: World) -> None:
    """Session 1's pack cut in half: restore fails writing nothing; quick verify notices."""
    pack = world.obj(world.packs[0][0])
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size // 2)
    assert_one_line_error(world.restore(ALPHA, world.out / "alpha.img"), {3, 6})
    assert list(world.out.iterdir()) == []
    assert_one_line_error(world.cli("verify", "--quick", "--dest", world.archive), {3, 6})


def test_deleted_pack_fails_restore_and_quick_verify(world: World) -> None:
    """Session 1's pack deleted: restore fails writing nothing; quick verify notices."""
    world.obj(world.packs[0][0]).unlink()
    assert_one_line_error(world.restore(ALPHA, world.out / "alpha.img"), {3, 6, 7})
    assert list(world.out.iterdir()) == []
    assert_one_line_error(world.cli("verify", "--quick", "--dest", world.archive), {3, 6})


def test_deleted_index_object_is_an_error(world: World) -> None:
    """An index object the root lists is gone: the archive does not open."""
    world.obj(world.indexes[1][0]).unlink()
    assert_one_line_error(world.cli("list", "--dest", world.archive), {3, 6})


def test_swapped_packs_are_detected(world: World) -> None:
    """Pack A's bytes under B's name and B's under A's: nothing decodes, nothing is written."""
    a, b = world.obj(world.packs[0][0]), world.obj(world.packs[1][0])
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    for volume in (ALPHA, BETA):
        assert_one_line_error(world.restore(volume, world.out / f"{volume}.img"), {3, 6})
    assert list(world.out.iterdir()) == []
    assert_one_line_error(world.cli("verify", "--dest", world.archive), 3)


@pytest.mark.parametrize("how", ["replay-older", "swap"])
def test_replayed_or_swapped_index_object_is_detected(world: World, how: str) -> None:
    """Session 1's index object under session 2's index name (or the two swapped): exit 3."""
    old, new = world.obj(world.indexes[0][0]), world.obj(world.indexes[1][0])
    data_old, data_new = old.read_bytes(), new.read_bytes()
    new.write_bytes(data_old)
    if how == "swap":
        old.write_bytes(data_new)
    assert_one_line_error(world.cli("list", "--dest", world.archive), 3)


def test_damage_in_one_volume_does_not_block_restoring_another(world: World) -> None:
    """BETA's chunks are damaged: ALPHA still restores bit-exact, BETA fails cleanly."""
    flip(world.obj(world.packs[1][0]), FIRST_BLOB_BYTE)
    alpha = world.out / "alpha.img"
    result = world.restore(ALPHA, alpha)
    assert result.returncode == 0, result.stderr
    assert alpha.read_bytes() == world.images[ALPHA].read_bytes()
    beta = world.out / "beta.img"
    assert_one_line_error(world.restore(BETA, beta), 3)
    assert not beta.exists()
    assert partial_files(world.out) == []


# -- oversized objects ------------------------------------------------------------------------


def _huge_index(w: World) -> tuple[Path, list[str | Path]]:
    """An index object, read whole when the archive opens."""
    return w.obj(w.indexes[1][0]), ["list", "--dest", w.archive]


def _huge_pack(w: World) -> tuple[Path, list[str | Path]]:
    """A pack, read whole by a full verify."""
    return w.obj(w.packs[0][0]), ["verify", "--dest", w.archive]


def _huge_root(w: World) -> tuple[Path, list[str | Path]]:
    """The root itself."""
    return w.archive / "root", ["list", "--dest", w.archive]


HUGE_CASES: dict[str, Callable[[World], tuple[Path, list[str | Path]]]] = {
    "index": _huge_index,
    "pack": _huge_pack,
    "root": _huge_root,
}


@pytest.mark.parametrize("which", list(HUGE_CASES))
def test_oversized_object_is_refused_without_reading_it(world: World, which: str) -> None:
    """A 300 MB (sparse) object is refused by its size alone: fast, and without the memory."""
    path, args = HUGE_CASES[which](world)
    make_huge(path)
    result, elapsed, peak_rss = run_measured(world.qbhub, *args)
    assert_one_line_error(result, {3, 6})
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert peak_rss < MAX_RSS_WITHOUT_READING, f"peak RSS {peak_rss >> 20} MiB: it was read"


# -- a hostile root ---------------------------------------------------------------------------


def _truncated_body(root: bytes) -> bytes:
    """The real header, then only 10 bytes of the sealed body."""
    return root[: root_header(root)[1] + 10]


def _kdf_not_an_object(root: bytes) -> bytes:
    """Well-formed JSON, but `kdf` is a string instead of an object."""
    return with_header(root, kdf="scrypt")


def _wrapped_key_not_a_string(root: bytes) -> bytes:
    """Well-formed JSON, but `wrapped_key` is a number instead of hex."""
    return with_header(root, wrapped_key=12345)


GARBAGE_ROOTS: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda root: b"",
    "random": lambda root: random.Random(5).randbytes(4096),
    "magic-only": lambda root: ROOT_MAGIC,
    "huge-header-length": lambda root: ROOT_MAGIC + struct.pack("<I", 0xFFFFFFFF) + b"{}",
    "header-not-json": lambda root: ROOT_MAGIC + struct.pack("<I", 8) + b"\xff\xfenotjs",
    "truncated-body": _truncated_body,
    "kdf-not-an-object": _kdf_not_an_object,
    "wrapped-key-not-a-string": _wrapped_key_not_a_string,
}


@pytest.mark.parametrize("garbage", list(GARBAGE_ROOTS))
def test_garbage_root_is_a_clean_error(world: World, garbage: str) -> None:
    """A root that is not a root (or a malformed one): a clean error, never a crash."""
    root = world.archive / "root"
    root.write_bytes(GARBAGE_ROOTS[garbage](root.read_bytes()))
    assert_one_line_error(world.cli("list", "--dest", world.archive), {3, 5})


# name -> (where to flip, XOR mask, accepted exit codes). A mask of 0x01 turns a digit into
# another digit (a still well-formed but wrong value); 0x40 turns it into a non-hex letter.
ROOT_FLIPS: dict[str, tuple[Callable[[bytes], int], int, set[int]]] = {
    "magic": (lambda r: 0, 0x01, {3}),
    "header-length": (lambda r: len(ROOT_MAGIC), 0x01, {3}),
    "format": (lambda r: digit_offset(r, "format"), 0x01, {3}),
    "suite": (lambda r: value_offset(r, "suite"), 0x01, {3}),
    "kdf-n": (lambda r: digit_offset(r, "n", last=True), 0x01, {3}),
    "salt": (lambda r: digit_offset(r, "salt"), 0x01, {3, 5}),
    "salt-not-hex": (lambda r: digit_offset(r, "salt"), 0x40, {3, 5}),
    "wrapped-key": (lambda r: digit_offset(r, "wrapped_key"), 0x01, {3, 5}),
    "wrapped-key-not-hex": (lambda r: digit_offset(r, "wrapped_key"), 0x40, {3, 5}),
    "archive-id": (lambda r: digit_offset(r, "archive_id"), 0x01, {3, 5}),
    "body": (lambda r: -1, 0x01, {3}),
}


@pytest.mark.parametrize("where", list(ROOT_FLIPS))
def test_bit_flip_in_root_is_a_clean_error(world: World, where: str) -> None:
    """One flipped bit anywhere in the root (header or body): refused, one line."""
    locate, mask, codes = ROOT_FLIPS[where]
    root = world.archive / "root"
    flip(root, locate(root.read_bytes()), mask)
    assert_one_line_error(world.cli("list", "--dest", world.archive), codes)


def test_unencrypted_root_cannot_replace_an_encrypted_archive(world: World, tmp_path: Path) -> None:
    """Storage forges an `--encryption off` root (key in the clear) under this archive's ID.

    It needs no passphrase to do so; its generation is higher than any seen, and its sessions
    hold the attacker's data under the victim's volume name. The victim's machine has seen this
    archive encrypted: it must not now accept (or restore from) an unencrypted one.
    """
    from qbhub_native.crypto import Keys, Sealer
    from qbhub_native.root import ROOT_AAD_PREFIX

    attacker = make_qbhub(tmp_path / "attacker-home")
    forged = tmp_path / "forged"
    evil = marked_image(tmp_path / "evil.img", 8, 666, b"ATTACKER-CONTROLLED-CONTENT")
    attacker.run("init", "--encryption", "off", "--dest", forged)
    attacker.run("volume", "backup", "--allow-unencrypted", "--dest", forged, f"{evil}={ALPHA}")
    # Re-seal the forged root's body under the victim's archive ID, with a high generation.
    forged_root = (forged / "root").read_bytes()
    _, end, header = root_header(forged_root)
    assert header["suite"] == "none"
    clear_key = bytes.fromhex(str(header["clear_key"]))
    sealer = Sealer(Keys.for_root("none", clear_key, int(header["format"])))
    body = json.loads(forged_root[end:-16])
    body["generation"] = 1000
    victim_id = root_header((world.archive / "root").read_bytes())[2]["archive_id"]
    header["archive_id"] = victim_id
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    sealed = sealer.seal(ROOT_AAD_PREFIX + raw, json.dumps(body).encode())
    for name, path in objects(forged).items():
        world.obj(name).parent.mkdir(exist_ok=True)
        shutil.copy(path, world.obj(name))
    (world.archive / "root").write_bytes(ROOT_MAGIC + struct.pack("<I", len(raw)) + raw + sealed)

    target = world.out / "alpha.img"
    result = world.restore(ALPHA, target)
    assert not (target.exists() and b"ATTACKER-CONTROLLED-CONTENT" in target.read_bytes()), (
        "restored the attacker's data from a forged unencrypted root"
    )
    assert "unencrypted" in assert_one_line_error(result, 3)
    # Even with the opt-in, an ID this machine knows under another key is not that archive.
    opted_in = world.restore(ALPHA, target, "--allow-unencrypted")
    assert "another key" in assert_one_line_error(opted_in, 3)
    assert list(world.out.iterdir()) == []


# -- names, sizes and plaintext ---------------------------------------------------------------


def test_object_names_and_sizes_reveal_nothing(base: World) -> None:
    """Only root, lock and objects/XY/NAME, NAME being [pi] + 64 hex; packs padded to 4 KiB."""
    assert {p.name for p in base.archive.iterdir()} <= {"root", "lock", "objects"}
    found = list((base.archive / "objects").glob("*/*"))
    assert len(found) == len(base.packs[0] + base.packs[1] + base.indexes[0] + base.indexes[1])
    for path in found:
        assert OBJECT_NAME.fullmatch(path.name), path.name
        assert path.parent.name == path.name[-2:]
        if path.name.startswith("p"):
            assert path.stat().st_size % PAD_TO == 0, (path.name, path.stat().st_size)


def test_archive_holds_no_volume_name_or_plaintext(base: World) -> None:
    """No file of the archive holds a volume name, a marker or any 16-byte plaintext run."""
    windows = plaintext_windows(*base.images.values())
    # The scanner itself works: it finds the marker-bearing plaintext in the image.
    assert find_leak(windows, base.images[ALPHA].read_bytes()[CHUNK : 2 * CHUNK]) is not None
    files = [p for p in base.archive.rglob("*") if p.is_file()]
    assert len(files) >= 4
    for path in files:
        data = path.read_bytes()
        for name in (ALPHA, BETA):
            assert name.encode() not in data, f"volume name {name} in {path}"
            assert MARKERS[name] not in data, f"plaintext marker in {path}"
        leak = find_leak(windows, data)
        assert leak is None, f"plaintext at offset {leak} of {path}"


def test_unencrypted_archive_still_detects_a_bit_flip(
    tmp_path: Path, qbhub: Qbhub, image_factory: Callable[..., Path]
) -> None:
    """With `--encryption off`, keyed checksums still catch accidental damage (exit 3)."""
    archive = tmp_path / "plain-archive"
    image = image_factory(blocks=32, seed=7)
    qbhub.run("init", "--encryption", "off", "--dest", archive)
    opt_in = "--allow-unencrypted"
    qbhub.run("volume", "backup", opt_in, "--dest", archive, f"{image}=disk")
    pack = next(p for n, p in objects(archive).items() if n.startswith("p"))
    flip(pack, FIRST_BLOB_BYTE)
    out = tmp_path / "out"
    out.mkdir()
    restore = qbhub.run(
        "volume", "restore", opt_in, "--dest", archive, "disk", "--to", out / "disk.img",
        check=False,
    )  # fmt: skip
    assert_one_line_error(restore, 3)
    assert list(out.iterdir()) == []
    assert_one_line_error(qbhub.run("verify", opt_in, "--dest", archive, check=False), 3)
    flip(pack, FIRST_BLOB_BYTE)  # repaired; now damage the root body instead
    flip(archive / "root", -5)
    assert_one_line_error(qbhub.run("list", opt_in, "--dest", archive, check=False), 3)
