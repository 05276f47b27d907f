"""The ``export`` job: a checkpoint written as a standalone bundle (:mod:`.bundles`), with
progress, cancel and a restart from scratch when its worker dies (the generic job machinery is
:mod:`waymark.engine.jobs`; the composition root registers :func:`run_export` as this kind's
runner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from waymark.catalog.models import Checkpoint, Job
from waymark.engine import jobs, lookup
from waymark.engine.context import Context
from waymark.errors import Cancelled
from waymark.usecases.vms import bundles

KIND = "export"


def submit_export(ctx: Context, vm_id: str, ckpt_ref: str, dest: Path, *,
                  run_here: bool, user: str) -> str:
    """An export job, once the VM, the checkpoint and the empty destination are known good."""
    with ctx.catalog.session() as session:
        vm_row = lookup.vm_by_id(session, vm_id)
        checkpoint_id = lookup.checkpoint(session, vm_row, ckpt_ref).id
    bundles.require_empty(dest)
    return jobs.submit(ctx, vm_id, KIND, {"vm_id": vm_id, "checkpoint_id": checkpoint_id,
                                          "dest": str(dest)}, run_here=run_here, user=user)


def run_export(ctx: Context, job_id: str, echo: jobs.StepsReport | None = None
               ) -> dict[str, Any]:
    """Run the export job here; the bundle's manifest. Its step (and ``echo``'s line) names the
    VM and the checkpoint: ``Exporting checkpoint 'X' of VM Y``."""
    with ctx.catalog.session() as session:
        params = dict(session.get_one(Job, job_id).params)
        checkpoint = session.get(Checkpoint, params["checkpoint_id"])
        what = (f"Exporting checkpoint {checkpoint.name if checkpoint else '?'!r} of VM "
                f"{lookup.vm_name(session, params['vm_id'])}")
    dest = Path(params["dest"])
    bundles.remove_partial(dest)  # a dead worker's half-written bundle
    reporter = jobs.Reporter(ctx, job_id, echo)
    progress = reporter.fraction(what)

    with jobs.running(ctx, job_id):
        try:
            manifest = bundles.export(ctx, params["vm_id"], params["checkpoint_id"], dest,
                                      on_progress=progress)
        except Cancelled:
            bundles.remove_partial(dest)
            raise
    jobs.finish(ctx, job_id, "completed", result={"bundle": str(dest)})
    return manifest
