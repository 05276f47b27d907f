"""Long operations (merges, exports): list, show, cancel; each in the caller's scope."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from waymark.api.security import CallerDep, ContextDep, vm_for
from waymark.auth import policy
from waymark.auth.policy import Decision, Principal
from waymark.catalog.models import Vm
from waymark.errors import NotFound
from waymark.ops import jobs
from waymark.ops.context import Context

router = APIRouter(tags=["jobs"])


def _shown(who: Principal, job: dict[str, Any]) -> dict[str, Any]:
    """Host paths (an export's folder) are an administrator's to see."""
    return job if who.admin else {k: v for k, v in job.items() if k != "params"}


def _job(ctx: Context, who: Principal, ref: str, action: str) -> dict[str, Any]:
    try:
        job = jobs.show(ctx, ref)
    except NotFound:
        job = None
    if job is not None and job["vm_id"] is None and not who.admin:
        job = None
    if job is not None and job["vm_id"] is not None:
        with ctx.catalog.session() as session:
            row = session.get(Vm, job["vm_id"])
            owner = row.owner_id if row is not None else None
        if policy.decide_vm(who, action, job["vm_id"], owner) is Decision.HIDE:
            job = None
        elif row is not None:
            vm_for(ctx, who, action, row.id)  # 403 if seen but not allowed
    if job is None:
        raise NotFound(f"no job {ref!r}.", hint="List the jobs you may see: GET /api/jobs")
    return job


@router.get("/jobs")
def job_list(caller: CallerDep, ctx: ContextDep, everything: bool = False
             ) -> list[dict[str, Any]]:
    """Unfinished jobs and the last finished ones in the caller's scope."""
    with ctx.catalog.session() as session:
        owners = {v.id: v.owner_id for v in session.query(Vm)}
    who = caller.who
    return [_shown(who, j) for j in jobs.listing(ctx, everything=everything)
            if who.admin or (j["vm_id"] in owners
                             and policy.in_scope(who, j["vm_id"], owners[j["vm_id"]]))]


@router.get("/jobs/{job_id}")
def job_show(job_id: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    return _shown(caller.who, _job(ctx, caller.who, job_id, "job.view"))


@router.post("/jobs/{job_id}/cancel")
def job_cancel(job_id: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """Ask a job to stop; a merge stopped mid-copy changes nothing anyone reads."""
    job = _job(ctx, caller.who, job_id, "job.cancel")
    return _shown(caller.who, jobs.cancel(ctx, job["id"]))
