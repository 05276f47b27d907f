"""Sign-in, users, grants and API tokens."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from waymark.api import schemas
from waymark.errors import Forbidden, InvalidInput, NotFound, Unauthenticated
from waymark.http.security import (
    COOKIE,
    CallerDep,
    ContextDep,
    LoginLimiter,
    OutOfScope,
    client_address,
    require,
    sign_in,
)
from waymark.model import policy
from waymark.model.units import parse_duration
from waymark.model.vocabulary import DeleteAnswer
from waymark.usecases.access import audit, users

router = APIRouter(tags=["accounts"], route_class=schemas.Route)
Role = Literal["administrator", "self-service", "backup-operator", "read-only"]
Permission = Literal["start-stop", "checkpoint", "checkpoint-restore-only", "backup-run",
                     "backup-restore"]


class Login(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


@router.post("/auth/login", response_model=schemas.SignedIn)
def login(body: Login, request: Request, response: Response) -> dict[str, Any]:
    """Sign in: a session cookie (HttpOnly, SameSite=Strict) and the CSRF token its writes
    must send in ``X-CSRF-Token``. Repeated failures are refused for a while (429:
    :class:`~waymark.http.security.LoginLimiter`)."""
    cookie, csrf = sign_in(request, body.name, body.password)
    response.set_cookie(COOKIE, cookie, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", max_age=int(
                            users.SESSION_LIFETIME.total_seconds()), path="/")
    return {"user_name": body.name, "csrf_token": csrf}


@router.post("/auth/logout", response_model=schemas.SignedOut)
def logout(request: Request, response: Response, caller: CallerDep, ctx: ContextDep
           ) -> dict[str, Any]:
    """End this session (its cookie stops working at once)."""
    cookie = request.cookies.get(COOKIE)
    if cookie:
        users.logout(ctx, cookie)
    response.delete_cookie(COOKIE, path="/")
    return {"id": caller.who.user_id, "name": caller.who.name, "signed_out": True}


@router.get("/auth/me", response_model=schemas.Me)
def me(caller: CallerDep) -> dict[str, Any]:
    who = caller.who
    return {"id": who.user_id, "name": who.name, "role": who.role, "via": caller.via,
            "csrf_token": caller.csrf,
            "grants": {vm: sorted(p) for vm, p in who.vm_grants.items()},
            "templates": sorted(who.templates)}


class NewUser(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    role: Role
    password: str = Field(min_length=1, max_length=1024)


@router.get("/users", response_model=list[schemas.User])
def user_list(caller: CallerDep, ctx: ContextDep) -> list[dict[str, Any]]:
    require(caller.who, "user.manage")
    return users.listing(ctx)


@router.post("/users", status_code=201, response_model=schemas.User)
def user_add(body: NewUser, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    require(caller.who, "user.manage")
    return users.add(ctx, body.name, body.role, body.password)


@router.delete("/users/{name}", response_model=schemas.Deleted)
def user_remove(name: str, caller: CallerDep, ctx: ContextDep) -> DeleteAnswer:
    require(caller.who, "user.manage")
    return users.remove(ctx, name)


class Password(BaseModel):
    password: str = Field(min_length=1, max_length=1024)
    current_password: str | None = Field(
        default=None, max_length=1024,
        description="Your password now: needed to change your own (not another user's).")
    keep_tokens: bool = Field(default=False, description="Keep the user's API tokens working "
                                                         "(by default they are revoked).")


@router.put("/users/{name}/password", response_model=schemas.PasswordChanged)
def user_password(name: str, body: Password, request: Request, caller: CallerDep,
                  ctx: ContextDep) -> dict[str, Any]:
    """Administrators set anyone's; every user their own, giving the current one (failures
    count as failed sign-ins). The user's sessions end, and their API tokens are revoked
    unless ``keep_tokens``."""
    if name != caller.who.name:
        require(caller.who, "user.manage")
        return users.set_password(ctx, name, body.password, keep_tokens=body.keep_tokens)
    if body.current_password is None:
        raise InvalidInput("changing your own password needs your current password.",
                           hint="Send it as current_password.")
    limiter: LoginLimiter = request.app.state.limiter
    try:
        with limiter.attempt(client_address(request), name):
            return users.set_password(ctx, name, body.password, current=body.current_password,
                                      keep_tokens=body.keep_tokens)
    except Unauthenticated as err:  # (the caller is signed in: not a 401)
        raise Forbidden(err.message, hint=err.hint) from None


@router.delete("/users/{name}/sign-in-failures", response_model=schemas.SignInFailuresForgotten)
def user_unlock(name: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    """Forget the failed sign-ins counted against a user name from every address, so a user
    locked out (429) may sign in again at once (administrators)."""
    require(caller.who, "user.manage")
    limiter: LoginLimiter = request.app.state.limiter
    return {"user_name": name, "cleared_addresses": limiter.forget(name)}


class NewGrant(BaseModel):
    vm: str | None = Field(default=None, max_length=99)
    template: str | None = Field(default=None, max_length=99)
    permissions: list[Permission] = Field(default_factory=list, max_length=5)


@router.post("/users/{name}/grants", response_model=schemas.User)
def grant_add(name: str, body: NewGrant, caller: CallerDep, ctx: ContextDep
              ) -> dict[str, Any]:
    require(caller.who, "user.manage")
    return users.grant(ctx, name, vm=body.vm, template=body.template,
                       permissions=list(body.permissions))


@router.delete("/users/{name}/grants", response_model=schemas.User)
def grant_remove(name: str, caller: CallerDep, ctx: ContextDep, vm: str | None = None,
                 template: str | None = None) -> dict[str, Any]:
    require(caller.who, "user.manage")
    return users.revoke(ctx, name, vm=vm, template=template)


class NewToken(BaseModel):
    name: str = Field(min_length=1, max_length=99)
    expires_in: str | None = Field(default=None, max_length=16, examples=["90d"],
                                   description="How long it works: 30m, 12h, 90d or 8w "
                                               "(default: until revoked).")
    user: str | None = Field(default=None, max_length=64,
                             description="Administrators only: whose token (default: yours).")


@router.get("/tokens", response_model=list[schemas.Token])
def token_list(caller: CallerDep, ctx: ContextDep) -> list[dict[str, Any]]:
    """Your tokens (administrators: everyone's); never the secrets."""
    return users.tokens(ctx, None if caller.who.admin else caller.who.name)


@router.post("/tokens", status_code=201, response_model=schemas.NewToken)
def token_create(body: NewToken, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """A new token, shown in this response only."""
    owner = body.user or caller.who.name
    if owner != caller.who.name:
        require(caller.who, "user.manage")
    require(caller.who, "token.own")
    expires_in = parse_duration(body.expires_in, what="expires_in") if body.expires_in else None
    return users.create_token(ctx, owner, body.name, expires_in)


@router.delete("/tokens/{token_id}", response_model=schemas.Deleted)
def token_revoke(token_id: str, caller: CallerDep, ctx: ContextDep) -> DeleteAnswer:
    try:
        return users.revoke_token(ctx, token_id, None if caller.who.admin else caller.who.name)
    except NotFound as err:  # someone else's token is outside the caller's scope
        if any(t["id"] == token_id for t in users.tokens(ctx)):
            raise OutOfScope(err.message, hint=err.hint) from None
        raise



@router.get("/roles", response_model=schemas.Roles)
def roles(caller: CallerDep) -> dict[str, Any]:
    """The roles and the per-VM permissions a grant may name."""
    return {"roles": list(policy.ROLES), "vm_permissions": list(policy.VM_PERMISSIONS)}


@router.get("/audit", response_model=list[schemas.AuditEntry])
def audit_log(caller: CallerDep, ctx: ContextDep, user: str | None = None,
              outcome: Literal["ok", "denied", "failed"] | None = None,
              limit: int = Query(default=100, ge=1, le=10000)) -> list[dict[str, Any]]:
    """Who did what, newest first (administrators)."""
    require(caller.who, "audit.view")
    return audit.listing(ctx, user=user, outcome=outcome, limit=limit)
