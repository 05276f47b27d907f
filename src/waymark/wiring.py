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

A use case's function is registered as a :class:`Deferred` reference (its module's name and
the function's), and its module is imported the first time that function is called: when an
intent of its kind commits or is settled, a job of its kind runs, a VM boots or stops. Every
face opens its context here, so importing every use case module up front would make a command
that needs none of them (``waymark checkpoint list``, ``waymark job list``) load them all
(docs/architecture.md, "Lazy imports"). Kinds are still registered by name up front: an
unknown kind is refused before anything is imported.

The faces open their context with :func:`open_context`. See docs/architecture.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar, cast

from sqlalchemy.orm import Session

from waymark.config import Settings
from waymark.engine import compaction, context, executor, jobs, journal, settle
from waymark.engine.context import Context
from waymark.engine.running import live_checkpoint, live_merge, power

P = ParamSpec("P")
R = TypeVar("R")


class Deferred(Generic[P, R]):
    """``module.name``, a use case's function, imported when it is first called. The one
    import done by name in ``src/`` outside the CLI's lazy loading (``tests/unit/
    test_wiring.py`` resolves every reference and checks its parameters)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def target(self) -> Callable[P, R]:
        """The function itself (its module imported now, once per process)."""
        found = getattr(importlib.import_module(self.module), self.name)
        assert callable(found), f"{self.module}.{self.name} is not a function"
        return cast("Callable[P, R]", found)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.target()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Deferred({self.module}.{self.name})"


# The use case modules the root plugs in, imported only when one of their functions is called
VMS = "waymark.usecases.vms.definitions"
EXPORT = "waymark.usecases.vms.export_job"
CHECKPOINTS = "waymark.usecases.checkpoints.lifecycle"
AUTOMATIC = "waymark.usecases.checkpoints.automatic"
BACKUPS = "waymark.usecases.backups.points"
LIBRARY = "waymark.usecases.library.store_deploy"


def _commit(module: str, name: str) -> journal.CommitFn:
    commit: Deferred[[Session, dict[str, Any]], None] = Deferred(module, name)
    return commit


# Every intent kind the code writes, and the catalog change that commits it (None: the change
# was made in the transaction that wrote the intent: *commit, then finish*).
INTENT_KINDS: dict[str, journal.CommitFn | None] = {
    # VMs
    "vm_create": _commit(VMS, "commit_vm_create"),
    "disk_add": _commit(VMS, "commit_disk_add"),
    "vm_delete": None,
    # checkpoints
    "checkpoint_create": _commit(CHECKPOINTS, "commit_create"),
    "checkpoint_apply": _commit(CHECKPOINTS, "commit_apply"),
    "saved_state_discard": None,
    "saved_state_install": None,
    "checkpoint_files_delete": None,  # deletion.FILES_KIND
    "automatic_checkpoint_delete": _commit(AUTOMATIC, "commit_delete"),  # automatic.KIND
    # compaction (the marker, then one intent per planned step)
    compaction.MARKER: None,
    "drop": compaction.commit_drop,
    "commit_down": compaction.commit_down,
    "pull_up": compaction.commit_pull_up,
    # backups
    "backup_restore": _commit(BACKUPS, "commit_restore"),
    # the library
    "vm_store": _commit(LIBRARY, "commit_store"),
    "vm_store_finish": None,
    "vm_deploy": _commit(LIBRARY, "commit_deploy"),
    "vm_deploy_finish": None,
}
# Live intent kinds: how recovery settles one whose file steps were done
RESOLVERS: dict[str, journal.ResolveFn] = {"checkpoint_create": live_checkpoint.resolve}
# Every job kind ("export": export_job.KIND) and its runner; an export whose worker died
# restarts in a new worker, a merge is adopted by the next command on its VM
RUN_EXPORT: Deferred[[Context, str], object] = Deferred(EXPORT, "run_export")
JOB_KINDS: dict[str, jobs.Runner] = {"merge": compaction.run_merge_job, "export": RUN_EXPORT}
RESTARTED_JOBS = frozenset({"export"})
BOOT_HOOK: Deferred[[Context, str], str | None] = Deferred(AUTOMATIC, "before_boot")
CLEAN_STOP_HOOK: Deferred[[Context, str], None] = Deferred(AUTOMATIC, "after_clean_stop")


def _holder(ctx: Context, vm_id: str) -> tuple[str, str, float] | None:
    job = jobs.holding(ctx, vm_id)
    return None if job is None else (job.id, job.kind, job.progress)


def wire() -> None:
    """Register every kind and hook (idempotent)."""
    for kind, commit in INTENT_KINDS.items():
        journal.register(kind, commit, resolve=RESOLVERS.get(kind))
    executor.register_steps(live_merge.STEPS)
    for kind, run in JOB_KINDS.items():
        jobs.register(kind, run, restart=kind in RESTARTED_JOBS)
    power.BOOT_HOOKS[:] = [BOOT_HOOK]
    power.CLEAN_STOP_HOOKS[:] = [CLEAN_STOP_HOOK]
    context.install(context.Hooks(opened=settle.settle_all, locked=settle.settle_vm,
                                  holder=_holder))


def open_context(settings: Settings) -> Context:
    """The context the faces (and tests) work in: the engine wired, then opened."""
    wire()
    return Context.open(settings)
