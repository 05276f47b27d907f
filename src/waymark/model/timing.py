"""When a backup schedule is next due, and the one written form of a moment (pure code).

Times are the host's local wall-clock time (as cron's), converted to UTC for storage. The next
run is always the first slot *after* a given instant, so a runner that was down for several
slots runs once, not once per missed slot.

Every moment an answer holds is :func:`rfc3339` (UTC, whole seconds, ``Z``); a moment written
elsewhere (a manifest on external storage) is read with :func:`parse_rfc3339`.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime, time, timedelta, tzinfo

from waymark.errors import InvalidInput

EVERY = ("daily", "weekly", "monthly")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})",
                     re.ASCII)


def utc(when: datetime) -> datetime:
    """``when`` as an aware UTC moment: SQLite hands back the naive UTC datetimes it stored."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def rfc3339(when: datetime) -> str:
    """A moment in the one form Waymark shows and returns (UTC, whole seconds, ``Z``:
    ``2026-12-07T03:12:21Z``; docs/api.md, "The JSON vocabulary")."""
    return utc(when).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: object, *, what: str = "time stamp") -> datetime:
    """A written moment as an aware datetime: RFC 3339 (``T``, ``Z`` or an offset), with or
    without fractions of a second (older Waymark wrote backup points' in microseconds). It may
    come from external storage, so anything else is refused (InvalidInput), never guessed."""
    if not isinstance(text, str) or RFC3339.fullmatch(text) is None:
        raise InvalidInput(f"the {what} {text!r:.60} is not an RFC 3339 time.",
                           hint="Expected a time like 2026-12-07T03:12:21Z.")
    try:
        return datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError as err:  # a 30 February, a 25th hour
        raise InvalidInput(f"the {what} {text!r} is not a valid time.",
                           hint="Expected a time like 2026-12-07T03:12:21Z.") from err


def moment(text: object, *, what: str = "time stamp") -> str:
    """A written moment (:func:`parse_rfc3339`) in the one form (:func:`rfc3339`)."""
    return rfc3339(parse_rfc3339(text, what=what))


def parse_at(text: str) -> time:
    try:
        hours, minutes = (int(part) for part in text.split(":"))
        return time(hours, minutes)
    except ValueError as err:
        raise InvalidInput(f"{text!r} is not a time of day.",
                           hint="Give HH:MM in 24-hour form, e.g. 02:30.") from err


def parse_weekday(text: str) -> int:
    key = text[:3].lower()
    if key not in DAYS:
        raise InvalidInput(f"{text!r} is not a day of the week.",
                           hint="Give one of: " + ", ".join(DAYS))
    return DAYS.index(key)


def check_month_day(day: int) -> int:
    if not 1 <= day <= 28:
        raise InvalidInput(f"day {day} of the month is not allowed.",
                           hint="Give 1 to 28 (so every month has it).")
    return day


def next_run(every: str, at: time, day: int | None, after: datetime,
             zone: tzinfo | None = None) -> datetime:
    """The first slot strictly after ``after`` (aware), in UTC."""
    local = after.astimezone(zone)
    candidate = local.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
    if every == "daily":
        if candidate <= local:
            candidate += timedelta(days=1)
    elif every == "weekly":
        assert day is not None
        candidate += timedelta(days=(day - candidate.weekday()) % 7)
        if candidate <= local:
            candidate += timedelta(days=7)
    else:
        assert day is not None
        candidate = candidate.replace(day=day)
        if candidate <= local:
            year, month = divmod(candidate.year * 12 + candidate.month, 12)
            candidate = candidate.replace(year=year, month=month + 1, day=day)
        assert day <= calendar.monthrange(candidate.year, candidate.month)[1]
    return _as_utc(candidate, zone)


def _as_utc(local: datetime, zone: tzinfo | None) -> datetime:
    if zone is None:  # the host's zone: let the C library place the wall-clock time (DST)
        return local.replace(tzinfo=None).astimezone().astimezone(UTC)
    return local.astimezone(UTC)
