"""Retention rules (`prune --keep-*`): the calendar decisions, and the prune command around them.

The decision tests run `retention.decide` on session IDs spread over years (in UTC, set for the
test, since periods are in local time). The command tests run the real `qbhub prune` on a real
archive: --dry-run changes nothing, a prune that would drop every session is refused without
--delete-all, and what is dropped is exactly what the rules leave out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import Qbhub, write_image

from qubes_backup_hub.errors import UsageError
from qubes_backup_hub.retention import decide, make_rules, parse_span


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time = UTC while a test runs (periods are counted in local time)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def sid(t: datetime) -> str:
    return t.strftime("%Y%m%dT%H%M%SZ")


def nightly(days: int, start: datetime = datetime(2024, 1, 1, 2, 30, tzinfo=UTC)) -> list[str]:
    """One session a night at 02:30 for `days` nights."""
    return [sid(start + timedelta(days=d)) for d in range(days)]


def test_keep_daily_weekly_monthly_over_three_years() -> None:
    sessions = nightly(3 * 365)
    rules = make_rules(daily=7, weekly=4, monthly=12, yearly=2)
    decision = decide(sessions, rules)
    kept = sorted(decision.keep)
    newest = datetime(2024, 1, 1, 2, 30, tzinfo=UTC) + timedelta(days=3 * 365 - 1)
    assert sessions[-7:] == kept[-7:]  # the last seven nights
    # A week's newest session is its Sunday's (or the newest night of the current week).
    weekly = [s for s, why in decision.keep.items() if any(r.startswith("weekly") for r in why)]
    assert len(weekly) == 4
    assert all(
        datetime.strptime(s, "%Y%m%dT%H%M%SZ").weekday() == 6 or s == sid(newest) for s in weekly
    )
    monthly = [s for s, why in decision.keep.items() if any(r.startswith("monthly") for r in why)]
    assert len(monthly) == 12
    assert all((datetime.strptime(s, "%Y%m%dT%H%M%SZ") + timedelta(days=1)).day == 1
               or s == sid(newest) for s in monthly)  # fmt: skip
    yearly = [s for s, why in decision.keep.items() if any(r.startswith("yearly") for r in why)]
    assert sorted(yearly) == [sid(datetime(2025, 12, 31, 2, 30, tzinfo=UTC)), sid(newest)]
    assert len(decision.keep) + len(decision.drop) == len(sessions)
    assert set(decision.keep).isdisjoint(decision.drop)
    assert len(decision.keep) < 7 + 4 + 12 + 2  # rules overlap: the newest night is in all


def test_every_rule_counts_its_own_periods() -> None:
    """A session kept by --keep-daily still counts as its week's (restic's counting)."""
    sessions = nightly(21)
    decision = decide(sessions, make_rules(daily=1, weekly=2))
    newest = sessions[-1]
    assert decision.keep[newest] == ["daily #1", "weekly #1"]
    assert len(decision.keep) == 2


def test_keep_within_counts_from_the_newest_session_not_from_now() -> None:
    old = nightly(10, start=datetime(2020, 5, 1, 2, 30, tzinfo=UTC))
    decision = decide(old, make_rules(within="2d"))
    assert sorted(decision.keep) == old[-3:]  # the newest, and the two nights within 48 h of it
    assert decision.drop == old[:-3]


def test_keep_last_and_same_second_sessions() -> None:
    base = "20260101T000000Z"
    committed = ["20251231T235959Z", base, f"{base}-2", f"{base}-10"]  # the archive's order
    decision = decide(committed, make_rules(last=2))
    assert list(decision.keep) == [f"{base}-10", f"{base}-2"]
    assert decision.drop == ["20251231T235959Z", base]


def test_a_session_made_while_the_clock_ran_ahead_pushes_nothing_out() -> None:
    """Newer means committed later: a session whose ID time is two years ahead (dom0's clock
    comes from an untrusted VM) neither becomes "the newest" for --keep-within nor takes the
    real sessions' places."""
    committed = ["20261201T020000Z", "20261202T020000Z", "20281203T020000Z",
                 "20261204T020000Z", "20261205T020000Z"]  # fmt: skip
    within = decide(committed, make_rules(within="7d"))
    assert within.drop == []  # every real session is within 7 days of the last committed one
    assert within.out_of_order == ["20281203T020000Z"]
    last = decide(committed, make_rules(last=2))
    assert sorted(last.keep) == ["20261204T020000Z", "20261205T020000Z"]
    daily = decide(committed, make_rules(daily=3))
    assert "20261205T020000Z" in daily.keep and "20261204T020000Z" in daily.keep


def test_hourly_groups_by_hour() -> None:
    start = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    sessions = [sid(start + timedelta(minutes=20 * k)) for k in range(9)]  # 10:00 .. 12:40
    decision = decide(sessions, make_rules(hourly=2))
    assert sorted(decision.keep) == [sid(start + timedelta(minutes=100)), sessions[-1]]


@pytest.mark.parametrize("bad", ["2", "d", "0d", "-1d", "2x", "1.5d", "9999999d", "2 d 3"])
def test_bad_spans_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError, match="invalid time span"):
        parse_span(bad)


def test_negative_counts_and_no_rules_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="--keep-daily must be 0 or more"):
        make_rules(daily=-1)
    with pytest.raises(UsageError, match="no retention rule"):
        decide(nightly(3), make_rules())


def three_sessions(qbhub: Qbhub, archive: Path, tmp_path: Path) -> list[str]:
    image = write_image(tmp_path / "disk.img", blocks=4)
    ids = []
    for seed in range(3):
        write_image(image, blocks=4, seed=seed + 10)
        ids.append(qbhub.json("volume", "backup", "--dest", archive, f"{image}=disk")["session"])
    return ids


def listed(qbhub: Qbhub, archive: Path) -> list[str]:
    return [s["session"] for s in qbhub.json("list", "--dest", archive)["sessions"]]


def test_prune_command_dry_run_refusal_and_rules(
    qbhub: Qbhub, archive: Path, tmp_path: Path
) -> None:
    ids = three_sessions(qbhub, archive, tmp_path)
    plan = qbhub.json("prune", "--dest", archive, "--keep-last", "1", "--dry-run")
    assert plan["dry_run"] is True
    assert plan["drop"] == ids[:2]
    assert plan["keep"] == [{"session": ids[2], "reasons": ["last #1"]}]
    text = qbhub.run("prune", "--dest", archive, "--keep-last", "1", "--dry-run").stdout
    assert "Would drop 2 of 3 sessions" in text and f"{ids[0]}" in text
    assert listed(qbhub, archive) == ids  # a dry run changes nothing

    refused = qbhub.run("prune", "--dest", archive, "--keep-last", "0", check=False)
    assert refused.returncode == 2
    assert "would drop every session (3)" in refused.stderr
    assert "--delete-all" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert listed(qbhub, archive) == ids

    both = qbhub.run("prune", "--dest", archive, "--session", ids[0], "--keep-daily", "1",
                     check=False)  # fmt: skip
    assert both.returncode == 2 and "not both" in both.stderr

    # A profile's rules give way to sessions named on the command line.
    config = tmp_path / "config.toml"
    config.write_text(f'[profiles.p]\ndest = "{archive}"\nkeep-daily = 7\n')
    named = qbhub.json("prune", "--profile", "p", "--session", ids[0], "--dry-run",
                       env={"QBHUB_CONFIG": str(config)})  # fmt: skip
    assert named["drop"] == [ids[0]]
    other = qbhub.run("list", "--profile", "p", env={"QBHUB_CONFIG": str(config),
                      "QBHUB_DEST": str(tmp_path / "elsewhere")}, check=False)  # fmt: skip
    assert f"using QBHUB_DEST={tmp_path / 'elsewhere'}, not profile p's dest" in other.stderr

    kept = qbhub.json("prune", "--dest", archive, "--keep-within", "1h")
    assert kept["sessions_removed"] == [] and kept["drop"] == []
    assert listed(qbhub, archive) == ids

    done = qbhub.json("prune", "--dest", archive, "--keep-last", "2")
    assert done["sessions_removed"] == ids[:1]
    assert listed(qbhub, archive) == ids[1:]

    gone = qbhub.json("prune", "--dest", archive, "--keep-last", "0", "--delete-all")
    assert gone["sessions_removed"] == ids[1:]
    assert listed(qbhub, archive) == []
