"""Quotas: a user's ceilings (administrators set them; every user reads their own) and a
role's defaults (:mod:`waymark.usecases.access.quotas`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from waymark.api import schemas
from waymark.api.accounts import Role
from waymark.http.security import CallerDep, ContextDep, require
from waymark.model.units import parse_size
from waymark.usecases.access import quotas

router = APIRouter(tags=["accounts"], route_class=schemas.Route)
COUNT = Field(default=None, ge=0, le=1_000_000)
SIZE = Field(default=None, max_length=16, examples=["8G"])


class QuotaBody(BaseModel):
    """The whole quota (PUT replaces it): a ceiling per resource; absent or null = not limited
    (a user's: their role's default applies)."""

    vms: int | None = COUNT
    cpus: int | None = COUNT
    memory: str | None = SIZE
    disk: str | None = SIZE
    checkpoints: int | None = COUNT

    def limits(self) -> quotas.Limits:
        return {"vms": self.vms, "cpus": self.cpus, "checkpoints": self.checkpoints,
                **{key: None if text is None else parse_size(text, what=f"{key} quota")
                   for key, text in (("memory", self.memory), ("disk", self.disk))}}


@router.get("/users/{name}/quota", response_model=schemas.UserQuota)
def user_quota(name: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """A user's quota (their own ceilings, and with their role's defaults: ``quota``) and what
    their VMs hold (``usage``); administrators read anyone's, every user their own."""
    if name != caller.who.name:
        require(caller.who, "user.manage")
    return quotas.show(ctx, user=name)


@router.put("/users/{name}/quota", response_model=schemas.UserQuota)
def user_quota_set(name: str, body: QuotaBody, caller: CallerDep, ctx: ContextDep
                   ) -> dict[str, Any]:
    """Set a user's quota (administrators). A quota below what they hold removes nothing:
    it refuses further growth."""
    require(caller.who, "user.manage")
    return quotas.set_quota(ctx, body.limits(), user=name)


@router.get("/roles/{role}/quota", response_model=schemas.RoleQuota)
def role_quota(role: Role, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """A role's default quota: what applies where a member's own quota sets nothing
    (administrators; an administrator is never limited)."""
    require(caller.who, "user.manage")
    return quotas.show(ctx, role=role)


@router.put("/roles/{role}/quota", response_model=schemas.RoleQuota)
def role_quota_set(role: Role, body: QuotaBody, caller: CallerDep, ctx: ContextDep
                   ) -> dict[str, Any]:
    require(caller.who, "user.manage")
    return quotas.set_quota(ctx, body.limits(), role=role)
