"""Keeping Now's chain shallow (:mod:`waymark.engine.consolidation`): turn it on or off per VM
(``vm set --consolidate``), consolidate now (``vm consolidate``), and the background
``consolidate`` job a command leaves when the chain grew deeper than the threshold."""

from __future__ import annotations

from typing import Any

from waymark.catalog.models import Job, Vm
from waymark.engine import consolidation, jobs
from waymark.engine.context import Context

KIND = "consolidate"
WORKER_LOCK_TIMEOUT = 600.0  # a background worker waits for the commands ahead of it


def set_enabled(ctx: Context, vm_id: str, enabled: bool) -> None:
    """Turn consolidation on or off for the VM; off unlinks it and deletes its files now."""
    with ctx.locked(vm_id):
        with ctx.catalog.session() as session:
            session.get_one(Vm, vm_id).consolidation = enabled
        if not enabled:
            consolidation.disable(ctx, vm_id)


def consolidate(ctx: Context, vm_id: str) -> list[dict[str, Any]]:
    """Consolidate the VM now (waiting for its lock): what was done to each disk."""
    with ctx.locked(vm_id):
        return [outcome.view() for outcome in consolidation.consolidate(ctx, vm_id)]


def run_job(ctx: Context, job_id: str) -> None:
    """The ``consolidate`` job's runner (a detached worker): the VM's lock, then
    :func:`waymark.engine.consolidation.consolidate`."""
    with ctx.catalog.session() as session:
        vm_id = session.get_one(Job, job_id).vm_id
        vm_row = session.get(Vm, vm_id) if vm_id is not None else None
        name = vm_row.name if vm_row is not None else None
    if vm_id is None or name is None:
        jobs.finish(ctx, job_id, "completed", result={"disks": []})
        return
    progress = jobs.Reporter(ctx, job_id).fraction(f"consolidating {name}")
    with jobs.running(ctx, job_id), ctx.vm_locked(vm_id, name, timeout=WORKER_LOCK_TIMEOUT):
        done = [o.view() for o in consolidation.consolidate(ctx, vm_id, progress)]
    jobs.finish(ctx, job_id, "completed", result={"disks": done})
