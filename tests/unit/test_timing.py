"""When backup schedules are next due (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from waymark.errors import InvalidInput
from waymark.model.timing import next_run, parse_at, parse_weekday


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_daily_is_today_or_tomorrow() -> None:
    assert next_run("daily", time(2, 30), None, at("2026-11-30T01:00"), UTC) == \
        at("2026-11-30T02:30")
    assert next_run("daily", time(2, 30), None, at("2026-11-30T02:30"), UTC) == \
        at("2026-12-01T02:30")


def test_weekly_lands_on_its_day() -> None:
    monday = parse_weekday("Mon")
    got = next_run("weekly", time(3, 0), monday, at("2026-11-30T04:00"), UTC)  # a Monday
    assert got == at("2026-12-07T03:00") and got.weekday() == monday
    assert next_run("weekly", time(3, 0), parse_weekday("wed"), at("2026-11-30T04:00"), UTC) \
        == at("2026-12-02T03:00")


def test_monthly_rolls_over_the_year() -> None:
    assert next_run("monthly", time(1, 0), 15, at("2026-12-20T00:00"), UTC) == \
        at("2027-01-15T01:00")
    assert next_run("monthly", time(1, 0), 15, at("2026-12-01T00:00"), UTC) == \
        at("2026-12-15T01:00")


def test_missed_slots_give_one_next_run() -> None:
    # a runner down for a week finds one slot due, and the next one after now
    assert next_run("daily", time(2, 0), None, at("2026-12-08T09:00"), UTC) == \
        at("2026-12-09T02:00")


def test_bad_times_and_days_are_refused() -> None:
    for text in ("25:00", "2:3:4", "noon"):
        with pytest.raises(InvalidInput):
            parse_at(text)
    with pytest.raises(InvalidInput):
        parse_weekday("someday")
