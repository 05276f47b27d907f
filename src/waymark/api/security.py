"""Who is calling: an API token (``Authorization: Bearer wm_...``) or a session cookie, whose
writes must carry the session's CSRF token (``X-CSRF-Token``); and the scope checks every
endpoint makes on the server (:mod:`waymark.auth.policy`)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from waymark.auth import policy
from waymark.auth.policy import Decision, Principal
from waymark.catalog.models import Vm
from waymark.errors import Forbidden, NotFound, TooManyAttempts, Unauthenticated
from waymark.ops import quotas, users
from waymark.ops.context import Context

COOKIE = "waymark_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Caller:
    who: Principal
    via: str  # token | session
    csrf: str | None = None


def context(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def caller(request: Request) -> Caller:
    """The authenticated caller, or 401; a cookie-authenticated write without the session's
    CSRF token is 403 (a page on another site can send the cookie, not the header)."""
    found = _authenticate(request)
    request.state.caller = found  # for the audit log
    quotas.acting(found.who)  # administrators are not limited by quotas
    return found


def _authenticate(request: Request) -> Caller:
    ctx = context(request)
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return Caller(users.by_token(ctx, header[7:].strip()), "token")
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        raise Unauthenticated("sign in, or send an API token (Authorization: Bearer ...).",
                              hint="POST /api/auth/login, or: waymark token create NAME --user U")
    who, csrf = users.by_session(ctx, cookie)
    if request.method not in SAFE_METHODS and request.headers.get(CSRF_HEADER) != csrf:
        request.state.caller = Caller(who, "session", csrf)  # (a refusal names who)
        raise Forbidden(f"this request needs the session's CSRF token in {CSRF_HEADER}.",
                        hint="Read it from GET /api/auth/me (csrf_token) after signing in.")
    return Caller(who, "session", csrf)


CallerDep = Annotated[Caller, Depends(caller)]
ContextDep = Annotated[Context, Depends(context)]


# Keys whose values are host paths: administrators see them, no one else (the issue: users
# who are not administrators never deal in host paths).
HOST_PATHS = frozenset({"kernel", "initrd", "checkpoint_dir", "active_image", "base_image",
                        "path", "frozen_image", "memory_state", "bundle", "dest", "serial_log",
                        "saved_state", "state_file", "folder"})


def redact(who: Principal, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without host paths for a caller who is not an administrator."""
    if who.admin:
        return data
    stripped: dict[str, Any] = _strip(data)
    return stripped


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in HOST_PATHS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def require(who: Principal, action: str) -> None:
    if policy.decide(who, action) is not Decision.ALLOW:
        raise Forbidden(f"your role ({who.role}) may not do this ({action}).")


class OutOfScope(NotFound):
    """A 404 for an object the caller may not see: to them the same as one that does not
    exist (same code, same message); the audit log records it as a refusal."""

    code = "not_found"


def no_vm(ref: str) -> NotFound:
    return OutOfScope(f"no VM is named {ref!r} or has an id starting with it.",
                    hint="List the VMs you may see: GET /api/vms")


def vm_for(ctx: Context, who: Principal, action: str, ref: str) -> Vm:
    """The VM ``ref`` names (its name, or an id prefix matching one VM the caller may see):
    404 when there is none the caller may see (as for a VM that does not exist), 403 when
    ``action`` is not allowed on it."""
    with ctx.catalog.session() as session:
        row = session.scalars(select(Vm).where(Vm.name == ref)).first()
        if row is None and ref:
            prefixed = session.scalars(select(Vm).where(Vm.id.startswith(ref.lower())))
            found = [v for v in prefixed if policy.in_scope(who, v.id, v.owner_id)]
            row = found[0] if len(found) == 1 else None
            if row is None:
                raise no_vm(ref) if found or _exists(session, ref) else _missing(ref)
        if row is None:
            raise _missing(ref)
        session.expunge(row)
    decision = policy.decide_vm(who, action, row.id, row.owner_id)
    if decision is Decision.HIDE:
        raise no_vm(ref)
    if decision is Decision.DENY:
        raise Forbidden(f"you may not do this to VM {row.name!r} ({action}).",
                        hint="Ask an administrator for the permission.")
    return row


def _missing(ref: str) -> NotFound:
    """The 404 for a VM that does not exist (word for word :func:`no_vm`'s)."""
    hidden = no_vm(ref)
    return NotFound(hidden.message, hint=hidden.hint)


def _exists(session: Session, ref: str) -> bool:
    return session.scalars(select(Vm.id).where(
        (Vm.name == ref) | Vm.id.startswith(ref.lower() or "-"))).first() is not None


class LoginLimiter:
    """At most ``limit`` failed sign-ins per user name and per client address in ``window``
    seconds; then 429 until the oldest failure leaves the window."""

    def __init__(self, limit: int = 5, window: float = 300.0) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, moment: float) -> deque[float]:
        seen = self._failures.setdefault(key, deque())
        while seen and seen[0] <= moment - self.window:
            seen.popleft()
        return seen

    def check(self, *keys: str) -> None:
        moment = time.monotonic()
        with self._lock:
            for key in keys:
                seen = self._recent(key, moment)
                if len(seen) >= self.limit:
                    wait = int(seen[0] + self.window - moment) + 1
                    raise TooManyAttempts(f"too many failed sign-ins; try again in {wait} s.")

    def failed(self, *keys: str) -> None:
        moment = time.monotonic()
        with self._lock:
            for key in keys:
                self._recent(key, moment).append(moment)
