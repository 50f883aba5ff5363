"""Retention rules: which sessions a prune keeps, and why, from their times alone.

Engine-agnostic: it sees only session IDs (``YYYYMMDDTHHMMSSZ[-N]``, the UTC time a session was
made), so every engine's ``prune`` gets the same rules. The rules, as ``qbhub prune --help``
states them:

- ``--keep-last N`` keeps the N newest sessions.
- ``--keep-within SPAN`` keeps every session made within SPAN before the newest session (not
  before now: an archive nobody backed up for a month keeps what it has). SPAN is a number and a
  unit: ``h`` hours, ``d`` days, ``w`` weeks, ``m`` months (31 days), ``y`` years (365 days).
- ``--keep-hourly/daily/weekly/monthly/yearly N``: the sessions are grouped by calendar period
  in local time (hour; day; ISO week, Monday first; month; year); the newest session of each of
  the N most recent periods that have a session is kept.

A session is kept if any rule keeps it; every rule counts its periods on its own (a session kept
by ``--keep-daily`` still counts as that week's for ``--keep-weekly``), as restic counts them.
Which session is newer is the archive's commit order, not the time in its ID (see `decide`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from .errors import UsageError
from .safety.names import check_session_id

SPAN = re.compile(r"([1-9][0-9]{0,5})([hdwmy])")
SPAN_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1),
              "m": timedelta(days=31), "y": timedelta(days=365)}  # fmt: skip

# Rule name -> the calendar period a local time falls in (any value that compares equal within it).
PERIODS: dict[str, Callable[[datetime], object]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: t.year,
}


@dataclass(frozen=True)
class Rules:
    """What to keep; None means the rule is not used."""

    last: int | None = None
    within: timedelta | None = None
    within_text: str = ""
    periodic: dict[str, int] = field(default_factory=dict)  # "daily" -> N, ...

    def given(self) -> bool:
        return self.last is not None or self.within is not None or bool(self.periodic)


@dataclass(frozen=True)
class Decision:
    """The outcome for every session: kept ones with the rules that keep them, and dropped ones."""

    keep: dict[str, list[str]]  # session -> reasons, newest first
    drop: list[str]  # oldest first
    out_of_order: list[str] = field(default_factory=list)  # time after a later commit's

    def as_dict(self) -> dict[str, object]:
        return {
            "keep": [{"session": s, "reasons": r} for s, r in self.keep.items()],
            "drop": list(self.drop),
            "out_of_order": list(self.out_of_order),
        }


def parse_span(text: str) -> timedelta:
    """`2d`, `12h`, `4w`, `6m`, `1y` as a timedelta; anything else is a usage error."""
    match = SPAN.fullmatch(text.strip())
    if match is None:
        raise UsageError(
            f"invalid time span {text!r}: expected a number and a unit h, d, w, m or y (e.g. 2d)"
        )
    return int(match.group(1)) * SPAN_UNITS[match.group(2)]


def make_rules(
    *,
    last: int | None = None,
    within: str | None = None,
    hourly: int | None = None,
    daily: int | None = None,
    weekly: int | None = None,
    monthly: int | None = None,
    yearly: int | None = None,
) -> Rules:
    """Rules from the command-line values (None: not given); counts must be 0 or more."""
    counts = {"last": last, "hourly": hourly, "daily": daily, "weekly": weekly,
              "monthly": monthly, "yearly": yearly}  # fmt: skip
    for name, value in counts.items():
        if value is not None and value < 0:
            raise UsageError(f"--keep-{name} must be 0 or more")
    periodic = {name: n for name, n in counts.items() if name != "last" and n is not None}
    return Rules(
        last=last,
        within=parse_span(within) if within is not None else None,
        within_text=within or "",
        periodic=periodic,
    )


def session_time(session_id: str) -> datetime:
    """The UTC time a session ID names."""
    check_session_id(session_id)
    return datetime.strptime(session_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def session_order(session_id: str) -> tuple[datetime, int]:
    """Sort key by the time a session ID names, then its `-N` suffix (for display only: which
    session is newer is the archive's commit order, never the clock)."""
    suffix = session_id[17:] if len(session_id) > 16 else ""
    return session_time(session_id), int(suffix or 0)


def decide(sessions: list[str], rules: Rules) -> Decision:
    """Apply `rules` to `sessions`, given in the archive's commit order (oldest first, as
    `list_sessions` gives them); periods are in the local time zone.

    "Newest" and "last" follow commit order, and --keep-within counts back from the time of the
    session committed last: a session whose ID time is off (made while the clock ran ahead, as
    an untrusted clock source can make dom0's) can't push the real ones out of a window or a
    count. Such sessions are listed in `out_of_order`.
    """
    if not rules.given():
        raise UsageError("no retention rule given")
    committed = list(dict.fromkeys(sessions))
    newest_first = list(reversed(committed))
    reasons: dict[str, list[str]] = {s: [] for s in newest_first}
    if rules.last is not None:
        for n, s in enumerate(newest_first[: rules.last], 1):
            reasons[s].append(f"last #{n}")
    if rules.within is not None and newest_first:
        since = session_time(newest_first[0]) - rules.within
        for s in newest_first:
            if session_time(s) >= since:
                reasons[s].append(f"within {rules.within_text} of the newest")
    for rule, count in rules.periodic.items():
        period_of = PERIODS[rule]
        seen: list[object] = []
        for s in newest_first:
            if len(seen) >= count:
                break
            period = period_of(session_time(s).astimezone())
            if period not in seen:
                seen.append(period)
                reasons[s].append(f"{rule} #{len(seen)}")
    out_of_order = []
    earliest_after: datetime | None = None
    for s in newest_first:
        t = session_time(s)
        if earliest_after is not None and t > earliest_after:
            out_of_order.append(s)
        earliest_after = t if earliest_after is None else min(earliest_after, t)
    keep = {s: r for s, r in reasons.items() if r}
    drop = [s for s in committed if not reasons[s]]
    return Decision(keep=keep, drop=drop, out_of_order=list(reversed(out_of_order)))
