"""Retention: which backup points a policy keeps (pure code).

- ``keep_last N``: the newest N points.
- ``keep_daily N`` / ``keep_weekly N`` / ``keep_monthly N``: for each of the newest N days (ISO
  weeks, months, in UTC) that have points, the newest point of that period.

A point is kept when any rule keeps it, and so is every point a kept point needs (the earlier
points of its chain: an incremental is only usable with its parents). Everything else goes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Policy:
    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def empty(self) -> bool:
        return not (self.last or self.daily or self.weekly or self.monthly)


@dataclass(frozen=True)
class Point:
    id: str
    created_at: datetime
    parent: str | None = None


def _newest_per_period(points: Sequence[Point], count: int,
                       period: Callable[[datetime], tuple[int, ...]]) -> set[str]:
    kept: set[str] = set()
    seen: set[tuple[int, ...]] = set()
    for point in sorted(points, key=lambda p: (p.created_at, p.id), reverse=True):
        key = period(point.created_at)
        if key in seen:
            continue
        if len(seen) == count:
            break
        seen.add(key)
        kept.add(point.id)
    return kept


def _week(when: datetime) -> tuple[int, ...]:
    year, week, _ = when.isocalendar()
    return (year, week)


def keep(points: Sequence[Point], policy: Policy) -> set[str]:
    """The ids of the points ``policy`` keeps (with everything they need)."""
    newest = sorted(points, key=lambda p: (p.created_at, p.id), reverse=True)
    kept = {p.id for p in newest[:policy.last]}
    kept |= _newest_per_period(points, policy.daily, lambda w: (w.year, w.month, w.day))
    kept |= _newest_per_period(points, policy.weekly, _week)
    kept |= _newest_per_period(points, policy.monthly, lambda w: (w.year, w.month))
    parents = {p.id: p.parent for p in points}
    for point_id in list(kept):
        parent = parents.get(point_id)
        while parent is not None and parent not in kept:
            kept.add(parent)
            parent = parents.get(parent)
    return kept
