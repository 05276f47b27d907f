"""The composition root: the one place that plugs the use cases into the engine.

The engine (:mod:`waymark.engine`) never imports a use case. What it needs from above is
registered here, explicitly, once per process (:func:`wire`):

- every journal intent kind, with the catalog change that commits it and, for a live kind, the
  resolver recovery asks (:func:`waymark.engine.journal.register`); an intent of a kind not
  listed here is refused (:class:`waymark.errors.UnknownKind`), never committed blindly;
- the file steps done through a running QEMU (:func:`waymark.engine.executor.register_steps`);
- every job kind's runner (:func:`waymark.engine.jobs.register`);
- the hooks of a VM's power cycle (automatic checkpoints, :mod:`waymark.engine.running.power`);
- the context's hooks: settling unfinished work when a context opens and when a VM's lock is
  taken, and naming the job that holds a VM (:func:`waymark.engine.context.install`).

The faces open their context with :func:`open_context`. See docs/architecture.md.
"""

from __future__ import annotations

from waymark.config import Settings
from waymark.engine import compaction, context, executor, jobs, journal, settle
from waymark.engine.context import Context
from waymark.engine.running import live_checkpoint, live_merge, power
from waymark.usecases.backups import points
from waymark.usecases.checkpoints import automatic, deletion, lifecycle
from waymark.usecases.library import store_deploy
from waymark.usecases.vms import definitions, export_job

# Every intent kind the code writes, and the catalog change that commits it (None: the change
# was made in the transaction that wrote the intent: *commit, then finish*).
INTENT_KINDS: dict[str, journal.CommitFn | None] = {
    # VMs
    "vm_create": definitions.commit_vm_create,
    "disk_add": definitions.commit_disk_add,
    "vm_delete": None,
    # checkpoints
    "checkpoint_create": lifecycle.commit_create,
    "checkpoint_apply": lifecycle.commit_apply,
    "saved_state_discard": None,
    "saved_state_install": None,
    deletion.FILES_KIND: None,
    automatic.KIND: automatic.commit_delete,
    # compaction (the marker, then one intent per planned step)
    compaction.MARKER: None,
    "drop": compaction.commit_drop,
    "commit_down": compaction.commit_down,
    "pull_up": compaction.commit_pull_up,
    # backups
    "backup_restore": points.commit_restore,
    # the library
    "vm_store": store_deploy.commit_store,
    "vm_store_finish": None,
    "vm_deploy": store_deploy.commit_deploy,
    "vm_deploy_finish": None,
}
# Live intent kinds: how recovery settles one whose file steps were done
RESOLVERS: dict[str, journal.ResolveFn] = {"checkpoint_create": live_checkpoint.resolve}


def _holder(ctx: Context, vm_id: str) -> tuple[str, str, float] | None:
    job = jobs.holding(ctx, vm_id)
    return None if job is None else (job.id, job.kind, job.progress)


def wire() -> None:
    """Register every kind and hook (idempotent)."""
    for kind, commit in INTENT_KINDS.items():
        journal.register(kind, commit, resolve=RESOLVERS.get(kind))
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
