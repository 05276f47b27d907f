"""Who is calling: an API token (``Authorization: Bearer wm_...``) or a session cookie, whose
writes must carry the session's CSRF token (``X-CSRF-Token``); and the scope checks every
endpoint makes on the server (:mod:`waymark.model.policy`)."""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from waymark.catalog.models import Vm
from waymark.engine import lookup
from waymark.engine.context import Context
from waymark.errors import Forbidden, NotFound, TooManyAttempts, Unauthenticated
from waymark.model import names, policy
from waymark.model.policy import Decision, Principal
from waymark.usecases.access import quotas, users

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
    return connection_caller(request)


def connection_caller(request: HTTPConnection) -> Caller:
    """:func:`caller` of a request or a WebSocket (whose handshake is a GET: a WebSocket
    checks its Origin instead of a CSRF token, :func:`same_origin`)."""
    found = _authenticate(request)
    request.state.caller = found  # for the audit log
    quotas.acting(found.who)  # administrators are not limited by quotas
    return found


def same_origin(connection: HTTPConnection, found: Caller) -> None:
    """403 unless a WebSocket comes from a page of this server (cross-site WebSocket
    hijacking: a browser sends the session cookie with a WebSocket any site opens, and
    checks no CORS rule for it). A browser always sends ``Origin``; a client without one
    must authenticate with a token, never with the cookie."""
    origin = connection.headers.get("origin")
    secure = connection.url.scheme in ("wss", "https")
    own = f"{'https' if secure else 'http'}://{connection.headers.get('host', '')}"
    if origin is None and found.via == "token":
        return
    if origin != own:
        raise Forbidden(f"this WebSocket comes from another site ({origin or 'no Origin'}, "
                        f"this server is {own}).",
                        hint="Open the console from the portal's own pages, or connect with "
                             "an API token.")


def _authenticate(request: HTTPConnection) -> Caller:
    ctx: Context = request.app.state.ctx
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return Caller(users.by_token(ctx, header[7:].strip()), "token")
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        raise Unauthenticated("sign in, or send an API token (Authorization: Bearer ...).",
                              hint="POST /api/auth/login, or: waymark token create NAME --user U")
    who, csrf = users.by_session(ctx, cookie)
    method = request.scope.get("method", "GET")  # (a WebSocket's handshake is a GET)
    if method not in SAFE_METHODS and request.headers.get(CSRF_HEADER) != csrf:
        request.state.caller = Caller(who, "session", csrf)  # (a refusal names who)
        raise Forbidden(f"this request needs the session's CSRF token in {CSRF_HEADER}.",
                        hint="Read it from GET /api/auth/me (csrf_token) after signing in.")
    return Caller(who, "session", csrf)


def client_address(request: Request) -> str:
    """The caller's address: the peer's, or what a proxy named with ``waymark serve
    --trusted-proxy`` put in ``X-Forwarded-For`` (uvicorn applies that; no one else is
    believed)."""
    return request.client.host if request.client else "-"


def sign_in(request: Request, name: str, password: str) -> tuple[str, str]:
    """(session cookie, CSRF token) for a correct name and password, within the limits of
    :class:`LoginLimiter` (429 before the password is checked)."""
    request.state.login_name = name  # for the audit log
    limiter: LoginLimiter = request.app.state.limiter
    with limiter.attempt(client_address(request), name):
        return users.login(context(request), name, password)


CallerDep = Annotated[Caller, Depends(caller)]
ContextDep = Annotated[Context, Depends(context)]


# Keys whose values are host paths: administrators see them, no one else (the issue: users
# who are not administrators never deal in host paths).
HOST_PATHS = frozenset({"kernel", "initrd", "checkpoint_dir", "active_image", "base_image",
                        "path", "frozen_image", "memory_state", "bundle", "dest", "serial_log",
                        "saved_state", "state_file", "folder", "media"})


# Keys whose values are sentences that may quote host paths (a failed job's error).
SENTENCES = frozenset({"error", "message", "hint"})
# An absolute path in a sentence: quoted whole (``'/mnt/my disk/a.qcow2'``, spaces and all), or
# bare, starting at a word's beginning and ending before a space, a quote, a bracket or
# punctuation (a sentence's last period stays); the API's own routes (``/api/...``) are no
# host paths.
_PATH_CHARS = r"[^\s'\"`,;:()\[\]{}<>]"
_HOST_PATH = re.compile(r"(?<=')/[^'\n]*(?=')|(?<=\")/[^\"\n]*(?=\")"
                        rf"|(?<![\w.~/-])/(?!api(?:/|\b)){_PATH_CHARS}+(?<![.])")
HIDDEN_PATH = "<host path>"


def hide_host_paths(text: str) -> str:
    """``text`` with every host path replaced by ``<host path>``: what a caller who is not an
    administrator sees of an error (administrators, the audit log and the server's log keep
    the whole message)."""
    return _HOST_PATH.sub(HIDDEN_PATH, text)


def redact(who: Principal, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without host paths for a caller who is not an administrator."""
    if who.admin:
        return data
    stripped: dict[str, Any] = _strip(data)
    return stripped


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: hide_host_paths(v) if k in SENTENCES and isinstance(v, str) else _strip(v)
                for k, v in value.items() if k not in HOST_PATHS}
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


def no_vm(ref: str, seen: Iterable[str] = ()) -> NotFound:
    """The 404 for a VM the caller may not see; ``seen``: names they may (a "did you mean")."""
    return OutOfScope(f"no VM is named {ref!r} or has an id starting with it.",
                      hint=names.did_you_mean(ref, seen, "List the VMs you may see: GET /api/vms"))


def in_scope(who: Principal) -> lookup.Visible:
    """Whether the caller may see a VM (any grant, their own, or every VM)."""
    return lambda row: policy.in_scope(who, row.id, row.owner_id)


def vm_for(ctx: Context, who: Principal, action: str, ref: str) -> Vm:
    """The VM ``ref`` names among those the caller may see (:func:`waymark.engine.lookup.vm`:
    an exact full id first, then a name, then an id prefix), resolved once here; the use cases
    then take its id. 404 when there is none the caller may see (as for a VM that does not
    exist), 403 when ``action`` is not allowed on it."""
    with ctx.catalog.session() as session:
        try:
            row = lookup.vm(session, ref, in_scope(who))
        except NotFound:
            seen = lookup.visible_names(session, in_scope(who))  # never a name out of scope
            raise (no_vm(ref, seen) if lookup.vm_matches(session, ref)
                   else _missing(ref, seen)) from None
        session.expunge(row)
    decision = policy.decide_vm(who, action, row.id, row.owner_id)
    if decision is Decision.HIDE:
        raise no_vm(ref)
    if decision is Decision.DENY:
        raise Forbidden(f"you may not do this to VM {row.name!r} ({action}).",
                        hint="Ask an administrator for the permission.")
    return row


def require_vm(who: Principal, row: Vm, *actions: str) -> None:
    """403 unless every one of ``actions`` is allowed on the VM ``row`` (already resolved and
    in the caller's scope): each side effect of a request needs the permission it would need
    on its own (an apply that starts the VM needs ``vm.power`` too)."""
    for action in actions:
        if policy.decide_vm(who, action, row.id, row.owner_id) is not Decision.ALLOW:
            raise Forbidden(f"you may not do this to VM {row.name!r} ({action}).",
                            hint="Ask an administrator for the permission, or leave out "
                                 "what needs it.")


def _missing(ref: str, seen: Iterable[str]) -> NotFound:
    """The 404 for a VM that does not exist (word for word :func:`no_vm`'s)."""
    hidden = no_vm(ref, seen)
    return NotFound(hidden.message, hint=hidden.hint)


Key = tuple[str, str, str]  # ("pair", address, name) or ("address", address, "")


class LoginLimiter:
    """Failed sign-ins, counted per (client address, user name) and per client address.

    A pair that failed :attr:`per_name` times in :attr:`window` seconds is refused (429) until
    its oldest failure leaves the window, and so is an address that failed :attr:`per_address`
    times whatever the names (one address guessing many users). Nothing is counted per name
    alone: someone else's failures never lock a user out from their own address (the way out:
    sign in from another address, use an API token, or wait; an administrator clears a name's
    failures with ``DELETE /api/users/{name}/sign-in-failures``).

    Checking and counting are one step: :meth:`attempt` counts the attempt as failed before
    the password is checked and takes it back when it succeeds, so parallel guesses cannot
    pass the check together (at most ``per_name`` of them reach the password check).
    """

    KEPT = 10000  # more keys than this: the ones with no failure in the window are dropped

    def __init__(self, per_name: int = 5, per_address: int = 20, window: float = 300.0
                 ) -> None:
        self.per_name, self.per_address, self.window = per_name, per_address, window
        self._failures: dict[Key, deque[float]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def attempt(self, address: str, name: str) -> Iterator[None]:
        """Around one password check: 429 (nothing checked) when the pair or the address is
        over its limit; the attempt stays counted unless the block ends without an error."""
        keys: tuple[Key, ...] = (("pair", address, name), ("address", address, ""))
        moment = self._reserve(keys)
        try:
            yield
        except Unauthenticated:
            raise
        except BaseException:
            self._release(keys, moment)  # not a wrong password: not a failure
            raise
        self._release(keys[1:], moment)
        with self._lock:
            self._failures.pop(keys[0], None)  # the pair's earlier failures are forgiven

    def forget(self, name: str) -> int:
        """Clear the failures against ``name`` from every address (an administrator's way out
        for a user locked out); how many pairs were cleared."""
        with self._lock:
            found = [k for k in self._failures if k[0] == "pair" and k[2] == name]
            for key in found:
                del self._failures[key]
            return len(found)

    def _reserve(self, keys: tuple[Key, ...]) -> float:
        moment = time.monotonic()
        with self._lock:
            if len(self._failures) > self.KEPT:
                self._sweep(moment)
            for key in keys:
                seen = self._recent(key, moment)
                if len(seen) >= (self.per_name if key[0] == "pair" else self.per_address):
                    wait = int(seen[0] + self.window - moment) + 1
                    raise TooManyAttempts(f"too many failed sign-ins; try again in {wait} s.",
                                          hint="Or sign in with an API token, or ask an "
                                               "administrator to clear the failures.")
            for key in keys:
                self._failures[key].append(moment)
        return moment

    def _release(self, keys: tuple[Key, ...], moment: float) -> None:
        with self._lock:
            for key in keys:
                seen = self._failures.get(key)
                if seen is not None and moment in seen:
                    seen.remove(moment)

    def _recent(self, key: Key, moment: float) -> deque[float]:
        seen = self._failures.setdefault(key, deque())
        while seen and seen[0] <= moment - self.window:
            seen.popleft()
        return seen

    def _sweep(self, moment: float) -> None:
        for key in list(self._failures):
            if not self._recent(key, moment):
                del self._failures[key]
