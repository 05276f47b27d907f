"""Jobs: long operations (the merges a delete leaves, exports) with progress that any command can
list, wait for or cancel.

A job is a row of ``jobs``. The command that asks for one runs it and shows a progress bar; with
``--no-wait`` a detached worker does (``waymark job run ID``, in its own session so a closed
terminal does not stop it). The process running a job records its pid and start time (a recycled
pid is not it) and writes the progress at most every :data:`PROGRESS_EVERY` seconds.

This module knows no kind of job: the composition root (:mod:`waymark.wiring`) registers each
kind's runner (:func:`register`). Today's kinds:

- ``merge``: the compaction a delete left behind (:func:`waymark.engine.compaction.run`), run
  under the VM's lock (:func:`waymark.engine.settle.run_merge_job`). Its work is journaled like
  every compaction, so whoever holds the VM's lock next can carry it on: a merge job whose
  process died is *adopted* by the next command on that VM
  (:func:`waymark.engine.settle.compact_as_job`), which finishes it and completes the row.
  While a live process runs it, other commands leave the compaction to it.
- ``export``: a checkpoint written as a bundle (:func:`waymark.usecases.vms.bundles.run_export`).
  A dead worker's export is redone from scratch by a new worker (the partial bundle's files are
  removed first).

Cancelling sets ``cancel_requested``; the runner sees it at its next progress report and stops
(QEMU's block job is cancelled, qemu-img is killed). A merge stopped mid-copy changes no content
anyone reads, so its step is abandoned and the rest of the compaction waits for the next delete
or ``waymark check --repair``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from waymark import process
from waymark.catalog.models import Job, Vm
from waymark.engine.context import Context
from waymark.engine.journal import now
from waymark.engine.kinds import Kinds
from waymark.errors import Cancelled, NotFound, WaymarkError
from waymark.model import timing
from waymark.model.timing import rfc3339

log = logging.getLogger(__name__)

PROGRESS_EVERY = 0.1
UNFINISHED = ("queued", "running")
FINISHED = ("completed", "failed", "cancelled")
WORKERLESS_GRACE = 60.0  # a --no-wait command starts its worker within milliseconds
ORPHANED_NOTE = "nobody runs it; the next command on the VM carries it on"  # a job's note


# --- this process's own writes ----------------------------------------------------------------

class Changes:
    """This process's own writes to the jobs (a new job, its worker, claim, progress, end, a
    cancel request): each one is counted and wakes whoever :meth:`wait` s, so a reader in this
    process (the API's event streams, :class:`waymark.api.streams.JobFeed`) learns of them at
    once, without reading the catalog to find out. The catalog stays the truth, and other
    processes' writes (a CLI command, a job's worker) are not counted here: such a reader still
    looks at the catalog now and then (:meth:`waymark.catalog.db.Catalog.watch`)."""

    def __init__(self) -> None:
        self._written = threading.Condition()
        self.count = 0

    def notify(self) -> None:
        with self._written:
            self.count += 1
            self._written.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        """The count once it is no longer ``seen`` (at once if a write came since), or after
        ``timeout`` s."""
        with self._written:
            self._written.wait_for(lambda: self.count != seen, timeout)
            return self.count


CHANGES = Changes()


# --- processes --------------------------------------------------------------------------------

def worker_alive(job: Job) -> bool:
    return process.alive(job.worker_pid, job.worker_start)


def orphaned(job: Job) -> bool:
    """Unfinished with nobody running it: its process died, or (a ``--no-wait`` command killed
    before it started the worker) it never had one for :data:`WORKERLESS_GRACE` seconds."""
    if job.status not in UNFINISHED:
        return False
    if job.worker_pid is None:
        created = timing.utc(job.created_at)
        return (now() - created).total_seconds() > WORKERLESS_GRACE
    return not worker_alive(job)


def mine(job: Job) -> bool:
    return (job.worker_pid, job.worker_start) == process.identity()


# --- rows -------------------------------------------------------------------------------------

def submit(ctx: Context, vm_id: str | None, kind: str, params: dict[str, Any],
           *, run_here: bool, user: str) -> str:
    """A new queued job; ``run_here``: this process will run it (a waiting command); ``user``:
    who asked for it, for the task history (a Waymark user's name through the API or the
    portal, :func:`host_user` for the CLI)."""
    job_id = uuid.uuid4().hex
    pid, start = process.identity() if run_here else (None, None)
    with ctx.catalog.session() as session:
        session.add(Job(id=job_id, vm_id=vm_id, kind=kind, params=params, status="queued",
                        progress=0.0, worker_pid=pid, worker_start=start,
                        cancel_requested=False, created_at=now(), user=user[:99]))
    CHANGES.notify()
    return job_id


def _any_job(_job: Job) -> bool:
    return True


def find(session: Session, ref: str, visible: Callable[[Job], bool] = _any_job) -> Job:
    """A job by id or id prefix, among those ``visible`` accepts (an API caller's scope: a
    prefix never tells them about other jobs)."""
    rows = [j for j in session.scalars(select(Job).where(Job.id.startswith(ref.lower())))
            if visible(j)]
    if len(rows) != 1:
        problem = "no job" if not rows else f"{len(rows)} jobs"
        raise NotFound(f"{problem} with id {ref!r}.", hint="List them with: waymark job list")
    return rows[0]


def show(ctx: Context, ref: str, visible: Callable[[Job], bool] = _any_job) -> dict[str, Any]:
    with ctx.catalog.session() as session:
        return describe(session, find(session, ref, visible))


def describe(session: Session, job: Job) -> dict[str, Any]:
    vm_row = session.get(Vm, job.vm_id) if job.vm_id else None
    note = ORPHANED_NOTE if orphaned(job) else None
    return {"id": job.id, "kind": job.kind, "vm_id": job.vm_id,
            "vm_name": vm_row.name if vm_row else None, "status": job.status,
            "note": note, "progress": round(job.progress, 4), "step": job.step,
            "error": job.error, "result": job.result, "params": job.params,
            "created_at": rfc3339(job.created_at),
            "started_at": rfc3339(job.started_at) if job.started_at else None,
            "finished_at": rfc3339(job.finished_at) if job.finished_at else None,
            "duration_seconds": _duration(job), "user": job.user}


def _duration(job: Job) -> float | None:
    """Seconds from the job's start to its end; None until it ended (a description of an
    unfinished job stays the same while nothing about it changes: the event streams compare
    them)."""
    if job.started_at is None or job.finished_at is None:
        return None
    return round((timing.utc(job.finished_at) - timing.utc(job.started_at)).total_seconds(), 1)


def host_user() -> str:
    """Who runs a CLI command, as the task history names them: the host account and
    ``(host)``, e.g. ``root (host)`` (not a Waymark user: the CLI is the host's own face)."""
    try:
        name = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        name = f"uid {os.geteuid()}"
    return f"{name} (host)"


def history(ctx: Context, visible: Callable[[Job], bool], *, offset: int, limit: int
            ) -> tuple[list[dict[str, Any]], int]:
    """The task history: the jobs ``visible`` accepts, newest first, ``limit`` of them from
    ``offset``; and how many there are in all."""
    with ctx.catalog.session() as session:
        rows = [j for j in session.scalars(select(Job).order_by(Job.created_at.desc()))
                if visible(j)]
        return [describe(session, r) for r in rows[offset:offset + limit]], len(rows)


def listing(ctx: Context, vm_id: str | None = None, *, everything: bool = False
            ) -> list[dict[str, Any]]:
    """Unfinished jobs and the last finished ones (``everything``: all)."""
    with ctx.catalog.session() as session:
        query = select(Job).order_by(Job.created_at)
        if vm_id is not None:
            query = query.where(Job.vm_id == vm_id)
        rows = list(session.scalars(query))
        if not everything:
            done = [r for r in rows if r.status in FINISHED][-10:]
            rows = [r for r in rows if r.status in UNFINISHED or r in done]
        return [describe(session, r) for r in rows]


def vm_owners(ctx: Context) -> dict[str, str | None]:
    """Each VM's owner (what a caller's scope of jobs is decided by), in one query."""
    with ctx.catalog.session() as session:
        return {vm_id: owner for vm_id, owner in session.execute(select(Vm.id, Vm.owner_id))}


def holding(ctx: Context, vm_id: str) -> Job | None:
    """The unfinished job of a VM whose process is alive (the one that holds it busy)."""
    with ctx.catalog.session() as session:
        for job in session.scalars(select(Job).where(Job.vm_id == vm_id,
                                                     Job.status.in_(UNFINISHED))):
            if worker_alive(job):
                return job
    return None


def _update(ctx: Context, job_id: str, **fields: Any) -> None:
    with ctx.catalog.session() as session:
        job = session.get_one(Job, job_id)
        for key, value in fields.items():
            setattr(job, key, value)
    CHANGES.notify()


def record_worker(ctx: Context, job_id: str, pid: int, start: int | None) -> None:
    """Record the process that runs the job (its pid and start time)."""
    _update(ctx, job_id, worker_pid=pid, worker_start=start)


def _claim(ctx: Context, job_id: str) -> None:
    pid, start = process.identity()
    _update(ctx, job_id, status="running", worker_pid=pid, worker_start=start,
            started_at=now())


def finish(ctx: Context, job_id: str, status: str, *, error: str | None = None,
            result: dict[str, Any] | None = None) -> None:
    fields: dict[str, Any] = {"status": status, "error": error, "finished_at": now()}
    if status == "completed":
        fields["progress"] = 1.0
    if result is not None:
        fields["result"] = result
    _update(ctx, job_id, **fields)


class StepsReport(Protocol):
    """Progress of a job in steps: (step number from 1, steps planned, what, fraction of that
    step, and the bytes the step moves when known: a progress line shows bytes, rate and time
    left). ``what`` names the VM and its checkpoints, never image files."""

    def __call__(self, number: int, total: int, what: str, fraction: float,
                 size: int | None = None) -> None: ...


class Reporter:
    """Writes a running job's progress (throttled) and raises Cancelled when asked to stop."""

    def __init__(self, ctx: Context, job_id: str, echo: StepsReport | None = None) -> None:
        self.ctx, self.job_id, self.echo = ctx, job_id, echo
        self.last = 0.0

    def steps(self, number: int, total: int, what: str, fraction: float,
              size: int | None = None) -> None:
        if self.echo is not None:
            self.echo(number, total, what, fraction, size)
        self._write(((number - 1) + fraction) / max(total, 1), what, force=fraction in (0, 1))

    def fraction(self, what: str) -> Callable[[float], None]:
        return lambda fraction: self.steps(1, 1, what, fraction)

    def _write(self, progress: float, what: str, force: bool) -> None:
        moment = time.monotonic()
        if not force and moment - self.last < PROGRESS_EVERY:
            return
        self.last = moment
        with self.ctx.catalog.session() as session:
            job = session.get_one(Job, self.job_id)
            job.progress, job.step = max(job.progress, min(progress, 1.0)), what
            if job.cancel_requested:
                raise Cancelled(f"job {self.job_id[:12]} was cancelled.")
        CHANGES.notify()


@contextlib.contextmanager
def running(ctx: Context, job_id: str) -> Iterator[None]:
    """Claim the job for this process; record how it ended."""
    _claim(ctx, job_id)
    try:
        yield
    except Cancelled as err:
        finish(ctx, job_id, "cancelled", error=err.message)
        raise
    except WaymarkError as err:
        finish(ctx, job_id, "failed", error=err.message)
        raise


# --- kinds ------------------------------------------------------------------------------------

Runner = Callable[[Context, str], object]


@dataclass(frozen=True)
class Kind:
    """How a job of one kind runs (``run(ctx, job_id)``, in whichever process runs it), and
    whether a new worker restarts it when its worker died (``restart``; otherwise the next
    command on its VM adopts it, as a merge is)."""

    run: Runner
    restart: bool = False


_KINDS: Kinds[Kind] = Kinds("no runner is registered for jobs of kind {kind}.")


def register(kind: str, run: Runner, *, restart: bool = False) -> None:
    """Make the job ``kind`` known. Called by the composition root (:mod:`waymark.wiring`)."""
    _KINDS.register(kind, Kind(run, restart))


def kinds() -> frozenset[str]:
    return _KINDS.names()


def kind_of(kind: str) -> Kind:
    return _KINDS.of(kind)


# --- running, waiting, cancelling -------------------------------------------------------------

def run(ctx: Context, job_ref: str) -> dict[str, Any]:
    """``waymark job run``: the detached worker's body."""
    with ctx.catalog.session() as session:
        job = find(session, job_ref)
        job_id, kind, status = job.id, job.kind, job.status
    if status in UNFINISHED:
        with contextlib.suppress(Cancelled):
            kind_of(kind).run(ctx, job_id)
    return show(ctx, job_id)


def spawn(ctx: Context, job_id: str) -> None:
    """Hand the job to a detached ``waymark job run`` worker."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "waymark", "--home", str(ctx.home), "job", "run", job_id],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True)
    record_worker(ctx, job_id, worker.pid, process.start_time(worker.pid))


def revive(ctx: Context) -> None:
    """Exports whose worker died start again in a new worker (merges are adopted by the next
    command on their VM)."""
    restartable = [kind for kind, known in _KINDS.known.items() if known.restart]
    with ctx.catalog.session() as session:
        dead = [j.id for j in session.scalars(select(Job).where(
            Job.kind.in_(restartable), Job.status.in_(UNFINISHED))) if orphaned(j)]
    for job_id in dead:
        log.info("restarting job %s: its worker died", job_id)
        spawn(ctx, job_id)


def cancel(ctx: Context, job_ref: str) -> dict[str, Any]:
    with ctx.catalog.session() as session:
        job = find(session, job_ref)
        if job.status == "queued" and not worker_alive(job):
            job.status, job.finished_at = "cancelled", now()
        elif job.status in UNFINISHED:
            job.cancel_requested = True
        shown = describe(session, job)
    CHANGES.notify()
    return shown


def wait(ctx: Context, job_ref: str, on_progress: Callable[[dict[str, Any]], None] | None = None,
         timeout: float | None = None) -> dict[str, Any]:
    """Until the job ends (reporting each change of progress); its final description."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        _carry_on_if_orphaned(ctx, job_ref)
        shown = show(ctx, job_ref)
        if on_progress is not None:
            on_progress(shown)
        if shown["status"] in FINISHED:
            return shown
        if deadline is not None and time.monotonic() > deadline:
            return shown
        time.sleep(PROGRESS_EVERY)


def _carry_on_if_orphaned(ctx: Context, job_ref: str) -> None:
    """A job whose process died is carried on by the one waiting for it."""
    with ctx.catalog.session() as session:
        job = find(session, job_ref)
        orphan = orphaned(job)
        job_id, kind = job.id, job.kind
    if orphan:
        log.info("carrying on job %s: its process died", job_id)
        with contextlib.suppress(Cancelled):
            kind_of(kind).run(ctx, job_id)
