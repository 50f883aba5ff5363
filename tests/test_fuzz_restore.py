"""Property-based fuzzing of what dom0 parses from a restore worker (hypothesis, fixed budget).

The restore channel's frames, the restore header (JSON, then the restore-validate hook and the
settings policy) and the relay's answers to worker queries all see bytes a compromised DispVM
chose. Each must fail only with the project's typed errors: never a RecursionError, KeyError,
AttributeError or a traceback-worthy surprise, and the relay must never reach storage for an
object dom0 did not list.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qubes_backup_hub.errors import IntegrityError, QbhubError, ValidationError
from qubes_backup_hub.jobs.restore import RestoreRequest, WorkerChannel, parse_header
from qubes_backup_hub.safety import vm_rules
from qubes_backup_hub.safety.jsonlimits import loads_bounded, nesting_depth
from qubes_backup_hub.safety.restore_channel import FRAME, receive
from qubes_backup_hub.safety.validate import qbhub_validate_restore
from qubes_backup_hub.store.local import LocalDirStore
from qubes_backup_hub.store.qrexec import OP

pytestmark = pytest.mark.fuzz
BUDGET = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

VALID_HEADER = {
    "session": "20261126T000000Z",
    "vms": [
        {
            "name": "work",
            "class": "AppVM",
            "settings": {
                "properties": {"label": "red", "template": "fedora", "netvm": "net"},
                "features": {"service.cups": "1"},
                "tags": ["audit"],
                "devices": [{"class": "usb", "backend": "net", "ident": "2-1", "options": {}}],
                "firewall": ["action=accept dsthost=example.com", "action=drop"],
            },
            "volumes": [{"name": "private", "size": 4096}],
        }
    ],
}
CONTEXT = vm_rules.PolicyContext(
    restored={"work": "AppVM"},
    existing={
        "fedora": vm_rules.KnownVM("TemplateVM"),
        "net": vm_rules.KnownVM("AppVM", provides_network=True),
        "dom0": vm_rules.KnownVM("AdminVM"),
    },
    untouchable={"backupvm"},
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


def judge(payload: bytes) -> None:
    """dom0's handling of a header, up to the point where VMs would be created."""
    header = parse_header(payload, RestoreRequest(vms=[]))
    qbhub_validate_restore(header=header)
    vm_rules.apply_policy([(vm.name, vm.klass, vm.settings) for vm in header.vms], CONTEXT)


def mutate(doc: Any, path: list[Any], value: Any) -> Any:
    """`doc` with the element at `path` (as far as it exists) replaced by `value`."""
    if not path or not isinstance(doc, dict | list):
        return value
    key = path[0]
    if isinstance(doc, dict):
        key = key if key in doc else (sorted(doc)[hash(key) % len(doc)] if doc else key)
        return {**doc, key: mutate(doc.get(key), path[1:], value)}
    if not doc:
        return [value]
    index = hash(key) % len(doc)
    return [*doc[:index], mutate(doc[index], path[1:], value), *doc[index + 1 :]]


@BUDGET
@given(st.binary(max_size=2048))
def test_header_bytes(payload: bytes) -> None:
    with contextlib.suppress(IntegrityError, ValidationError):
        judge(payload)


PATH_WORDS = ["vms", 0, "settings", "properties", "devices", "label", "netvm", "features",
              "firewall", "volumes", "size", "name", "class"]  # fmt: skip


@BUDGET
@given(st.lists(st.sampled_from(PATH_WORDS), max_size=6), json_values)
def test_header_documents(path: list[Any], value: Any) -> None:
    """Valid headers with one element anywhere replaced by any JSON value."""
    payload = json.dumps(mutate(VALID_HEADER, path, value)).encode()
    with contextlib.suppress(IntegrityError, ValidationError):
        judge(payload)


def test_the_valid_header_passes() -> None:
    """The control: the fuzzed tests start from a header dom0 accepts."""
    judge(json.dumps(VALID_HEADER).encode())


@BUDGET
@given(st.integers(min_value=1, max_value=5000), st.sampled_from([b"[", b"{\"a\":"]))
def test_deep_nesting_is_refused_not_recursed(depth: int, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    payload = opener * depth + b"1" + closer * depth
    assert nesting_depth(payload.decode()) == depth
    if depth > 32:
        with pytest.raises(ValueError, match="nested deeper"):
            loads_bounded(payload)
    with pytest.raises((IntegrityError, ValidationError)):
        judge(payload)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_json_in_other_encodings_is_refused_before_nesting_is_judged(encoding: str) -> None:
    """json.loads takes UTF-16/32 bytes too; a UTF-8 scanner misreads them (U+0122 holds a '"'
    byte in UTF-16, which hid 50,000 brackets from the old scanner): only UTF-8 is accepted."""
    payload = ('["\u0122", ' + "[" * 50_000 + "]" * 50_000 + "]").encode(encoding)
    with pytest.raises(ValueError):
        loads_bounded(payload, max_bytes=1 << 22)
    with pytest.raises((IntegrityError, ValidationError)):
        judge(payload)


@BUDGET
@given(st.binary(max_size=64))
def test_channel_frames(data: bytes) -> None:
    limits = {b"H": 1 << 20, b"D": 1 << 20, b"Z": 0, b"Q": 4096, b"X": 4096}
    stream = io.BytesIO(data)
    with contextlib.suppress(IntegrityError):
        while True:
            kind, payload = receive(stream, limits)
            assert len(payload) <= limits[kind]


@BUDGET
@given(st.sampled_from([b"x", b"\x00", b"A", b"B"]), st.integers(17, 2**32 - 1))
def test_channel_frame_lengths_are_capped_before_reading(kind: bytes, length: int) -> None:
    """A frame longer than its kind's limit (or of an unknown kind) is refused unread."""
    stream = io.BytesIO(FRAME.pack(kind[0], length) + b"\x00" * 64)
    with pytest.raises(IntegrityError):
        receive(stream, {b"A": 16})
    assert stream.tell() == FRAME.size


@BUDGET
@given(st.text(max_size=300))
def test_firewall_rules(rule: str) -> None:
    vm_rules.check_firewall_rule(rule)


class Recording(LocalDirStore):
    """A real directory store that records every name dom0's relay asks it for."""

    asked: list[str]

    def get(self, name: str, max_size: int) -> bytes:
        self.asked.append(name)
        return super().get(name, max_size)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        self.asked.append(name)
        return super().get_range(name, offset, length)


@pytest.fixture(scope="module")
def relay_store(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    store = Recording(tmp_path_factory.mktemp("relay"))
    store.asked = []
    store.create()
    with store.lock():
        store.put("p" + "1" * 64, b"x" * 100)
    return store


@BUDGET
@given(
    st.sampled_from(sorted(OP.values())) | st.integers(0, 255),
    st.lists(st.text(max_size=70) | st.integers(-(2**64), 2**64).map(str), max_size=4),
)
def test_relay_answers_any_query_and_reads_only_listed_objects(
    relay_store: Recording, op: int, args: list[str]
) -> None:
    listed = "p" + "1" * 64
    channel = WorkerChannel(None, relay_store, {listed: 100}, b"ROOT")  # type: ignore[arg-type]
    relay_store.asked.clear()
    reply = channel._answer(bytes((op,)) + "\n".join(args).encode("utf-8", "replace"))
    assert reply[:1] in (b"\x00", b"\x01")
    assert set(relay_store.asked) <= {listed}
    if reply[:1] == b"\x00" and op == OP["root_get"]:
        assert reply[1:] == b"ROOT"
    if reply[:1] == b"\x00" and op in (OP["get"], OP["range"]):
        assert len(reply) - 1 <= 100


def test_relay_write_ops_are_refused(relay_store: Recording, tmp_path: Path) -> None:
    channel = WorkerChannel(None, relay_store, {}, b"")  # type: ignore[arg-type]
    for op in ("put", "delete", "root_put", "create", "lock", "clean"):
        reply = channel._answer(bytes((OP[op],)) + b"p" + b"1" * 64 + b"\nxx")
        assert reply[:1] == b"\x01", op


def test_qbhub_errors_are_the_only_failures() -> None:
    """A sanity check of the test's own premise: typed errors share one base."""
    assert issubclass(IntegrityError, QbhubError) and issubclass(ValidationError, QbhubError)
