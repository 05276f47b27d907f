"""Long operations (merges, exports): list, show, cancel; each in the caller's scope."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from waymark.api import schemas, streams
from waymark.catalog.models import Job
from waymark.engine import jobs
from waymark.engine.context import Context
from waymark.errors import NotFound, WaymarkError
from waymark.http.security import CallerDep, ContextDep, OutOfScope, redact, vm_for
from waymark.model.policy import Principal
from waymark.usecases.access import job_scope

router = APIRouter(tags=["jobs"], route_class=schemas.Route)


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
    owners = job_scope.owners(ctx)
    return lambda job: job_scope.visible(who, job.vm_id, owners)


def _exists(ctx: Context, ref: str) -> bool:
    """Whether some job matches ``ref`` (for the audit log: a refusal; the answer is the
    same)."""
    try:
        jobs.show(ctx, ref)
    except NotFound:
        return False
    return True


@router.get("/jobs", response_model=list[schemas.Job])
def job_list(caller: CallerDep, ctx: ContextDep, everything: bool = False
             ) -> list[dict[str, Any]]:
    """Unfinished jobs and the last finished ones in the caller's scope."""
    return [_shown(caller.who, j) for j in job_scope.job_list_for(ctx, caller.who, everything)]


KEEPALIVE = 15.0
IDLE = 1.0  # s a stream sleeps at most without news (then it checks its caller and lifetime)


async def _changes(ctx: Context, watch: streams.Watch, job_id: str | None,
                   until_idle: bool = False) -> AsyncIterator[str]:
    """Server-sent events: each job's state whenever its status, progress or step changes;
    for one job, ``end`` once it finished (``until_idle``: once no job is unfinished); a
    comment line every :data:`KEEPALIVE` s. The jobs come from the shared reading
    (:class:`~waymark.api.streams.JobFeed`), filtered by the caller as last checked."""
    feed: streams.JobFeed = watch.request.app.state.streams.feed
    wake = asyncio.Event()
    feed.listen(wake)
    try:
        async for text in _news(ctx, watch, feed, wake, job_id, until_idle):
            yield text
    finally:
        feed.leave(wake)


async def _news(ctx: Context, watch: streams.Watch, feed: streams.JobFeed, wake: asyncio.Event,
                job_id: str | None, until_idle: bool) -> AsyncIterator[str]:
    seen: dict[str, tuple[Any, ...]] = {}
    quiet_since, number = time.monotonic(), 0
    while True:
        wake.clear()
        who = await watch.current()
        reading = feed.latest
        if reading is not None and reading.number != number:
            number = reading.number
            rows = await _rows(ctx, who, reading, job_id)
            for job in _changed(seen, rows):
                quiet_since = time.monotonic()
                yield streams.event("job", _shown(who, job))
            if (last := _last(rows, job_id, until_idle)) is not None:
                yield last
                return
        if time.monotonic() - quiet_since > KEEPALIVE:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), IDLE)


def _changed(seen: dict[str, tuple[Any, ...]], rows: list[dict[str, Any]]
             ) -> list[dict[str, Any]]:
    """The jobs whose status, progress or step changed since ``seen`` (which is updated)."""
    changed = []
    for job in rows:
        key = (job["status"], job["progress"], job["step"])
        if seen.get(job["id"]) != key:
            seen[job["id"]] = key
            changed.append(job)
    return changed


def _last(rows: list[dict[str, Any]], job_id: str | None, until_idle: bool) -> str | None:
    """The ``end`` event once the stream is done: its one job finished (``until_idle``: no job
    is unfinished)."""
    if job_id and rows[0]["status"] in jobs.FINISHED:
        return streams.event("end", {"id": rows[0]["id"], "status": rows[0]["status"]})
    if until_idle and all(j["status"] in jobs.FINISHED for j in rows):
        return streams.event("end", {"idle": True})
    return None


async def _rows(ctx: Context, who: Principal, reading: streams.Reading, job_id: str | None
                ) -> list[dict[str, Any]]:
    """The jobs the stream shows from ``reading``; one job that left the reading (finished
    long ago) is read on its own."""
    shown = job_scope.in_scope(who, reading.jobs, reading.owners)
    if job_id is None:
        return shown
    found = [j for j in shown if j["id"] == job_id]
    try:
        return found or [await run_in_threadpool(_job, ctx, who, job_id, "job.view")]
    except WaymarkError as err:  # it, or its VM, left the caller's scope
        raise streams.revoked(err) from None


@router.get("/jobs/events", response_class=StreamingResponse,
            responses=schemas.EVENT_STREAM)
def job_events_all(request: Request, caller: CallerDep, ctx: ContextDep,
                   until_idle: bool = False) -> StreamingResponse:
    """Server-sent events for every job in the caller's scope (a ``job`` event whenever one
    changes; with ``until_idle``, ``end`` once none is unfinished, and the stream closes).
    Jobs of VMs that leave the caller's scope are no longer shown; ``revoked`` ends the stream
    when the caller's access does, ``expired`` after the streams' lifetime (docs/api.md)."""
    return streams.open_stream(request, caller.who,
                               lambda watch: _changes(ctx, watch, None, until_idle))


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses=schemas.EVENT_STREAM)
def job_events(job_id: str, request: Request, caller: CallerDep, ctx: ContextDep
               ) -> StreamingResponse:
    """Server-sent events for one job: a ``job`` event at each change of its status,
    progress or step (progress only grows), then ``end``; ``revoked`` when the caller may no
    longer see it, ``expired`` after the streams' lifetime."""
    first = _job(ctx, caller.who, job_id, "job.view")  # 404 / 403 before the stream starts
    return streams.open_stream(
        request, caller.who, lambda watch: _changes(ctx, watch, first["id"]),
        scope=lambda who: _job(ctx, who, first["id"], "job.view"))


@router.get("/jobs/{job_id}", response_model=schemas.Job)
def job_show(job_id: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    return _shown(caller.who, _job(ctx, caller.who, job_id, "job.view"))


@router.post("/jobs/{job_id}/cancel", response_model=schemas.Job)
def job_cancel(job_id: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """Ask a job to stop; a merge stopped mid-copy changes nothing anyone reads."""
    job = _job(ctx, caller.who, job_id, "job.cancel")
    return _shown(caller.who, jobs.cancel(ctx, job["id"]))
