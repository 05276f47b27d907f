"""Backups of one VM to a registered repository: list, run, verify, restore; retention and
schedules are administrators'. Repositories are named (``waymark location add``), never paths."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from waymark.api import schemas
from waymark.engine.context import Context
from waymark.errors import Forbidden, InvalidInput
from waymark.http.security import Caller, CallerDep, ContextDep, require, require_vm, vm_for
from waymark.model import retention
from waymark.model.vocabulary import DeleteAnswer
from waymark.usecases import views
from waymark.usecases.access import locations
from waymark.usecases.backups import points as backups
from waymark.usecases.backups import schedules
from waymark.usecases.checkpoints import lifecycle as checkpoints

router = APIRouter(tags=["backups"], route_class=schemas.Route)


def _repo(ctx: Context, name: str) -> Any:
    return locations.path(ctx, name, "repository")


@router.get("/vms/{vm}/backups", response_model=list[schemas.BackupPoint])
def point_list(vm: str, repository: str, caller: CallerDep, ctx: ContextDep
               ) -> list[dict[str, Any]]:
    """The VM's points in the repository, oldest first."""
    row = vm_for(ctx, caller.who, "backup.view", vm)
    points = [p for p in backups.listing(_repo(ctx, repository)) if p["vm_id"] == row.id]
    return [{**p, "repository": repository} for p in points]


class Run(BaseModel):
    repository: str = Field(min_length=1, max_length=64)
    full: bool = False


@router.post("/vms/{vm}/backups", status_code=201, response_model=schemas.BackupPoint)
def point_run(vm: str, body: Run, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """Back the VM up now (incremental when that is provably correct, else full)."""
    row = vm_for(ctx, caller.who, "backup.run", vm)
    [outcome] = backups.run(ctx, [row.id], _repo(ctx, body.repository), full=body.full)
    if outcome.failure is not None:
        raise outcome.failure
    assert outcome.point is not None
    return {**backups.summary(outcome.point), "repository": body.repository}


class Verify(BaseModel):
    repository: str = Field(min_length=1, max_length=64)


@router.post("/vms/{vm}/backups/{point}/verify", response_model=list[schemas.PointVerified])
def point_verify(vm: str, point: str, body: Verify, caller: CallerDep, ctx: ContextDep
                 ) -> list[dict[str, Any]]:
    """Re-read every file of the point and of each point it needs."""
    row = vm_for(ctx, caller.who, "backup.verify", vm)
    return backups.verify(_repo(ctx, body.repository), row.id, point)


class Restore(BaseModel):
    repository: str = Field(min_length=1, max_length=64)
    mode: Literal["checkpoint_first", "discard_current", "as_new"]
    new_name: str | None = Field(default=None, min_length=1, max_length=99,
                                 description="as_new: the new VM's name (the caller owns it)")


@router.post("/vms/{vm}/backups/{point}/restore",
             response_model=schemas.RestoredAsNew | schemas.RestoredInPlace)
def point_restore(vm: str, point: str, body: Restore, caller: CallerDep, ctx: ContextDep
                  ) -> dict[str, Any]:
    """Into the VM (its checkpoints stay; Now is under a new checkpoint) or as a new VM."""
    row = vm_for(ctx, caller.who, "backup.restore", vm)
    repo = _repo(ctx, body.repository)
    if body.mode == "as_new":
        if body.new_name is None:
            raise InvalidInput("a restore as a new VM needs new_name.")
        if not caller.who.admin:  # self-service users create VMs from templates only
            raise Forbidden("only administrators restore a backup as a new VM.",
                            hint="Restore it into the VM (checkpoint_first or "
                                 "discard_current), or ask an administrator.")
        vm_id = backups.restore_as_new(ctx, repo, row.id, point, body.new_name,
                                       owner_id=caller.who.user_id)
        return {"restored_as": views.vm_show(ctx, vm_id)}
    if body.mode == "checkpoint_first":  # it takes a checkpoint of Now first
        require_vm(caller.who, row, "checkpoint.create")
    mode = checkpoints.ApplyMode.CHECKPOINT_FIRST if body.mode == "checkpoint_first" \
        else checkpoints.ApplyMode.DISCARD_CURRENT
    done: dict[str, Any] = backups.restore(ctx, repo, row.id, point, mode)
    return done


class Prune(BaseModel):
    repository: str = Field(min_length=1, max_length=64)
    keep_last: int = Field(default=0, ge=0, le=10000)
    keep_daily: int = Field(default=0, ge=0, le=10000)
    keep_weekly: int = Field(default=0, ge=0, le=10000)
    keep_monthly: int = Field(default=0, ge=0, le=10000)
    dry_run: bool = Field(default=False, description="Remove nothing: answer what would go")
    points: list[str] | None = Field(
        default=None, max_length=100000,
        description="Remove none but these (the ids a dry run answered, confirmed): a point "
                    "the rules would remove only since then stays")


@router.post("/backups/prune", response_model=schemas.Pruned)
def prune(body: Prune, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """Remove the points no keep rule keeps (administrators)."""
    require(caller.who, "backup.prune")
    policy = retention.Policy(body.keep_last, body.keep_daily, body.keep_weekly,
                              body.keep_monthly)
    only = None if body.points is None else set(body.points)
    removed = backups.prune(ctx, _repo(ctx, body.repository), policy, None, body.dry_run, only)
    return {"removed": removed, "dry_run": body.dry_run}


class NewSchedule(BaseModel):
    name: str = Field(min_length=1, max_length=99)
    vms: list[str] = Field(min_length=1, max_length=1000)
    repository: str = Field(min_length=1, max_length=64)
    every: Literal["daily", "weekly", "monthly"]
    at: str = Field(pattern=r"^\d{2}:\d{2}$", examples=["02:30"])
    day: int | None = Field(default=None, ge=0, le=28)
    full_every: int | None = Field(default=None, ge=1, le=1000)
    keep_last: int = Field(default=0, ge=0, le=10000)
    keep_daily: int = Field(default=0, ge=0, le=10000)
    keep_weekly: int = Field(default=0, ge=0, le=10000)
    keep_monthly: int = Field(default=0, ge=0, le=10000)


def _vm_ids(ctx: Context, caller: Caller, refs: list[str]) -> list[str]:
    """The schedule's VMs, each resolved once here (a run backs up these ids)."""
    return [vm_for(ctx, caller.who, "backup.run", ref).id for ref in refs]


@router.get("/schedules", response_model=list[schemas.Schedule])
def schedule_list(caller: CallerDep, ctx: ContextDep) -> list[dict[str, Any]]:
    require(caller.who, "schedule.manage")
    return schedules.listing(ctx)


@router.post("/schedules", status_code=201, response_model=schemas.Schedule)
def schedule_add(body: NewSchedule, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    require(caller.who, "schedule.manage")
    keep = retention.Policy(body.keep_last, body.keep_daily, body.keep_weekly, body.keep_monthly)
    return schedules.add(ctx, body.name, _vm_ids(ctx, caller, body.vms),
                         _repo(ctx, body.repository), body.every, body.at, body.day,
                         body.full_every, keep)


@router.put("/schedules/{name}", response_model=schemas.Schedule)
def schedule_edit(name: str, body: NewSchedule, caller: CallerDep, ctx: ContextDep
                  ) -> dict[str, Any]:
    """Replace a schedule's settings (``name`` in the body must be the same)."""
    require(caller.who, "schedule.manage")
    if body.name != name:
        raise InvalidInput("a schedule keeps its name.", hint=f"Send name {name!r}.")
    keep = retention.Policy(body.keep_last, body.keep_daily, body.keep_weekly, body.keep_monthly)
    return schedules.add(ctx, name, _vm_ids(ctx, caller, body.vms), _repo(ctx, body.repository),
                         body.every, body.at, body.day, body.full_every, keep, replace=True)


@router.delete("/schedules/{name}", response_model=schemas.Deleted)
def schedule_remove(name: str, caller: CallerDep, ctx: ContextDep) -> DeleteAnswer:
    require(caller.who, "schedule.manage")
    return schedules.remove(ctx, name)
