"""Retention policies over backup points (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from waymark.model.retention import Point, Policy, keep

START = datetime(2026, 1, 1, 12, tzinfo=UTC)


def daily(days: int) -> list[Point]:
    return [Point(f"p{d:03}", START + timedelta(days=d)) for d in range(days)]


def test_keep_last_keeps_the_newest() -> None:
    assert keep(daily(10), Policy(last=3)) == {"p007", "p008", "p009"}


def test_daily_keeps_the_newest_point_of_each_of_the_last_days() -> None:
    points = [*daily(5), Point("late", START + timedelta(days=4, hours=5))]
    assert keep(points, Policy(daily=2)) == {"late", "p003"}


def test_weekly_and_monthly_keep_one_per_period() -> None:
    points = daily(70)
    weekly = keep(points, Policy(weekly=3))
    assert len(weekly) == 3 and "p069" in weekly
    monthly = keep(points, Policy(monthly=2))
    assert monthly == {"p069", "p058"}  # the newest of March (day 69) and of February (day 58)


def test_a_kept_incremental_does_not_keep_its_parents() -> None:
    """Prune merges a removed parent into its child, so the policy alone decides."""
    points = [Point("full", START), Point("inc1", START + timedelta(days=1)),
              Point("inc2", START + timedelta(days=2)), Point("full2", START + timedelta(days=3))]
    assert keep(points, Policy(last=1)) == {"full2"}
    assert keep(points, Policy(daily=2)) == {"full2", "inc2"}


@given(st.lists(st.integers(0, 400), min_size=0, max_size=40, unique=True),
       st.integers(0, 5), st.integers(0, 5), st.integers(0, 5), st.integers(0, 5))
def test_the_newest_point_survives_any_policy_that_keeps_something(
        offsets: list[int], last: int, days: int, weeks: int, months: int) -> None:
    points = [Point(f"p{o:04}", START + timedelta(hours=o * 7)) for o in offsets]
    policy = Policy(last, days, weeks, months)
    kept = keep(points, policy)
    assert kept <= {p.id for p in points}
    if points and not policy.empty():
        assert max(points, key=lambda p: p.created_at).id in kept
    if policy.empty():
        assert kept == set()
