"""Property-based fuzzing of the native parsers that see bytes from storage.

Every parser gets arbitrary bytes and mutated valid encodings (bit flips, truncations,
extensions, insertions). It must either succeed or raise a QbhubError (the project's typed
errors: IntegrityError for damage); never IndexError, struct.error, RecursionError, MemoryError,
UnicodeDecodeError, OverflowError or anything else. Sealed inputs are fuzzed twice: as random
sealed bytes (authentication must refuse them) and as validly sealed random plaintexts (so the
decoding behind the authentication is exercised too, as if the key had leaked).

Each test has a fixed example budget (`settings(max_examples=...)`); the module takes ~20 s.
"""

from __future__ import annotations

import contextlib
import json
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qbhub_native.blob import BlobCodec, BlobType
from qbhub_native.crypto import SUITE_AES, SUITE_NONE, Keys, Sealer
from qbhub_native.index import decode_index, encode_index, pad_index
from qbhub_native.pack import (
    ENTRY,
    TRAILER_AAD,
    TRAILER_MAGIC,
    PackEntry,
    parse_trailer,
    read_trailer,
    trailer_location,
)
from qbhub_native.root import RootBody, RootHeader, SessionRef, encode_root, split_root
from qbhub_native.session import SessionRecord, VolumeRecord, decode_session
from qbhub_native.tree import decode_page, encode_page

from qubes_backup_hub.errors import QbhubError

pytestmark = pytest.mark.fuzz

SEALERS = {
    suite: Sealer(Keys.from_master(suite, bytes(range(64)))) for suite in (SUITE_AES, SUITE_NONE)
}
SEALER = SEALERS[SUITE_AES]
CODEC = BlobCodec(SEALER, 3)
FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # fixed budget
PACK = "p" + "ab" * 32


def rejects_cleanly(parse: Callable[[], Any]) -> None:
    """Run `parse`; a QbhubError is a clean refusal, any other exception fails the test."""
    with contextlib.suppress(QbhubError):
        parse()


# -- mutations of valid encodings -----------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` with a few random edits: bit flips, a cut, an extension, an insertion."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] ^= 1 << draw(st.integers(0, 7))
    edit = draw(st.sampled_from(["none", "cut", "extend", "insert", "zero-run", "ff-run"]))
    if edit == "cut":
        del data[draw(st.integers(0, len(data))) :]
    elif edit == "extend":
        data += draw(st.binary(max_size=64))
    elif edit == "insert":
        pos = draw(st.integers(0, len(data)))
        data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    elif edit in ("zero-run", "ff-run") and data:
        pos = draw(st.integers(0, len(data) - 1))
        data[pos : pos + 4] = (b"\0" if edit == "zero-run" else b"\xff") * 4
    return bytes(data)


entries_st = st.lists(
    st.builds(
        PackEntry,
        st.integers(0, 255),
        st.binary(min_size=32, max_size=32),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
    ),
    max_size=6,
)


def trailer_plain(entries: list[PackEntry]) -> bytes:
    body = TRAILER_MAGIC + struct.pack("<I", len(entries))
    return body + b"".join(ENTRY.pack(*vars(e).values()) for e in entries)


def untrusted(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, or a mutation of a valid encoding drawn from `valid`."""
    return st.one_of(st.binary(max_size=512), valid.flatmap(mutated))


# -- pack trailers ---------------------------------------------------------------------------------


@FUZZ
@given(st.integers(-(2**40), 2**40), st.binary(max_size=24))
def test_trailer_location(size: int, footer: bytes) -> None:
    rejects_cleanly(lambda: trailer_location(size, footer, PACK))


@FUZZ
@given(
    untrusted(entries_st.map(trailer_plain)),
    st.integers(0, 2**40),
    st.sampled_from(sorted(SEALERS)),
    st.booleans(),
)
def test_parse_trailer(plain: bytes, pack_size: int, suite: str, seal: bool) -> None:
    """Sealed mutated plaintexts reach the decoder; raw bytes must fail authentication."""
    sealer = SEALERS[suite]
    sealed = bytes(sealer.seal(TRAILER_AAD, plain)) if seal else plain
    rejects_cleanly(lambda: parse_trailer(sealer, sealed, PACK, pack_size))


@FUZZ
@given(untrusted(entries_st.map(lambda es: b"\0" * 64 + trailer_plain(es))))
def test_read_whole_pack(data: bytes) -> None:
    """A whole pack in memory: random bytes, or a valid-looking pack mutated."""
    sealed = bytes(SEALER.seal(TRAILER_AAD, data[64:]))
    pack = data[:64] + sealed + struct.pack("<I", len(sealed)) + b"QBPACK01"
    rejects_cleanly(lambda: read_trailer(SEALER, data, PACK))
    rejects_cleanly(lambda: read_trailer(SEALER, pack, PACK))


# -- index objects ---------------------------------------------------------------------------------


def index_plain(tables: list[list[PackEntry]], padded: bool) -> bytes:
    plain = encode_index({"p" + f"{k:064x}": es for k, es in enumerate(tables)})
    return pad_index(plain, SEALER.overhead) if padded else plain


@FUZZ
@given(untrusted(st.builds(index_plain, st.lists(entries_st, max_size=3), st.booleans())))
def test_decode_index(data: bytes) -> None:
    rejects_cleanly(lambda: decode_index(data))


@FUZZ
@given(st.lists(entries_st, max_size=3), st.integers(0, 64))
def test_index_padding_is_unambiguous(tables: list[list[PackEntry]], overhead: int) -> None:
    """Padding decodes to the same tables; a non-zero byte in it is refused."""
    plain = encode_index({"p" + f"{k:064x}": es for k, es in enumerate(tables)})
    padded = pad_index(plain, overhead)
    assert (len(padded) + 1 + overhead) % 4096 == 0
    assert decode_index(padded) == decode_index(plain)
    if len(padded) > len(plain):
        with pytest.raises(QbhubError):
            decode_index(padded[:-1] + b"\x01")


# -- tree pages ------------------------------------------------------------------------------------


@FUZZ
@given(
    untrusted(
        st.builds(encode_page, st.integers(0, 255), st.binary(max_size=8).map(lambda b: b * 32))
    ),
    st.integers(0, 300),
    st.integers(0, 70000),
)
def test_decode_page(data: bytes, level: int, count: int) -> None:
    rejects_cleanly(lambda: decode_page(data, level, count, "fuzzed page"))


# -- session records -------------------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.just("a" * 64)
)
json_any = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def session_bytes(volumes: int, extra: dict[str, Any]) -> bytes:
    record = SessionRecord(
        "20261126T160102Z",
        "2026-11-26T16:01:02Z",
        "2026-11-26T16:01:09Z",
        [VolumeRecord(f"v{k}", 2**20 * k, 65536, 256, "ab" * 32) for k in range(volumes)],
        {"vm": "work"},
    )
    data = record.encode()
    if extra:  # unknown or replaced keys, values of any JSON type
        doc = json.loads(data)
        if doc["volumes"]:
            doc["volumes"][0].update(extra)
        doc.update(extra)
        data = json.dumps(doc).encode()
    return data


@FUZZ
@given(
    untrusted(
        st.builds(
            session_bytes,
            st.integers(0, 3),
            st.dictionaries(
                st.sampled_from(["volumes", "size", "name", "tree", "fanout", "metadata", "x"]),
                json_any,
                max_size=2,
            ),
        )
    )
)
def test_decode_session(data: bytes) -> None:
    rejects_cleanly(lambda: decode_session(data))


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,
        b'{"volumes": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"session_id": "20261126T160102Z", "started": "", "finished": "", "volumes": '
        b'[{"name": "a", "size": 1e999, "chunk_size": 65536, "fanout": 256, "tree": ""}]}',
        b'{"session_id": "20261126T160102Z", "started": "", "finished": "", "volumes": '
        b'[{"name": "a", "size": true, "chunk_size": 65536, "fanout": 256, "tree": ""}]}',
        b"\xff\xfe",
        b'{"session_id": 1, "started": [], "finished": {}, "volumes": {}}',
    ],
    ids=["deep-list", "deep-volumes", "inf-size", "bool-size", "bad-utf8", "wrong-types"],
)
def test_decode_session_known_traps(data: bytes) -> None:
    with pytest.raises(QbhubError):
        decode_session(data)


def test_session_ignores_unknown_keys() -> None:
    record = decode_session(session_bytes(2, {"later": [1, 2]}))
    assert [v.name for v in record.volumes] == ["v0", "v1"]


# -- blobs ----------------------------------------------------------------------------------------

frames = st.one_of(
    st.binary(max_size=256).map(lambda b: b"\1" + zstandard.ZstdCompressor().compress(b)),
    st.binary(max_size=256).map(
        lambda b: b"\1" + zstandard.ZstdCompressor(write_content_size=False).compress(b * 64)
    ),
    st.binary(max_size=128).map(lambda b: b"\0" + b),
)


@FUZZ
@given(
    untrusted(frames),
    st.integers(-5, 300),
    st.sampled_from([0, 1, 17, 4096, 65536, 2**22 + 1, 2**32, 2**62]),
    st.booleans(),
)
def test_blob_decode(plain: bytes, type_code: int, raw_length: int, seal: bool) -> None:
    """Random sealed bytes, and sealed random framings, with any expected length or type."""
    blob_id = bytes(32)
    aad_type = type_code if 0 <= type_code <= 255 else 1
    sealed = SEALER.seal(b"qbhub-blob-v1" + bytes((aad_type,)) + blob_id, plain) if seal else plain
    rejects_cleanly(lambda: CODEC.decode(type_code, blob_id, sealed, raw_length))


def test_blob_decode_memory_follows_output_not_expected_length() -> None:
    """A tiny frame with no declared size and a huge expected length: no huge allocation."""
    blob_id = bytes(32)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 1000)
    sealed = SEALER.seal(b"qbhub-blob-v1\x04" + blob_id, b"\1" + frame)
    tracemalloc.start()
    try:
        with pytest.raises(QbhubError):
            CODEC.decode(BlobType.INDEX, blob_id, sealed, 200 * 1024 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, peak


# -- the root ------------------------------------------------------------------------------------


def root_bytes(sessions: int) -> bytes:
    header = RootHeader("ab" * 16, SUITE_NONE, None, clear_key="cd" * 64)
    body = RootBody(3, "2026-11-26T16:01:09Z", 65536, 256, 1)
    body.sessions = [SessionRef(f"2026112{k}T160102Z", bytes(32), 10, "t") for k in range(sessions)]
    return encode_root(header, body, SEALERS[SUITE_NONE])


@FUZZ
@given(untrusted(st.builds(root_bytes, st.integers(0, 2))))
def test_split_root(data: bytes) -> None:
    rejects_cleanly(lambda: split_root(b"QBHUB-ROOT\n" + data[11:]))
    rejects_cleanly(lambda: split_root(data))


def nested_header(depth: int) -> bytes:
    header = b'{"format": 1, "x": ' + b"[" * depth + b"]" * depth + b"}"
    return b"QBHUB-ROOT\n" + struct.pack("<I", len(header)) + header


def test_split_root_deeply_nested_header() -> None:
    """JSON nesting in the root header is bounded before decoding (was a RecursionError)."""
    rejects_cleanly(lambda: split_root(nested_header(30_000)))
