"""Checkpoints of one VM: tree, create, show, apply, rename and notes, delete (a merge
job)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from waymark.api import schemas
from waymark.catalog.models import Vm
from waymark.engine import jobs
from waymark.engine.context import Context
from waymark.engine.running import presence
from waymark.http.security import CallerDep, ContextDep, redact, require_vm, vm_for
from waymark.model.notes import MAX_NOTES
from waymark.usecases import views
from waymark.usecases.access import locations
from waymark.usecases.checkpoints import deletion
from waymark.usecases.checkpoints import lifecycle as checkpoints
from waymark.usecases.vms import export_job

router = APIRouter(tags=["checkpoints"], route_class=schemas.Route)


@router.get("/vms/{vm}/checkpoints", response_model=schemas.CheckpointTree)
def tree(vm: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """The checkpoint tree (``current_id``: Now's parent)."""
    row = vm_for(ctx, caller.who, "checkpoint.view", vm)
    return views.checkpoint_list(ctx, row.id)


NOTES = ("Its notes (Hyper-V's Notes): free text, several lines, at most 4,000 characters; "
         "control and invisible formatting characters are refused (400).")


class NewCheckpoint(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=99)
    type: Literal["production", "productiononly", "standard"] | None = Field(
        default=None, description="This checkpoint's type (default: the VM's).")
    notes: str | None = Field(default=None, max_length=MAX_NOTES,
                              description=f"{NOTES} Empty: none.")


@router.post("/vms/{vm}/checkpoints", status_code=201, response_model=schemas.CheckpointDetail)
def create(vm: str, caller: CallerDep, ctx: ContextDep, body: NewCheckpoint | None = None
           ) -> dict[str, Any]:
    row = vm_for(ctx, caller.who, "checkpoint.create", vm)
    wanted = body or NewCheckpoint()
    ckpt_id = checkpoints.create(ctx, row.id, wanted.name, wanted.type, text=wanted.notes)
    return redact(caller.who, views.checkpoint_show(ctx, row.id, ckpt_id))


@router.get("/vms/{vm}/checkpoints/{ckpt}", response_model=schemas.CheckpointDetail)
def show(vm: str, ckpt: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    row = vm_for(ctx, caller.who, "checkpoint.view", vm)
    return redact(caller.who, views.checkpoint_show(ctx, row.id, ckpt))


class Apply(BaseModel):
    mode: Literal["checkpoint_first", "discard_current"] = Field(
        description="Hyper-V's choice: 'Create Checkpoint and Apply' or 'Apply' (Now is "
                    "lost).")
    start: bool = Field(default=False, description="Start (resume) the VM afterwards.")


@router.post("/vms/{vm}/checkpoints/{ckpt}/apply", response_model=schemas.Applied)
def apply(vm: str, ckpt: str, body: Apply, caller: CallerDep, ctx: ContextDep
          ) -> dict[str, Any]:
    row = vm_for(ctx, caller.who, "checkpoint.apply", vm)
    require_vm(caller.who, row, *_apply_effects(ctx, row, body))
    target = views.checkpoint_show(ctx, row.id, ckpt)["id"]
    mode = checkpoints.ApplyMode.CHECKPOINT_FIRST if body.mode == "checkpoint_first" \
        else checkpoints.ApplyMode.DISCARD_CURRENT
    return checkpoints.apply(ctx, row.id, target, mode, start=body.start).view()


@router.post("/vms/{vm}/revert", response_model=schemas.Applied)
def revert(vm: str, body: Apply, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """Hyper-V's Revert (Revert-VMCheckpoint): apply the VM's current checkpoint, Now's
    parent, with the same choice, permissions and answer as its apply; 409 when it has
    none."""
    row = vm_for(ctx, caller.who, "checkpoint.apply", vm)
    require_vm(caller.who, row, *_apply_effects(ctx, row, body))
    target = checkpoints.revert_target(ctx, row.id)
    mode = checkpoints.ApplyMode.CHECKPOINT_FIRST if body.mode == "checkpoint_first" \
        else checkpoints.ApplyMode.DISCARD_CURRENT
    return checkpoints.apply(ctx, row.id, target, mode, start=body.start).view()


def _apply_effects(ctx: Context, row: Vm, body: Apply) -> list[str]:
    """What an apply does besides the apply, each needing its own permission: the checkpoint
    of Now (``checkpoint_first``), and powering the VM off (it is running or paused) or on
    (``start``)."""
    effects = ["checkpoint.create"] if body.mode == "checkpoint_first" else []
    if body.start or presence.observed_state(ctx, row.id, row.state) in presence.LIVE_STATES:
        effects.append("vm.power")
    return effects


class Change(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=99,
                             description="Its new name (absent: unchanged)")
    notes: str | None = Field(default=None, max_length=MAX_NOTES,
                              description=f"{NOTES} Empty or null: cleared; absent: "
                                          "unchanged.")


@router.patch("/vms/{vm}/checkpoints/{ckpt}", response_model=schemas.CheckpointRenamed)
def rename(vm: str, ckpt: str, body: Change, caller: CallerDep, ctx: ContextDep
           ) -> dict[str, Any]:
    """Rename a checkpoint and/or set its notes (at least one of them; both are checked before
    either changes; the ``checkpoint.rename`` permission). Names need not be unique (as in
    Hyper-V): a name another checkpoint of the VM has is taken, with a warning in
    ``warnings`` (empty otherwise)."""
    row = vm_for(ctx, caller.who, "checkpoint.rename", vm)
    text = (body.notes or "") if "notes" in body.model_fields_set else None
    renamed = checkpoints.change(ctx, row.id, ckpt, name=body.name, text=text)
    return {**redact(caller.who, views.checkpoint_show(ctx, row.id, renamed.id)),
            "warnings": renamed.warnings}


@router.delete("/vms/{vm}/checkpoints/{ckpt}", status_code=202,
               response_model=schemas.CheckpointsDeleted)
def delete(vm: str, ckpt: str, caller: CallerDep, ctx: ContextDep, subtree: bool = False
           ) -> dict[str, Any]:
    """Delete one checkpoint (``subtree``: with everything below it). It leaves the tree at
    once; its disk layers are merged away by the returned job (follow it: GET
    /api/jobs/{id})."""
    row = vm_for(ctx, caller.who, "checkpoint.delete", vm)
    target = views.checkpoint_show(ctx, row.id, ckpt)["id"]
    done = deletion.delete_checkpoints(ctx, row.id, target, subtree=subtree, yes=True,
                                       wait=False, user=caller.who.name)
    jobs.spawn(ctx, done.job)
    return done.answer()


@router.delete("/vms/{vm}/checkpoints", status_code=202, response_model=schemas.CheckpointsDeleted)
def delete_matching(vm: str, match: str, caller: CallerDep, ctx: ContextDep,
                    subtree: bool = False, yes: bool = False) -> dict[str, Any]:
    """Delete every checkpoint ``match`` names: a name, an id prefix, or a glob over names
    (``Experiment*``, Hyper-V's ``Remove-VMSnapshot -Name``; a checkpoint named exactly
    ``match`` wins over the glob); several matches need ``yes``
    (409 lists them otherwise). Their merges run in the returned job."""
    row = vm_for(ctx, caller.who, "checkpoint.delete", vm)
    done = deletion.delete_checkpoints(ctx, row.id, match, subtree=subtree, yes=yes, wait=False,
                                       user=caller.who.name)
    jobs.spawn(ctx, done.job)
    return done.answer()


class Export(BaseModel):
    location: str = Field(min_length=1, max_length=64, description="A registered export folder.")
    folder: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,98}$",
                               description="The bundle's folder in it (default: VM, "
                                           "checkpoint and time).")


@router.post("/vms/{vm}/checkpoints/{ckpt}/export", status_code=202,
             response_model=schemas.ExportStarted)
def export(vm: str, ckpt: str, body: Export, caller: CallerDep, ctx: ContextDep
           ) -> dict[str, Any]:
    """Write the checkpoint as a standalone bundle into a registered export folder, as a job
    (follow it: GET /api/jobs/{id}). A caller who is not an administrator writes into a folder
    of their own there (``<user name>/<folder>``): a name clash only ever tells them about
    their own bundles."""
    row = vm_for(ctx, caller.who, "checkpoint.export", vm)
    target = views.checkpoint_show(ctx, row.id, ckpt)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = body.folder or re.sub(r"[^A-Za-z0-9._-]", "_",
                                   f"{row.name}-{target['name']}-{stamp}")
    if not caller.who.admin:
        folder = f"{caller.who.name}/{folder}"
    dest = locations.path(ctx, body.location, "export") / folder
    job_id = export_job.submit_export(ctx, row.id, target["id"], dest, run_here=False,
                                      user=caller.who.name)
    jobs.spawn(ctx, job_id)
    return {"job_id": job_id, "location": body.location, "folder": folder}
