"""``waymark job``: long operations (merges, exports) with their progress."""

from __future__ import annotations

from typing import Any

import click

from waymark.cli.main import face
from waymark.cli.output import StepProgress, emit, json_option
from waymark.engine import jobs
from waymark.errors import Cancelled, WaymarkError


@click.group()
def job() -> None:
    """Long operations: merges after a delete, exports."""


def _status(d: dict[str, Any]) -> str:
    """The job's status, with its note (nobody runs it) when it has one."""
    return f"{d['status']} ({d['note']})" if d["note"] else str(d["status"])


def _line(d: dict[str, Any]) -> str:
    where = f"  {d['vm_name']}" if d["vm_name"] else ""
    step = f"  {d['step']}" if d["step"] and d["status"] in jobs.UNFINISHED else ""
    return f"{d['id'][:12]}  {d['kind']:<7} {_status(d):<10} {d['progress']:>5.0%}{where}{step}"


def _of_vm(rows: list[dict[str, Any]], ref: str) -> list[dict[str, Any]]:
    """The jobs of the VM ``ref`` names, in the order of :func:`waymark.engine.lookup.vm`: a
    full id, else a name, else an id prefix."""
    for key, matches in (("vm_id", ref.__eq__), ("vm_name", ref.__eq__),
                         ("vm_id", lambda value: value.startswith(ref))):
        chosen = [r for r in rows if r[key] is not None and matches(r[key])]
        if chosen:
            return chosen
    return []


@job.command("list")
@click.option("--vm", "vm_ref", metavar="VM", help="Only this VM's jobs.")
@click.option("--all", "everything", is_flag=True, help="Every finished job too.")
@json_option
def list_(vm_ref: str | None, everything: bool, as_json: bool) -> None:
    """Unfinished jobs and the last finished ones."""
    remote = face().remote
    if remote is not None:
        rows = remote.job_list(everything)
        rows = rows if vm_ref is None else _of_vm(rows, vm_ref)
    else:
        vm_id = face().vm_id(vm_ref) if vm_ref is not None else None
        rows = jobs.listing(face().ctx, vm_id, everything=everything)
    emit(as_json, rows, [_line(r) for r in rows] or ["No jobs."])


@job.command("show")
@click.argument("job_ref", metavar="JOB")
@json_option
def show(job_ref: str, as_json: bool) -> None:
    """One job: its kind, state, progress and result."""
    remote = face().remote
    d = remote.job_show(job_ref) if remote is not None else jobs.show(face().ctx, job_ref)
    lines = [f"Job {d['id']}  ({d['kind']}{', VM ' + d['vm_name'] if d['vm_name'] else ''})",
             f"  status: {_status(d)}   progress: {d['progress']:.0%}   step: {d['step'] or '-'}",
             f"  created: {d['created_at']}   started: {d['started_at'] or '-'}   "
             f"finished: {d['finished_at'] or '-'}",
             f"  started by: {d.get('user') or '-'}   duration: "
             f"{'-' if d.get('duration_seconds') is None else str(d['duration_seconds']) + ' s'}"]
    if d["error"]:
        lines.append(f"  error: {d['error']}")
    emit(as_json, d, lines)


def follow(job_id: str, plain: bool = False) -> dict[str, Any]:
    """Wait for a job (here, or on the --server) with a progress bar (``plain``: lines, as
    for ``--json``); its final description."""
    bar = StepProgress(plain)

    def draw(d: dict[str, Any]) -> None:
        if d["status"] == "running":
            bar(1, 1, d["step"] or d["kind"], min(d["progress"], 0.999))

    remote = face().remote
    done = remote.job_wait(job_id, draw) if remote is not None \
        else jobs.wait(face().ctx, job_id, draw)
    if done["status"] == "completed":
        bar(1, 1, done["step"] or done["kind"], 1.0)
    return done


def ended(d: dict[str, Any]) -> None:
    """Exit like the job ended: its error when it failed or was cancelled."""
    if d["status"] == "cancelled":
        raise Cancelled(f"job {d['id'][:12]} was cancelled.",
                        hint="Every checkpoint is as it was; merges left undone wait for the "
                             "next delete or: waymark check --repair")
    if d["status"] == "failed":
        raise WaymarkError(f"job {d['id'][:12]} failed: {d['error']}",
                           hint=f"See: waymark job show {d['id'][:12]}")


@job.command("wait")
@click.argument("job_ref", metavar="JOB")
@json_option
def wait(job_ref: str, as_json: bool) -> None:
    """Wait for a job to end, with its progress (carries on a job whose process died)."""
    d = follow(job_ref, plain=as_json)
    emit(as_json, d, [f"Job {d['id'][:12]} {d['status']}."])
    ended(d)


@job.command("cancel")
@click.argument("job_ref", metavar="JOB")
@json_option
def cancel(job_ref: str, as_json: bool) -> None:
    """Stop a job: a merge stops mid-copy without changing any checkpoint."""
    remote = face().remote
    d = remote.job_cancel(job_ref) if remote is not None else jobs.cancel(face().ctx, job_ref)
    emit(as_json, d, [f"Job {d['id'][:12]}: cancel requested ({d['status']})."])


@job.command("run", hidden=True)
@click.argument("job_ref", metavar="JOB")
@json_option
def run(job_ref: str, as_json: bool) -> None:
    """The detached worker of a --no-wait job."""
    d = jobs.run(face().ctx, job_ref)
    emit(as_json, d, [f"Job {d['id'][:12]} {d['status']}."])
    ended(d)
