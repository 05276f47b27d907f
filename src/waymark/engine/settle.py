"""Finish what dead commands left: pending intents, then any compaction they started."""

from __future__ import annotations

import logging
import os

from waymark.engine import compaction as compact
from waymark.engine import jobs, locks
from waymark.engine.context import Context
from waymark.errors import WaymarkError

log = logging.getLogger(__name__)


def recover_vm(ctx: Context, vm_id: str, report: compact.Reporter | None = None, *,
               merge: bool = True) -> None:
    """Drive the VM's pending intents in order, then compact (as the VM's merge job, if it has
    one: see :func:`waymark.engine.jobs.compact_vm`). The caller holds the VM lock.

    Also how an operation finishes its own *commit, then finish* intents (``report`` shows the
    compaction's progress; without ``merge`` the compaction is left to a job's worker).
    """
    pending = ctx.journal.pending(vm_id)
    if not pending:
        return
    for intent in pending:
        if intent.kind != compact.MARKER:
            log.info("finishing %s (journal intent %s)", intent.kind, intent.id)
            ctx.journal.finish(intent)
    # re-read: a commit driven just now may have left a compaction marker of its own
    if merge and any(intent.kind == compact.MARKER for intent in ctx.journal.pending(vm_id)):
        jobs.compact_vm(ctx, vm_id, report)


def recover_all(ctx: Context) -> None:
    """Recover every VM whose lock is free (a held lock means its command is alive), and
    restart the exports whose worker died."""
    jobs.revive(ctx)
    for vm_id in sorted({intent.vm_id for intent in ctx.journal.pending()}):
        fd = locks.try_hold(ctx.home, vm_id)
        if fd is None:
            continue
        try:
            recover_vm(ctx, vm_id)
        except WaymarkError as err:
            log.warning("could not finish an interrupted operation on VM %s: %s", vm_id, err)
        finally:
            os.close(fd)
