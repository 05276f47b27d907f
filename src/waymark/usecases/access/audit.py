"""The audit log: who did what to which object, when, from where, and the result. The API
writes an entry for every request that changes something (or tries to) and for every refused
request (401, 403, 404 from a scope check, 429), in the catalog, durably (SQLite with
``synchronous=FULL``). Read it with ``waymark audit`` or ``GET /api/audit``.

Anyone on the network can send requests, so what an entry stores is bounded: each text (the
action, which holds the path when no route matched, the user name a sign-in gave, every path
parameter, the message) is cut to :data:`TEXT_LIMIT` characters (:data:`MESSAGE_LIMIT` for the
message), marked with ``…``; and refusals of requests that carry no valid credentials are
recorded one by one only up to :data:`ANONYMOUS_LIMIT` per client address per
:data:`ANONYMOUS_WINDOW` seconds: the rest of that window is counted and written as one summary
entry (action ``unauthenticated refusals``, the count in its message) with the first entry
written after the window is over.
Entries are stored as sent: whoever prints them neutralises control characters
(:func:`waymark.text.printable`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from waymark.catalog.models import AuditEntry
from waymark.engine.context import Context
from waymark.engine.journal import now
from waymark.model.timing import rfc3339

DENIED = frozenset({401, 403, 429})
TEXT_LIMIT, MESSAGE_LIMIT = 200, 1000
ANONYMOUS_LIMIT, ANONYMOUS_WINDOW = 20, 60.0
TRACKED_CLIENTS = 10_000  # addresses remembered at once (beyond: counted as one)


@dataclass
class Entry:
    method: str
    action: str
    status: int
    user: str | None = None
    role: str | None = None
    via: str = "none"
    client: str | None = None
    target: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    refused: bool = False  # a 404 for an object outside the caller's scope

    @property
    def outcome(self) -> str:
        if self.status in DENIED or self.refused:
            return "denied"
        return "ok" if self.status < 400 else "failed"


def bounded(text: str | None, limit: int = TEXT_LIMIT) -> str | None:
    """``text`` cut to ``limit`` characters (the cut marked with ``…``)."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit - 1] + "…"


def record(ctx: Context, entry: Entry) -> None:
    """Write ``entry`` durably, each of its texts bounded."""
    target = {bounded(str(k)): bounded(v) if isinstance(v, str) else v
              for k, v in list(entry.target.items())[:16]}
    with ctx.catalog.session() as session:
        session.add(AuditEntry(at=now(), user=bounded(entry.user, 64), role=entry.role,
                               via=entry.via, client=bounded(entry.client, 64),
                               method=entry.method[:8], action=bounded(entry.action),
                               target=target, status=entry.status, outcome=entry.outcome,
                               message=bounded(entry.message, MESSAGE_LIMIT)))


@dataclass
class _Window:
    start: float
    recorded: int = 0
    unrecorded: int = 0
    last_status: int = 401


class Recorder:
    """Writes the API's entries; refusals without credentials are recorded one by one only up
    to :data:`ANONYMOUS_LIMIT` per client address per window, then counted (one summary entry
    per address and window). One per server; safe from any thread."""

    def __init__(self, limit: int = ANONYMOUS_LIMIT, window: float = ANONYMOUS_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.clock = limit, window, clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def record(self, ctx: Context, entry: Entry, *, anonymous: bool) -> None:
        """Write ``entry`` (unless it is an anonymous refusal over the limit) and the summaries
        of the windows that ended."""
        with self._lock:
            due = self._ended(self.clock())
            keep = not anonymous or self._admit(entry)
        for summary in due:
            record(ctx, summary)
        if keep:
            record(ctx, entry)

    def _admit(self, entry: Entry) -> bool:
        key = entry.client or "-"
        if key not in self._windows and len(self._windows) >= TRACKED_CLIENTS:
            key = "(other addresses)"
        window = self._windows.setdefault(key, _Window(self.clock()))
        if window.recorded < self.limit:
            window.recorded += 1
            return True
        window.unrecorded += 1
        window.last_status = entry.status
        return False

    def _ended(self, moment: float) -> list[Entry]:
        """Forget the windows that are over; a summary entry for each that left some out."""
        ended = []
        for key, window in self._windows.items():  # oldest first: windows are added as begun
            if moment - window.start < self.window:
                break
            ended.append(key)
        summaries = []
        for key in ended:
            window = self._windows.pop(key)
            if window.unrecorded:
                summaries.append(Entry(
                    method="-", action="unauthenticated refusals", status=window.last_status,
                    client=None if key == "(other addresses)" else key, refused=True,
                    message=f"{window.unrecorded} more requests without valid credentials "
                            f"from {key} were refused within {self.window:.0f} s of the first; "
                            f"only the first {self.limit} were recorded one by one"))
        return summaries


def _view(row: AuditEntry) -> dict[str, Any]:
    return {"id": row.id, "at": rfc3339(row.at), "user_name": row.user, "role": row.role,
            "via": row.via, "client": row.client, "method": row.method, "action": row.action,
            "target": row.target, "status": row.status, "outcome": row.outcome,
            "message": row.message}


def listing(ctx: Context, *, user: str | None = None, outcome: str | None = None,
            since: datetime | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The newest entries first (at most ``limit``)."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if user is not None:
        query = query.where(AuditEntry.user == user)
    if outcome is not None:
        query = query.where(AuditEntry.outcome == outcome)
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    with ctx.catalog.session() as session:
        return [_view(r) for r in session.scalars(query)]
