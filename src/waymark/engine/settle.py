"""Settling unfinished work: what dead commands left (pending intents, then any compaction they
started), finished by the next command that holds the VM's lock.

The composition root (:mod:`waymark.wiring`) hooks :func:`settle_all` into opening a
:class:`~waymark.engine.context.Context` and :func:`settle_vm` into taking a VM's lock, so the
engine's foundation never imports this module. Use cases call :func:`settle_vm` to finish their
own *commit, then finish* intents.
"""

from __future__ import annotations

import logging
import os

from waymark.engine import compaction, jobs, locks
from waymark.engine.context import Context
from waymark.errors import WaymarkError

log = logging.getLogger(__name__)


def settle_vm(ctx: Context, vm_id: str, report: compaction.Reporter | None = None, *,
              merge: bool = True) -> None:
    """Drive the VM's pending intents in order, then compact (as the VM's merge job, if it has
    one: see :func:`waymark.engine.compaction.compact_as_job`). The caller holds the VM lock.

    Also how an operation finishes its own *commit, then finish* intents (``report`` shows the
    compaction's progress; without ``merge`` the compaction is left to a job's worker).
    """
    if not ctx.journal.finish_pending(vm_id, skip=compaction.MARKER):
        return
    if merge:
        compaction.compact_if_marked(ctx, vm_id, report)


def settle_all(ctx: Context) -> None:
    """Settle every VM whose lock is free (a held lock means its command is alive), and
    restart the jobs whose worker died."""
    jobs.revive(ctx)
    for vm_id in sorted({intent.vm_id for intent in ctx.journal.pending()}):
        fd = locks.try_hold(ctx.home, vm_id)
        if fd is None:
            continue
        try:
            settle_vm(ctx, vm_id)
        except WaymarkError as err:
            log.warning("could not finish an interrupted operation on VM %s: %s", vm_id, err)
        finally:
            os.close(fd)
