"""The audit log: who did what to which object, when, from where, and the result. The API
writes an entry for every request that changes something (or tries to) and for every refused
request (401, 403, 404 from a scope check, 429), in the catalog, durably (SQLite with
``synchronous=FULL``). Read it with ``waymark audit`` or ``GET /api/audit``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from waymark.catalog.models import AuditEntry
from waymark.ops.context import Context
from waymark.ops.journal import now
from waymark.ops.views import rfc3339

DENIED = frozenset({401, 403, 429})


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


def record(ctx: Context, entry: Entry) -> None:
    with ctx.catalog.session() as session:
        session.add(AuditEntry(at=now(), user=entry.user, role=entry.role, via=entry.via,
                               client=entry.client, method=entry.method, action=entry.action,
                               target=entry.target, status=entry.status,
                               outcome=entry.outcome, message=entry.message))


def _view(row: AuditEntry) -> dict[str, Any]:
    return {"id": row.id, "at": rfc3339(row.at), "user": row.user, "role": row.role,
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
