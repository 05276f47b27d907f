"""Long operations (merges, exports): list, show, cancel; each in the caller's scope."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from waymark.api.security import CallerDep, ContextDep, OutOfScope, redact, vm_for
from waymark.auth import policy
from waymark.auth.policy import Principal
from waymark.catalog.models import Job, Vm
from waymark.errors import NotFound
from waymark.ops import jobs
from waymark.ops.context import Context

router = APIRouter(tags=["jobs"])


def _shown(who: Principal, job: dict[str, Any]) -> dict[str, Any]:
    """Host paths (an export's folder, in its parameters and result) are an administrator's
    to see."""
    return job if who.admin else redact(who, {k: v for k, v in job.items() if k != "params"})


def _job(ctx: Context, who: Principal, ref: str, action: str) -> dict[str, Any]:
    """The job ``ref`` (its id or an id prefix) names among the caller's (the jobs of the VMs
    in their scope; jobs of no VM are administrators'): a prefix that also matches jobs out of
    scope answers as if they did not exist; 403 if seen but ``action`` is not allowed."""
    visible = _in_scope(ctx, who)
    try:
        job = jobs.show(ctx, ref, visible)
    except NotFound:
        exists = _exists(ctx, ref)
        raise (OutOfScope if exists else NotFound)(
            f"no job {ref!r}.", hint="List the jobs you may see: GET /api/jobs") from None
    if job["vm_id"] is not None and job["vm_name"] is not None:
        vm_for(ctx, who, action, job["vm_id"])  # 403 if seen but not allowed
    return job


def _in_scope(ctx: Context, who: Principal) -> Callable[[Job], bool]:
    with ctx.catalog.session() as session:
        owners = {v.id: v.owner_id for v in session.query(Vm)}

    def visible(job: Job) -> bool:
        return who.admin or (job.vm_id in owners
                             and policy.in_scope(who, job.vm_id, owners[job.vm_id]))

    return visible


def _exists(ctx: Context, ref: str) -> bool:
    """Whether some job matches ``ref`` (for the audit log: a refusal; the answer is the
    same)."""
    try:
        jobs.show(ctx, ref)
    except NotFound:
        return False
    return True


def job_list_for(ctx: Context, who: Principal, everything: bool) -> list[dict[str, Any]]:
    with ctx.catalog.session() as session:
        owners = {v.id: v.owner_id for v in session.query(Vm)}
    return [j for j in jobs.listing(ctx, everything=everything)
            if who.admin or (j["vm_id"] in owners
                             and policy.in_scope(who, j["vm_id"], owners[j["vm_id"]]))]


@router.get("/jobs")
def job_list(caller: CallerDep, ctx: ContextDep, everything: bool = False
             ) -> list[dict[str, Any]]:
    """Unfinished jobs and the last finished ones in the caller's scope."""
    return [_shown(caller.who, j) for j in job_list_for(ctx, caller.who, everything)]


POLL = 0.2
KEEPALIVE = 15.0


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


async def _changes(ctx: Context, who: Principal, job_id: str | None,
                   until_idle: bool = False) -> AsyncIterator[str]:
    """Server-sent events: each job's state whenever its status, progress or step changes;
    for one job, ``end`` once it finished (``until_idle``: once no job is unfinished); a
    comment line every :data:`KEEPALIVE` s. The catalog is read in a worker thread; the wait
    between reads holds none."""
    seen: dict[str, tuple[Any, ...]] = {}
    quiet_since = time.monotonic()
    while True:
        if job_id:
            rows = [await run_in_threadpool(_job, ctx, who, job_id, "job.view")]
        else:
            rows = await run_in_threadpool(job_list_for, ctx, who, False)
        for job in rows:
            key = (job["status"], job["progress"], job["step"])
            if seen.get(job["id"]) != key:
                seen[job["id"]] = key
                quiet_since = time.monotonic()
                yield _event("job", _shown(who, job))
        if job_id and rows[0]["status"] in jobs.FINISHED:
            yield _event("end", {"id": rows[0]["id"], "status": rows[0]["status"]})
            return
        if until_idle and all(j["status"] in jobs.FINISHED for j in rows):
            yield _event("end", {"idle": True})
            return
        if time.monotonic() - quiet_since > KEEPALIVE:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(POLL)


STREAM = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.get("/jobs/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
def job_events_all(caller: CallerDep, ctx: ContextDep, until_idle: bool = False
                   ) -> StreamingResponse:
    """Server-sent events for every job in the caller's scope (a ``job`` event whenever one
    changes; with ``until_idle``, ``end`` once none is unfinished, and the stream closes)."""
    return StreamingResponse(_changes(ctx, caller.who, None, until_idle),
                             media_type="text/event-stream", headers=STREAM)


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
def job_events(job_id: str, caller: CallerDep, ctx: ContextDep) -> StreamingResponse:
    """Server-sent events for one job: a ``job`` event at each change of its status,
    progress or step (progress only grows), then ``end``."""
    first = _job(ctx, caller.who, job_id, "job.view")  # 404 / 403 before the stream starts
    return StreamingResponse(_changes(ctx, caller.who, first["id"]),
                             media_type="text/event-stream", headers=STREAM)


@router.get("/jobs/{job_id}")
def job_show(job_id: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    return _shown(caller.who, _job(ctx, caller.who, job_id, "job.view"))


@router.post("/jobs/{job_id}/cancel")
def job_cancel(job_id: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """Ask a job to stop; a merge stopped mid-copy changes nothing anyone reads."""
    job = _job(ctx, caller.who, job_id, "job.cancel")
    return _shown(caller.who, jobs.cancel(ctx, job["id"]))
