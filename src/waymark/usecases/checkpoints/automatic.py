"""Automatic checkpoints (Hyper-V's ``AutomaticCheckpointsEnabled``): a checkpoint at each start
of a VM that is off, deleted after a clean shutdown, kept after a crash or a forced power-off
(then it is the way back to how the VM was before that run).

Hooked into :mod:`waymark.engine.running.power`: :func:`before_boot` runs under the VM's lock
before QEMU
starts; :func:`after_clean_stop` runs wherever a clean shutdown is noticed, which may be a
command that does not hold the lock (``vm status`` noticing a guest that powered itself off). So
the deletion is journaled as an intent with no file steps, whose commit removes the checkpoint
from the tree like ``checkpoint delete`` does; the next command holding the lock drives it (and
the merges it leaves), at once when the caller holds the lock.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from sqlalchemy.orm import Session

from waymark.catalog.models import Checkpoint, Vm
from waymark.engine import journal, lookup
from waymark.engine.context import Context
from waymark.engine.journal import now
from waymark.engine.params import Params
from waymark.errors import Conflict
from waymark.model import tree
from waymark.usecases.checkpoints import deletion
from waymark.usecases.checkpoints import lifecycle as checkpoints

log = logging.getLogger(__name__)


class AutomaticCheckpointDelete(Params, frozen=True, kw_only=True):
    """The guest shut down cleanly: VM ``vm``'s automatic ``checkpoint`` goes."""

    kind: ClassVar[str] = "automatic_checkpoint_delete"
    vm: str
    checkpoint: str


def before_boot(ctx: Context, vm_id: str) -> str | None:
    """Take the automatic checkpoint of a VM about to boot; a warning when it is skipped."""
    with ctx.catalog.session() as session:
        vm_row = session.get_one(Vm, vm_id)
        if not vm_row.automatic_checkpoints:
            return None
        # one from an earlier run that was kept (a crash, a forced stop) is the user's now
        vm_row.automatic_checkpoint_id = None
        name, count, limit = vm_row.name, lookup.checkpoint_count(session, vm_id), \
            vm_row.max_checkpoints
        disabled = vm_row.checkpoint_type == "disabled"
    if disabled:
        return (f"no automatic checkpoint of {name!r}: its checkpoint type is disabled "
                f"(waymark vm set {name} --checkpoint-type production)")
    if count >= limit:
        return (f"no automatic checkpoint of {name!r}: it has {count} checkpoints, its limit "
                f"(waymark vm set {name} --max-checkpoints N, or delete some)")
    label = f"Automatic Checkpoint - {tree.default_name(name, now())}"
    try:
        checkpoint_id = checkpoints.create_locked(ctx, vm_id, label[:99], None)
    except Conflict as err:
        return f"no automatic checkpoint of {name!r}: {err.message}"
    with ctx.catalog.session() as session:
        session.get_one(Vm, vm_id).automatic_checkpoint_id = checkpoint_id
    return None


def after_clean_stop(ctx: Context, vm_id: str) -> None:
    """The guest shut down cleanly: its automatic checkpoint is no longer needed."""
    with ctx.catalog.session() as session:
        vm_row = session.get_one(Vm, vm_id)
        if vm_row.automatic_checkpoint_id is None:
            return
        journal.add(session, vm_id, AutomaticCheckpointDelete(
            vm=vm_id, checkpoint=vm_row.automatic_checkpoint_id), [])


def commit_delete(session: Session, params: AutomaticCheckpointDelete) -> None:
    vm_row = session.get(Vm, params.vm)
    if vm_row is None:
        return
    if vm_row.automatic_checkpoint_id == params.checkpoint:
        vm_row.automatic_checkpoint_id = None
    row = session.get(Checkpoint, params.checkpoint)
    if row is not None and row.vm_id == vm_row.id:  # deleted by hand meanwhile: nothing to do
        log.info("deleting automatic checkpoint %s of %s", row.name, vm_row.name)
        deletion.remove_from_tree(session, vm_row, [row.id], subtree=False)

