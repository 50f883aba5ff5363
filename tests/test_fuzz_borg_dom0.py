"""Fuzzing what dom0 parses of the Borg engine's worker and storage: the restore header, the
session listing, progress and result frames (from a possibly compromised backup worker), and the
archive marker (from storage, before anything is authenticated). Anything may come in; only
IntegrityError may come out (progress frames are simply ignored when they are not progress)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("qbhub_borg")
from qbhub_borg import engine, marker, receive

from qubes_backup_hub.errors import IntegrityError

pytestmark = pytest.mark.fuzz

BUDGET = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEEP = [
    b"[" * 50_000 + b"]" * 50_000,
    ('["\u0122", ' + "[" * 20_000 + "]" * 20_000 + "]").encode("utf-16"),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
payloads = st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()))


def refused_or_parsed(parse, payload: bytes) -> None:  # type: ignore[no-untyped-def]
    try:
        parse(payload)
    except IntegrityError as exc:
        assert str(exc).isprintable()


@BUDGET
@given(payloads)
def test_restore_header(payload: bytes) -> None:
    refused_or_parsed(
        lambda p: receive.parse_header(p, name="disk", session=None, known={"20261207T000000Z"}),
        payload,
    )


@BUDGET
@given(payloads)
def test_listing_result_and_progress(payload: bytes) -> None:
    refused_or_parsed(engine._parse_listing, payload)
    done = engine._progress_done(payload)
    assert done is None or type(done) is int


@BUDGET
@given(payloads)
def test_marker(payload: bytes) -> None:
    refused_or_parsed(marker.decode, marker.MAGIC + payload)


@pytest.mark.parametrize("payload", DEEP)
def test_deep_nesting_is_refused_not_recursed(payload: bytes) -> None:
    for parse in (
        lambda p: receive.parse_header(p, name="disk", session=None, known=set()),
        engine._parse_listing,
        lambda p: marker.decode(marker.MAGIC + p),
    ):
        with pytest.raises(IntegrityError):
            parse(payload)
    assert engine._progress_done(payload) is None
