"""The composition root: the one place that plugs the use cases into the engine.

The engine (:mod:`waymark.engine`) never imports a use case. What it needs from above is
registered here, explicitly, once per process (:func:`wire`):

- every journal intent kind: its parameters' class, the catalog change that commits it and,
  for a live kind, the resolver recovery asks (:func:`waymark.engine.journal.register`); an
  intent of a kind not listed here is refused (:class:`waymark.errors.UnknownKind`), never
  committed blindly;
- the file steps done through a running QEMU (:func:`waymark.engine.executor.register_steps`);
- every job kind's runner (:func:`waymark.engine.jobs.register`);
- the hooks of a VM's power cycle (automatic checkpoints, :mod:`waymark.engine.running.power`);
- the context's hooks: settling unfinished work when a context opens and when a VM's lock is
  taken, and naming the job that holds a VM (:func:`waymark.engine.context.install`).

The faces open their context with :func:`open_context`. See docs/architecture.md.
"""

from __future__ import annotations

from typing import Any

from waymark.config import Settings
from waymark.engine import compaction, context, executor, jobs, journal, settle
from waymark.engine.context import Context
from waymark.engine.running import live_checkpoint, live_merge, power
from waymark.usecases.backups import points
from waymark.usecases.checkpoints import automatic, deletion, lifecycle
from waymark.usecases.library import store_deploy
from waymark.usecases.vms import definitions, export_job

# Every intent kind the code writes: its parameters' class (whose ``kind`` names it), the
# catalog change that commits it (None: the change was made in the transaction that wrote the
# intent, *commit, then finish*) and, for a live kind, how recovery settles it.
INTENT_KINDS: list[journal.Kind[Any]] = [
    # VMs
    journal.intent_kind(definitions.VmCreate, definitions.commit_vm_create),
    journal.intent_kind(definitions.DiskAdd, definitions.commit_disk_add),
    journal.intent_kind(definitions.VmDelete),
    # checkpoints
    journal.intent_kind(live_checkpoint.CheckpointCreate, lifecycle.commit_create,
                        live_checkpoint.resolve),
    journal.intent_kind(lifecycle.CheckpointApply, lifecycle.commit_apply),
    journal.intent_kind(lifecycle.SavedStateDiscard),
    journal.intent_kind(lifecycle.SavedStateInstall),
    journal.intent_kind(deletion.CheckpointFilesDelete),
    journal.intent_kind(automatic.AutomaticCheckpointDelete, automatic.commit_delete),
    # compaction (the marker, then one intent per planned step)
    journal.intent_kind(compaction.CompactMarker),
    journal.intent_kind(compaction.DropIntent, compaction.commit_drop),
    journal.intent_kind(compaction.CommitDownIntent, compaction.commit_down),
    journal.intent_kind(compaction.PullUpIntent, compaction.commit_pull_up),
    # backups
    journal.intent_kind(points.BackupRestore, points.commit_restore),
    # the library
    journal.intent_kind(store_deploy.VmStore, store_deploy.commit_store),
    journal.intent_kind(store_deploy.VmStoreFinish),
    journal.intent_kind(store_deploy.VmDeploy, store_deploy.commit_deploy),
    journal.intent_kind(store_deploy.VmDeployFinish),
]


def _holder(ctx: Context, vm_id: str) -> tuple[str, str, float] | None:
    job = jobs.holding(ctx, vm_id)
    return None if job is None else (job.id, job.kind, job.progress)


def wire() -> None:
    """Register every kind and hook (idempotent)."""
    for kind in INTENT_KINDS:
        journal.register(kind)
    executor.register_steps(live_merge.STEPS)
    jobs.register("merge", compaction.run_merge_job)
    jobs.register(export_job.KIND, export_job.run_export, restart=True)
    power.BOOT_HOOKS[:] = [automatic.before_boot]
    power.CLEAN_STOP_HOOKS[:] = [automatic.after_clean_stop]
    context.install(context.Hooks(opened=settle.settle_all, locked=settle.settle_vm,
                                  holder=_holder))


def open_context(settings: Settings) -> Context:
    """The context the faces (and tests) work in: the engine wired, then opened."""
    wire()
    return Context.open(settings)
