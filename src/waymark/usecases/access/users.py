"""Users, grants, API tokens and web sessions (the catalog side of :mod:`waymark.auth`).

``waymark user add|passwd|remove|list|grant|revoke`` and ``waymark token create|revoke|list``
work locally (whoever can run the CLI on the host owns the catalog), so the first
administrator is made here; the API authenticates each request with :func:`by_token` or
:func:`by_session` and checks it with :mod:`waymark.model.policy`.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from waymark.auth import secrets
from waymark.catalog.models import ApiToken, Grant, Template, User, WebSession
from waymark.engine import lookup
from waymark.engine.context import Context
from waymark.engine.journal import now
from waymark.errors import Conflict, InvalidInput, NotFound, Unauthenticated
from waymark.model import names, policy, timing
from waymark.model.timing import rfc3339
from waymark.model.vocabulary import DeleteAnswer, deleted, gone
from waymark.usecases.access import quotas

SESSION_LIFETIME = timedelta(hours=12)
LAST_USED_EVERY = timedelta(minutes=1)  # how fresh a token's last_used_at is kept
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def _user(session: Session, name: str) -> User:
    row = session.scalars(select(User).where(User.name == name)).first()
    if row is None:
        raise NotFound(f"no user named {name!r}.", hint="List them: waymark user list")
    return row


def _check_role(role: str) -> str:
    if role not in policy.ROLES:
        raise InvalidInput(f"unknown role {role!r}.",
                           hint=f"Use one of: {', '.join(policy.ROLES)}.")
    return role


def view(session: Session, row: User) -> dict[str, Any]:
    grants = session.scalars(select(Grant).where(Grant.user_id == row.id))
    return {"id": row.id, "name": row.name, "role": row.role,
            "created_at": rfc3339(row.created_at),
            "grants": [{"kind": g.object_kind, "object": g.object_id,
                        "permissions": sorted(g.permissions)} for g in grants],
            **quotas.view(session, row)}


def add(ctx: Context, name: str, role: str, password: str) -> dict[str, Any]:
    name = names.clean(name, what="user name")
    if not NAME.match(name):
        raise InvalidInput(f"{name!r} is not a valid user name.",
                           hint="Use letters, digits and . _ @ - (up to 64 characters).")
    password_hash = secrets.hash_password(password)
    with ctx.catalog.session() as session:
        if session.scalars(select(User).where(User.name == name)).first() is not None:
            raise Conflict(f"a user named {name!r} already exists.",
                           hint=f"Change their password with: waymark user passwd {name}")
        row = User(id=uuid.uuid4().hex, name=name, role=_check_role(role),
                   password_hash=password_hash, created_at=now())
        session.add(row)
        session.flush()
        return view(session, row)


def set_password(ctx: Context, name: str, password: str, *, current: str | None = None,
                 keep_tokens: bool = False) -> dict[str, Any]:
    """A new password. With ``current`` (a user changing their own), only when it is the
    password now (else :class:`Unauthenticated`, nothing changed).

    Every session of the user ends, and so do their API tokens unless ``keep_tokens``: a
    password is changed when it may have leaked, and whoever held it could have made a token
    with it that would otherwise outlive the change."""
    password_hash = secrets.hash_password(password)
    with ctx.catalog.session() as session:
        row = _user(session, name)
        if current is not None and not secrets.password_matches(row.password_hash, current):
            raise Unauthenticated("the current password is wrong; nothing changed.",
                                  hint="Give your current password to change it.")
        row.password_hash = password_hash
        session.execute(delete(WebSession).where(WebSession.user_id == row.id))
        revoked = 0 if keep_tokens else len(list(session.scalars(
            delete(ApiToken).where(ApiToken.user_id == row.id).returning(ApiToken.id))))
        return {"id": row.id, "name": row.name, "sessions_ended": True,
                "tokens_revoked": revoked}


def remove(ctx: Context, name: str) -> DeleteAnswer:
    """Remove a user with their tokens, sessions, grants and quota; the last administrator
    stays."""
    with ctx.catalog.session() as session:
        row = _user(session, name)
        if row.role == "administrator" and len(list(session.scalars(
                select(User.id).where(User.role == "administrator")))) == 1:
            raise Conflict(f"{name!r} is the last administrator.",
                           hint="Add another administrator first: waymark user add NAME "
                                "--role administrator")
        for table in (WebSession, ApiToken, Grant):
            session.execute(delete(table).where(table.user_id == row.id))
        quotas.forget(session, row.id)
        session.delete(row)
        return deleted(gone("user", row.name, row.id))


def listing(ctx: Context) -> list[dict[str, Any]]:
    with ctx.catalog.session() as session:
        return [view(session, u) for u in session.scalars(select(User).order_by(User.name))]


def show(ctx: Context, name: str) -> dict[str, Any]:
    """A user with their grants, quota and usage."""
    with ctx.catalog.session() as session:
        return view(session, _user(session, name))


# --- grants -----------------------------------------------------------------------------------

def grant(ctx: Context, name: str, *, vm: str | None = None, template: str | None = None,
          permissions: list[str] | None = None) -> dict[str, Any]:
    """Grant ``permissions`` on a VM (its name, id, or ``*`` for every VM), or the use of a
    template; a new grant on the same object replaces the old one."""
    if (vm is None) == (template is None):
        raise InvalidInput("a grant names one VM (--vm) or one template (--template).")
    perms = sorted(set(permissions or []))
    unknown = [p for p in perms if p not in policy.VM_PERMISSIONS]
    if unknown or (template is not None and perms):
        raise InvalidInput(f"unknown or misplaced permission(s): {', '.join(unknown or perms)}.",
                           hint="VM grants take: " + ", ".join(policy.VM_PERMISSIONS)
                                + "; template grants take none.")
    with ctx.catalog.session() as session:
        row = _user(session, name)
        if template is not None:
            kind, object_id = "template", _template(session, template)
        else:
            assert vm is not None
            kind = "vm"
            object_id = policy.EVERY_VM if vm == policy.EVERY_VM else lookup.vm(session, vm).id
        session.merge(Grant(user_id=row.id, object_kind=kind, object_id=object_id,
                            permissions=perms, created_at=now()))
        session.flush()
        return view(session, row)


def _template(session: Session, name: str) -> str:
    if session.get(Template, name) is None:
        raise NotFound(f"no template {name!r}.", hint="List them: waymark template list")
    return name


def revoke(ctx: Context, name: str, *, vm: str | None = None, template: str | None = None
           ) -> dict[str, Any]:
    with ctx.catalog.session() as session:
        row = _user(session, name)
        kind = "template" if template is not None else "vm"
        ref = template if template is not None else vm
        object_id = ref if kind == "template" or ref == policy.EVERY_VM \
            else lookup.vm(session, ref or "").id
        found = session.get(Grant, (row.id, kind, object_id))
        if found is None:
            raise NotFound(f"{name!r} has no grant on {kind} {ref!r}.",
                           hint="See their grants: waymark user list")
        session.delete(found)
        session.flush()
        return view(session, row)


# --- authentication ---------------------------------------------------------------------------

def principal(session: Session, row: User) -> policy.Principal:
    grants = list(session.scalars(select(Grant).where(Grant.user_id == row.id)))
    return policy.Principal(
        row.id, row.name, row.role,
        vm_grants={g.object_id: frozenset(g.permissions) for g in grants
                   if g.object_kind == "vm"},
        templates=frozenset(g.object_id for g in grants if g.object_kind == "template"))


def by_password(ctx: Context, name: str, password: str) -> policy.Principal:
    with ctx.catalog.session() as session:
        row = session.scalars(select(User).where(User.name == name)).first()
        stored = row.password_hash if row is not None else secrets.dummy_hash()
        if not secrets.password_matches(stored, password) or row is None:
            raise Unauthenticated("wrong user name or password.")
        return principal(session, row)


def by_token(ctx: Context, token: str) -> policy.Principal:
    parts = secrets.split_token(token)
    with ctx.catalog.session() as session:
        row = session.get(ApiToken, parts[0]) if parts else None
        if parts is None or row is None or not secrets.same(row.secret_sha256,
                                                            secrets.digest(parts[1])):
            raise Unauthenticated("the API token is not valid (revoked, or mistyped).",
                                  hint="Create a new one: waymark token create NAME")
        moment = now()
        if row.expires_at is not None and timing.utc(row.expires_at) <= moment:
            raise Unauthenticated("the API token has expired.",
                                  hint="Create a new one: waymark token create NAME "
                                       "--expires-in 90d")
        if row.last_used_at is None or moment - timing.utc(row.last_used_at) > LAST_USED_EVERY:
            row.last_used_at = moment  # (not a durable write on every request)
        return principal(session, session.get_one(User, row.user_id))


def create_token(ctx: Context, user: str, name: str, expires_in: timedelta | None = None
                 ) -> dict[str, Any]:
    """A new API token for ``user``, valid for ``expires_in`` (none: until revoked); the
    token itself is in the result and nowhere else."""
    name = names.clean(name, what="token name")
    token_id, secret, token = secrets.new_token()
    moment = now()
    expires_at = moment + expires_in if expires_in is not None else None
    with ctx.catalog.session() as session:
        row = _user(session, user)
        session.add(ApiToken(id=token_id, user_id=row.id, name=name,
                             secret_sha256=secrets.digest(secret), created_at=moment,
                             expires_at=expires_at))
    return {"id": token_id, "user_name": user, "name": name, "token": token,
            "expires_at": rfc3339(expires_at) if expires_at else None}


def revoke_token(ctx: Context, token_id: str, user: str | None = None) -> DeleteAnswer:
    """Revoke a token (only ``user``'s when given): it stops working at once."""
    with ctx.catalog.session() as session:
        row = session.get(ApiToken, token_id)
        owner = _user(session, user).id if user is not None else None
        if row is None or (owner is not None and row.user_id != owner):
            raise NotFound(f"no API token {token_id!r}.", hint="List them: waymark token list")
        session.delete(row)
        return deleted(gone("token", row.name, row.id))


def tokens(ctx: Context, user: str | None = None) -> list[dict[str, Any]]:
    with ctx.catalog.session() as session:
        query = select(ApiToken, User.name).join(User, User.id == ApiToken.user_id)
        if user is not None:
            query = query.where(User.name == user)
        return [{"id": t.id, "user_name": n, "name": t.name, "created_at": rfc3339(t.created_at),
                 "last_used_at": rfc3339(t.last_used_at) if t.last_used_at else None,
                 "expires_at": rfc3339(t.expires_at) if t.expires_at else None}
                for t, n in session.execute(query.order_by(ApiToken.created_at))]


# --- web sessions -----------------------------------------------------------------------------

def login(ctx: Context, name: str, password: str) -> tuple[str, str]:
    """(session cookie, CSRF token) for a correct name and password."""
    who = by_password(ctx, name, password)
    cookie, csrf = secrets.new_session()
    moment = now()
    with ctx.catalog.session() as session:
        session.execute(delete(WebSession).where(WebSession.expires_at < moment))
        session.add(WebSession(id_sha256=secrets.digest(cookie), user_id=who.user_id,
                               csrf_token=csrf, created_at=moment,
                               expires_at=moment + SESSION_LIFETIME))
    return cookie, csrf


def by_session(ctx: Context, cookie: str) -> tuple[policy.Principal, str]:
    """(the signed-in user, the CSRF token their writes must carry)."""
    with ctx.catalog.session() as session:
        row = session.get(WebSession, secrets.digest(cookie))
        if row is None or timing.utc(row.expires_at) < now():
            raise Unauthenticated("not signed in (the session ended or was signed out).",
                                  hint="Sign in again.")
        return principal(session, session.get_one(User, row.user_id)), row.csrf_token


def logout(ctx: Context, cookie: str) -> None:
    with ctx.catalog.session() as session:
        session.execute(delete(WebSession).where(
            WebSession.id_sha256 == secrets.digest(cookie)))

