"""tools/qbhub-extract, the standalone emergency extractor, against archives the engine made.

The extractor runs as `python -I tools/qbhub-extract` with an empty PYTHONPATH, and its source
must not import qbhub: it has to work with only Python, cryptography, zstandard and blake3.
Every run names the archive it opened on stderr (one `qbhub-extract: archive ...` line); it refuses
unencrypted archives without --allow-unencrypted, absurd scrypt parameters, and archive files that
are not regular files; it reads index objects with and without padding.
"""

from __future__ import annotations

import json
import os
import re
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import CHUNK, PASSPHRASE, Qbhub, rewrite_blocks

EXTRACT = Path(__file__).resolve().parent.parent / "tools" / "qbhub-extract"


def extract(
    *args: str | Path, passphrase: str | None = PASSPHRASE, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[bytes]:
    """Run the extractor isolated from qbhub: `python -I`, empty PYTHONPATH, no QBHUB_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QBHUB_", "PYTHON"))}
    env["PYTHONPATH"] = ""
    if passphrase is not None:
        env["QBHUB_PASSPHRASE"] = passphrase
    return subprocess.run(
        [sys.executable, "-I", *flags, str(EXTRACT), *map(str, args)],
        capture_output=True,
        env=env,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


FACTS_LINE = re.compile(
    r"qbhub-extract: archive (?P<id>[0-9a-f]{32})(?P<plain> \(UNENCRYPTED\))?: key fingerprint "
    r"(?P<fingerprint>[0-9a-f]{32}), generation (?P<generation>[0-9]+), newest session "
    r"(?P<newest>.+)"
)


def facts(proc: subprocess.CompletedProcess[bytes]) -> re.Match[str] | None:
    """The archive line the run printed on stderr (first line), if any."""
    lines = proc.stderr.decode().splitlines()
    return FACTS_LINE.fullmatch(lines[0]) if lines else None


def ok(proc: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    """Assert the extractor succeeded with nothing on stderr but the archive line."""
    assert proc.returncode == 0, proc.stderr.decode()
    assert facts(proc) is not None and proc.stderr.decode().count("\n") == 1, proc.stderr
    return proc


def one_error_line(proc: subprocess.CompletedProcess[bytes], code: int) -> str:
    """Assert the run failed with `code` and exactly one `qbhub-extract: error:` line (after
    the archive line, when the root was authenticated before the failure)."""
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    if facts(proc) is not None:
        err = err.split("\n", 1)[1]
    assert err.startswith("qbhub-extract: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def backup(qbhub: Qbhub, archive: Path, *volumes: str) -> Any:
    """One backup session of `volumes` (PATH=NAME), returning the parsed JSON result."""
    return qbhub.json("volume", "backup", "--dest", archive, *volumes)


def test_extractor_is_standalone() -> None:
    source = EXTRACT.read_text()
    assert source.startswith("#!/usr/bin/env python3\n")
    assert os.access(EXTRACT, os.X_OK)
    for name in ("qubes_backup_hub", "qbhub_native"):
        assert name not in source


def test_imports_nothing_from_qbhub(qbhub: Qbhub, archive: Path, image_factory) -> None:
    backup(qbhub, archive, f"{image_factory(blocks=4)}=disk")
    proc = extract(archive, "--list", flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr.decode()
    modules = [
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.decode().splitlines()
        if line.startswith("import time:")
    ]
    assert "blake3" in modules and "zstandard" in modules
    assert not [m for m in modules if m.split(".")[0] in ("qubes_backup_hub", "qbhub_native")]


def test_full_session_bit_exact(tmp_path: Path, qbhub: Qbhub, archive: Path, image_factory) -> None:
    disk, other = image_factory(blocks=96, seed=3), image_factory(blocks=20, seed=4)
    backup(qbhub, archive, f"{disk}=disk", f"{other}=private")
    for name, image in (("disk", disk), ("private", other)):
        out = tmp_path / f"{name}.out"
        ok(extract(archive, name, out))
        assert out.read_bytes() == image.read_bytes()
    streamed = ok(extract(archive, "disk", "-")).stdout
    assert streamed == disk.read_bytes()


def test_older_session_after_incremental(
    tmp_path: Path, qbhub: Qbhub, archive: Path, image_factory
) -> None:
    image = image_factory(blocks=80, seed=5)
    first_bytes = image.read_bytes()
    first = backup(qbhub, archive, f"{image}=disk")
    rewrite_blocks(image, [0, 41, 79])
    second = backup(qbhub, archive, f"{image}=disk")
    assert second["volumes"][0]["chunks_new"] == 3
    newest, older = tmp_path / "newest.img", tmp_path / "older.img"
    ok(extract(archive, "disk", newest))
    assert newest.read_bytes() == image.read_bytes()
    ok(extract(archive, "disk", older, "--session", first["session"]))
    assert older.read_bytes() == first_bytes
    ok(extract(archive, "--session", second["session"], "disk", tmp_path / "second.img"))
    assert (tmp_path / "second.img").read_bytes() == image.read_bytes()


def test_sparse_volume_restores_sparse(
    tmp_path: Path, qbhub: Qbhub, archive: Path, image_factory
) -> None:
    image = image_factory(blocks=200, seed=6, zero_fraction=0.7, holes=True)
    data = image.read_bytes()
    nonzero = sum(1 for i in range(0, len(data), CHUNK) if data[i : i + CHUNK].strip(b"\0"))
    assert nonzero < 100
    backup(qbhub, archive, f"{image}=sparse")
    out = tmp_path / "sparse.out"
    ok(extract(archive, "sparse", out))
    assert out.read_bytes() == data
    if image.stat().st_blocks * 512 >= len(data):
        pytest.skip("this filesystem does not keep files sparse")
    assert out.stat().st_blocks * 512 <= nonzero * CHUNK + CHUNK


@pytest.mark.parametrize(
    "blocks, tail", [(0, b""), (0, b"x"), (3, b"odd tail" * 1000), (257, b"!")]
)
def test_odd_sizes(
    tmp_path: Path, qbhub: Qbhub, archive: Path, image_factory, blocks: int, tail: bytes
) -> None:
    image = image_factory(blocks=blocks, seed=7, tail=tail)
    size = image.stat().st_size
    backup(qbhub, archive, f"{image}=odd")
    out = tmp_path / "odd.out"
    ok(extract(archive, "odd", out))
    assert out.stat().st_size == size
    assert out.read_bytes() == image.read_bytes()


def test_encryption_off_needs_no_passphrase_but_the_opt_in(
    tmp_path: Path, qbhub: Qbhub, image_factory
) -> None:
    archive = tmp_path / "clear"
    qbhub.run("init", "--dest", archive, "--encryption", "off", "--chunk-size", "16384")
    image = image_factory(blocks=30, seed=8, tail=b"tail")
    backup(qbhub, archive, "--allow-unencrypted", f"{image}=clear")
    out = tmp_path / "clear.out"
    err = one_error_line(extract(archive, "clear", out, passphrase=None), 3)
    assert "unencrypted" in err and "--allow-unencrypted" in err
    assert not out.exists()
    proc = ok(extract(archive, "clear", out, "--allow-unencrypted", passphrase=None))
    assert out.read_bytes() == image.read_bytes()
    line = facts(proc)
    assert line is not None and line["plain"]


def test_wrong_passphrase_exits_5(
    tmp_path: Path, qbhub: Qbhub, archive: Path, image_factory
) -> None:
    backup(qbhub, archive, f"{image_factory(blocks=4)}=disk")
    out = tmp_path / "out.img"
    err = one_error_line(extract(archive, "disk", out, passphrase="wrong"), 5)
    assert "passphrase" in err
    one_error_line(extract(archive, "disk", out, passphrase=None), 5)
    assert not out.exists()


def flip_bit(path: Path, offset: int) -> None:
    """Flip the lowest bit of the byte at `offset` of `path`."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def largest(paths: Callable[[], list[Path]]) -> Path:
    """The largest of some files."""
    return max(paths(), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("target", ["pack", "pack-middle", "index", "root"])
def test_damage_is_detected_and_leaves_no_output(
    tmp_path: Path, qbhub: Qbhub, archive: Path, image_factory, target: str
) -> None:
    image = image_factory(blocks=64, seed=9, zero_fraction=0.0)
    backup(qbhub, archive, f"{image}=disk")
    packs = largest(lambda: list(archive.glob("objects/*/p*")))
    if target == "pack":
        flip_bit(packs, 10)
    elif target == "pack-middle":
        flip_bit(packs, packs.stat().st_size // 2)
    elif target == "index":
        flip_bit(largest(lambda: list(archive.glob("objects/*/i*"))), 40)
    else:
        flip_bit(archive / "root", (archive / "root").stat().st_size - 5)
    outdir = tmp_path / "out"
    outdir.mkdir()
    one_error_line(extract(archive, "disk", outdir / "disk.img"), 3)
    assert list(outdir.iterdir()) == []
    one_error_line(extract(archive, "disk", "-"), 3)


def test_every_run_names_the_archive_it_opened(qbhub: Qbhub, archive: Path, image_factory) -> None:
    """ID, key fingerprint (the engine's), generation and newest session time, on stderr."""
    empty = facts(ok(extract(archive, "--list")))
    assert empty is not None and empty["newest"] == "no session yet"
    backup(qbhub, archive, f"{image_factory(blocks=2)}=disk")
    listing = qbhub.json("list", "--dest", archive)
    line = facts(ok(extract(archive, "--list")))
    assert line is not None and not line["plain"]
    assert line["id"] == listing["archive_id"]
    assert line["fingerprint"] == listing["fingerprint"]
    assert int(line["generation"]) == listing["generation"]
    newest = listing["sessions"][-1]
    assert line["newest"] == newest["finished"]


def set_kdf(archive: Path, **params: int) -> None:
    """Rewrite the root header's scrypt parameters (the body no longer authenticates; the
    parameters must be refused before that matters)."""
    root = (archive / "root").read_bytes()
    magic = b"QBHUB-ROOT\n"
    (hlen,) = struct.unpack_from("<I", root, len(magic))
    start = len(magic) + 4
    header = json.loads(root[start : start + hlen])
    header["kdf"].update(params)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    (archive / "root").write_bytes(magic + struct.pack("<I", len(raw)) + raw + root[start + hlen :])


@pytest.mark.parametrize(
    "params",
    [
        {"n": 1 << 20, "r": 32},
        {"n": 1 << 30},
        {"n": 3 << 16},
        {"p": 1 << 20},
        {"n": 1 << 20, "p": 8},
    ],
    ids=["4GiB", "n-2^30", "n-not-power-of-two", "p-huge", "work"],
)
def test_absurd_kdf_parameters_are_refused_fast(
    tmp_path: Path, archive: Path, params: dict[str, int]
) -> None:
    set_kdf(archive, **params)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.monotonic()
    err = one_error_line(extract(archive, "disk", tmp_path / "x.img"), 3)
    assert "scrypt" in err and time.monotonic() - start < 10
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak < 200 * 1024 or peak == before, f"peak RSS {peak >> 10} MiB"


@pytest.mark.parametrize("what", ["root", "pack"])
@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_archive_files_must_be_regular(
    tmp_path: Path, qbhub: Qbhub, archive: Path, image_factory, what: str, kind: str
) -> None:
    """A symlink, FIFO or directory in place of an archive file: refused, never followed or
    waited on (a FIFO nobody writes would block a plain open forever)."""
    backup(qbhub, archive, f"{image_factory(blocks=4)}=disk")
    path = (
        archive / "root" if what == "root" else largest(lambda: list(archive.glob("objects/*/p*")))
    )
    moved = tmp_path / "moved"
    path.rename(moved)
    if kind == "symlink":
        path.symlink_to(moved)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    out = tmp_path / "out.img"
    start = time.monotonic()
    err = one_error_line(extract(archive, "disk", out), 3)
    assert "not a regular file" in err or "symbolic link" in err
    assert time.monotonic() - start < 30 and not out.exists()


def unpad_indexes(archive: Path) -> int:
    """Rewrite every index object as writers did before padding (compressed, no padding) and
    re-seal the root to list them; return how many had padding."""
    from qbhub_native.blob import BlobCodec, BlobType
    from qbhub_native.crypto import Keys, Sealer, unwrap_key
    from qbhub_native.index import decode_index
    from qbhub_native.root import encode_root, open_body, split_root

    root = (archive / "root").read_bytes()
    raw_header, header, sealed = split_root(root)
    assert header.kdf is not None and header.wrapped_key is not None
    master = unwrap_key(
        bytes.fromhex(header.wrapped_key),
        PASSPHRASE.encode(),
        header.kdf,
        bytes.fromhex(header.archive_id),
        header.format,
    )
    sealer = Sealer(Keys.from_master(header.suite, master))
    root_sealer = Sealer(Keys.for_root(header.suite, master, header.format))
    codec = BlobCodec(sealer, 3)
    body = open_body(raw_header, sealed, root_sealer)
    padded, indexes = 0, []
    for name, length in body.indexes:
        path = archive / "objects" / name[-2:] / name
        plain = codec.decode(BlobType.INDEX, bytes.fromhex(name[1:]), path.read_bytes(), length)
        unpadded = plain[: 8 + sum(36 + len(t.records) for t in decode_index(plain))]
        padded += len(unpadded) < len(plain)
        new_id = sealer.blob_id(BlobType.INDEX, unpadded)
        new_name = "i" + new_id.hex()
        target = archive / "objects" / new_name[-2:] / new_name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(bytes(codec.encode(BlobType.INDEX, new_id, unpadded)))
        path.unlink()
        indexes.append((new_name, len(unpadded)))
    body.indexes = indexes
    body.generation += 1
    (archive / "root").write_bytes(encode_root(header, body, root_sealer))
    return padded


@pytest.mark.parametrize("padding", ["padded", "unpadded"])
def test_padded_and_unpadded_indexes(
    tmp_path: Path, qbhub: Qbhub, archive: Path, image_factory, padding: str
) -> None:
    image = image_factory(blocks=40, seed=12)
    backup(qbhub, archive, f"{image}=disk")
    if padding == "unpadded":
        assert unpad_indexes(archive) >= 1
    out = tmp_path / "disk.out"
    ok(extract(archive, "disk", out))
    assert out.read_bytes() == image.read_bytes()


def test_nonzero_index_padding_is_refused(
    tmp_path: Path, qbhub: Qbhub, archive: Path, image_factory
) -> None:
    """Padding is zeros only: a sealed index whose padding holds data is damage (exit 3)."""
    from qbhub_native.blob import BlobCodec, BlobType
    from qbhub_native.crypto import Keys, Sealer, unwrap_key
    from qbhub_native.root import encode_root, open_body, split_root

    backup(qbhub, archive, f"{image_factory(blocks=4)}=disk")
    root = (archive / "root").read_bytes()
    raw_header, header, sealed = split_root(root)
    assert header.kdf is not None and header.wrapped_key is not None
    master = unwrap_key(
        bytes.fromhex(header.wrapped_key),
        PASSPHRASE.encode(),
        header.kdf,
        bytes.fromhex(header.archive_id),
        header.format,
    )
    sealer = Sealer(Keys.from_master(header.suite, master))
    root_sealer = Sealer(Keys.for_root(header.suite, master, header.format))
    codec = BlobCodec(sealer, 0)
    body = open_body(raw_header, sealed, root_sealer)
    name, length = body.indexes[-1]
    path = archive / "objects" / name[-2:] / name
    plain = codec.decode(BlobType.INDEX, bytes.fromhex(name[1:]), path.read_bytes(), length)
    assert plain.endswith(b"\0"), "the engine no longer pads index objects?"
    bad = plain[:-1] + b"\x01"
    new_id = sealer.blob_id(BlobType.INDEX, bad)
    new_name = "i" + new_id.hex()
    (archive / "objects" / new_name[-2:]).mkdir(exist_ok=True)
    (archive / "objects" / new_name[-2:] / new_name).write_bytes(
        bytes(codec.encode(BlobType.INDEX, new_id, bad))
    )
    body.indexes[-1] = (new_name, len(bad))
    (archive / "root").write_bytes(encode_root(header, body, root_sealer))
    err = one_error_line(extract(archive, "--list"), 3)
    assert "padding" in err


def test_list_names_the_volumes(qbhub: Qbhub, archive: Path, image_factory) -> None:
    one, two = image_factory(blocks=3, tail=b"abc"), image_factory(blocks=2, seed=2)
    first = backup(qbhub, archive, f"{one}=work", f"{two}=vault")
    second = backup(qbhub, archive, f"{two}=vault")
    listing = ok(extract(archive, "--list")).stdout.decode()
    assert listing.index(first["session"]) < listing.index(second["session"])
    for name, image in (("work", one), ("vault", two)):
        assert f"{name}  {image.stat().st_size}" in listing
    only_work = ok(extract(archive, "--list", "work")).stdout.decode()
    assert first["session"] in only_work and second["session"] not in only_work


def test_refusals(tmp_path: Path, qbhub: Qbhub, archive: Path, image_factory) -> None:
    image = image_factory(blocks=5)
    backup(qbhub, archive, f"{image}=disk")
    out = tmp_path / "exists.img"
    out.write_bytes(b"keep me")
    one_error_line(extract(archive, "disk", out), 1)
    assert out.read_bytes() == b"keep me"
    ok(extract(archive, "disk", out, "--force"))
    assert out.read_bytes() == image.read_bytes()
    one_error_line(extract(archive, "nosuch", tmp_path / "x.img"), 1)
    one_error_line(extract(archive, "disk", tmp_path / "x.img", "--session", "20000101T000000Z"), 1)
    one_error_line(extract(archive, "disk"), 2)
    one_error_line(extract(archive, "disk", "out", "--bogus"), 2)
    one_error_line(extract(tmp_path / "not-an-archive", "disk", tmp_path / "x.img"), 1)
    assert not (tmp_path / "x.img").exists()


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deeply_nested_root_header_is_integrity(tmp_path: Path, opener: bytes) -> None:
    """The root header is read before anything is authenticated: 10,000 levels of nesting are
    refused as integrity (exit 3) before Python's recursive decoder sees them."""
    closer = b"]" if opener == b"[" else b"}"
    header = opener * 10_000 + b"1" + closer * 10_000  # within the 64 KiB header cap
    archive = tmp_path / "deep"
    archive.mkdir()
    (archive / "root").write_bytes(b"QBHUB-ROOT\n" + struct.pack("<I", len(header)) + header)
    err = one_error_line(extract("--list", archive), 3)
    assert "nested deeper" in err
