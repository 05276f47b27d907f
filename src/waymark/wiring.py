"""The composition root: the one place that plugs the use cases into the engine.

The engine (:mod:`waymark.engine`) never imports a use case. What it needs from above is
registered here, explicitly, once per process (:func:`wire`):

- every journal intent kind: its parameters' class, the catalog change that commits it and,
  for a live kind, the resolver recovery asks (:func:`waymark.engine.journal.register`); an
  intent of a kind not listed here is refused (:class:`waymark.errors.UnknownKind`), never
  committed blindly;
- the file steps done through a running QEMU (:func:`waymark.engine.executor.register_steps`);
- every job kind's runner (:func:`waymark.engine.jobs.register`);
- the context's hooks: settling unfinished work when a context opens and when a VM's lock is
  taken, naming the job that holds a VM, and a VM's power cycle (automatic checkpoints before a
  boot and after a clean shutdown, :mod:`waymark.engine.running.power`)
  (:func:`waymark.engine.context.install`).

A use case's function is registered as a :class:`Deferred` reference (its module's name and
the function's), and its module is imported the first time that function is called: when a job
of its kind runs, a VM boots or stops. A use case's intent kind is registered by name with a
loader (:func:`_deferred_kind`) that imports its module when the journal first needs the kind's
parameters class or commit: when an intent of it is written, read back or settled. Every
face opens its context here, so importing every use case module up front would make a command
that needs none of them (``waymark checkpoint list``, ``waymark job list``) load them all
(docs/architecture.md, "Lazy imports"). Kinds are still registered by name up front: an
unknown kind is refused before anything is imported.

The faces open their context with :func:`open_context`. See docs/architecture.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast

from sqlalchemy.orm import Session

from waymark.config import Settings
from waymark.engine import compaction, consolidation, context, executor, jobs, journal, settle
from waymark.engine.context import Context
from waymark.engine.running import live_consolidation, live_merge

if TYPE_CHECKING:  # its module is imported when the journal first needs the kind
    from waymark.engine.running import live_checkpoint

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
DELETION = "waymark.usecases.checkpoints.deletion"
LIVE_CHECKPOINT = "waymark.engine.running.live_checkpoint"
BACKUPS = "waymark.usecases.backups.points"
LIBRARY = "waymark.usecases.library.store_deploy"
CHAINS = "waymark.usecases.vms.chains"


def _deferred_kind(module: str, params: str, commit: str | None = None) -> journal.KindLoader:
    """The intent kind whose parameters' class is ``module``'s ``params`` and whose catalog
    change is its ``commit`` (None: *commit, then finish*), the module imported when first
    needed (``tests/unit/test_wiring.py`` loads every kind and checks both)."""
    def load() -> journal.Kind[Any]:
        found = importlib.import_module(module)
        return journal.intent_kind(getattr(found, params),
                                   getattr(found, commit) if commit else None)
    return load


def _loaded(kind: journal.Kind[Any]) -> tuple[str, journal.KindLoader]:
    """An engine's own intent kind (or one whose parameters the engine defines)."""
    return kind.params.kind, lambda: kind


def _checkpoint_create() -> journal.Kind[Any]:
    """A checkpoint's kind: its parameters and the resolver of a live one are the engine's
    (:mod:`waymark.engine.running.live_checkpoint`), its commit the checkpoint use case's; all
    imported when the journal first needs the kind, so a listing loads no code of a running VM."""
    live = importlib.import_module(LIVE_CHECKPOINT)
    return journal.intent_kind(live.CheckpointCreate, COMMIT_CHECKPOINT, live.resolve)


COMMIT_CHECKPOINT: Deferred[[Session, live_checkpoint.CheckpointCreate], None] = Deferred(
    CHECKPOINTS, "commit_create")

# Every intent kind the code writes, by name: its parameters' class (whose ``kind`` is that
# name), the catalog change that commits it (None: the change was made in the transaction that
# wrote the intent, *commit, then finish*) and, for a live kind, how recovery settles it.
INTENT_KINDS: dict[str, journal.KindLoader] = dict([
    # VMs
    ("vm_create", _deferred_kind(VMS, "VmCreate", "commit_vm_create")),
    ("disk_add", _deferred_kind(VMS, "DiskAdd", "commit_disk_add")),
    ("vm_delete", _deferred_kind(VMS, "VmDelete")),
    # checkpoints
    ("checkpoint_create", _checkpoint_create),
    ("checkpoint_apply", _deferred_kind(CHECKPOINTS, "CheckpointApply", "commit_apply")),
    ("saved_state_discard", _deferred_kind(CHECKPOINTS, "SavedStateDiscard")),
    ("saved_state_install", _deferred_kind(CHECKPOINTS, "SavedStateInstall")),
    ("tpm_state_install", _deferred_kind(CHECKPOINTS, "TpmStateInstall")),
    ("checkpoint_files_delete", _deferred_kind(DELETION, "CheckpointFilesDelete")),
    ("automatic_checkpoint_delete",
     _deferred_kind(AUTOMATIC, "AutomaticCheckpointDelete", "commit_delete")),
    # compaction (the marker, then one intent per planned step)
    _loaded(journal.intent_kind(compaction.CompactMarker)),
    _loaded(journal.intent_kind(compaction.DropIntent, compaction.commit_drop)),
    _loaded(journal.intent_kind(compaction.CommitDownIntent, compaction.commit_down)),
    _loaded(journal.intent_kind(compaction.PullUpIntent, compaction.commit_pull_up)),
    # backups
    ("backup_restore", _deferred_kind(BACKUPS, "BackupRestore", "commit_restore")),
    # the library
    ("vm_store", _deferred_kind(LIBRARY, "VmStore", "commit_store")),
    ("vm_store_finish", _deferred_kind(LIBRARY, "VmStoreFinish")),
    ("vm_deploy", _deferred_kind(LIBRARY, "VmDeploy", "commit_deploy")),
    ("vm_deploy_finish", _deferred_kind(LIBRARY, "VmDeployFinish")),
    # consolidation (Now's chain kept shallow)
    *(_loaded(kind) for kind in consolidation.KINDS),
])
# Every job kind ("export": export_job.KIND) and its runner; an export whose worker died
# restarts in a new worker, a merge is adopted by the next command on its VM
RUN_EXPORT: Deferred[[Context, str], object] = Deferred(EXPORT, "run_export")
RUN_CONSOLIDATE: Deferred[[Context, str], None] = Deferred(CHAINS, "run_job")
JOB_KINDS: dict[str, jobs.Runner] = {"merge": compaction.run_merge_job, "export": RUN_EXPORT,
                                     consolidation.JOB: RUN_CONSOLIDATE}
RESTARTED_JOBS = frozenset({"export"})
BOOT_HOOK: Deferred[[Context, str], str | None] = Deferred(AUTOMATIC, "before_boot")
CLEAN_STOP_HOOK: Deferred[[Context, str], None] = Deferred(AUTOMATIC, "after_clean_stop")


def _before_boot(ctx: Context, vm_id: str) -> str | None:
    """A VM boots on its real chains (the consolidation job links it live right after the
    start), then automatic checkpoints' hook."""
    consolidation.unlink(ctx.journal, vm_id)
    return BOOT_HOOK(ctx, vm_id)


def _holder(ctx: Context, vm_id: str) -> tuple[str, str, float] | None:
    job = jobs.holding(ctx, vm_id)
    return None if job is None else (job.id, job.kind, job.progress)


def wire() -> None:
    """Register every kind and hook (idempotent)."""
    for name, load in INTENT_KINDS.items():
        journal.register_deferred(name, load)
    executor.register_steps(live_merge.STEPS)
    executor.register_steps(live_consolidation.STEPS)
    journal.BEFORE_INTENT[:] = [consolidation.before_intent]
    for kind, run in JOB_KINDS.items():
        jobs.register(kind, run, restart=kind in RESTARTED_JOBS)
    context.install(context.Hooks(opened=settle.settle_all, locked=settle.settle_vm,
                                  holder=_holder, before_boot=_before_boot,
                                  after_clean_stop=CLEAN_STOP_HOOK,
                                  released=consolidation.schedule))


def open_context(settings: Settings) -> Context:
    """The context the faces (and tests) work in: the engine wired, then opened."""
    wire()
    return Context.open(settings)
