"""Sizes as users write them (512M, 20G) and as we print them; durations (90d, 12h)."""

from __future__ import annotations

import re
from datetime import timedelta

from waymark.errors import InvalidInput

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, *, what: str = "size", default_unit: str = "") -> int:
    """Bytes from ``512M``/``20G``/``4096``; a bare number is in ``default_unit``."""
    match = _SIZE.match(text)
    if match is None or int(match.group(1)) <= 0:
        raise InvalidInput(f"invalid {what} {text!r}.",
                           hint="Write a positive number with an optional K, M, G or T suffix, "
                                "e.g. 512M or 20G.")
    unit = (match.group(2) or default_unit).upper()
    return int(match.group(1)) * _SUFFIX[unit]


_DURATION = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$", re.IGNORECASE)
_DURATION_UNIT = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
LONGEST = timedelta(days=3650)


def parse_duration(text: str, *, what: str = "duration") -> timedelta:
    """A positive duration from ``30m``, ``12h``, ``90d`` or ``8w`` (at most ten years)."""
    match = _DURATION.match(text)
    span = timedelta(**{_DURATION_UNIT[match.group(2).lower()]: int(match.group(1))}) \
        if match is not None and len(match.group(1)) < 8 else timedelta(0)
    if not timedelta(0) < span <= LONGEST:
        raise InvalidInput(f"invalid {what} {text!r}.",
                           hint="Write a positive number with m, h, d or w (minutes, hours, "
                                "days, weeks), e.g. 90d; at most ten years.")
    return span


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
