"""Retention: which backup points a policy keeps (pure code).

- ``keep_last N``: the newest N points.
- ``keep_daily N`` / ``keep_weekly N`` / ``keep_monthly N``: for each of the newest N days (ISO
  weeks, months, in UTC) that have points, the newest point of that period.

A point is kept when any rule keeps it; everything else goes. A kept incremental does not keep
its parents: pruning merges a removed parent into its child
(:meth:`waymark.external.repository.Repository.merge_away`), so keeping the newest points never
needs a new full backup.
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
    """The ids of the points ``policy`` keeps."""
    newest = sorted(points, key=lambda p: (p.created_at, p.id), reverse=True)
    kept = {p.id for p in newest[:policy.last]}
    kept |= _newest_per_period(points, policy.daily, lambda w: (w.year, w.month, w.day))
    kept |= _newest_per_period(points, policy.weekly, _week)
    kept |= _newest_per_period(points, policy.monthly, lambda w: (w.year, w.month))
    return kept
