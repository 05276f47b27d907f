"""Jobs in a caller's scope: the jobs of the VMs they may see (jobs of no VM are
administrators'), for the API and the portal."""

from __future__ import annotations

from typing import Any

from waymark.catalog.models import Vm
from waymark.engine import jobs
from waymark.engine.context import Context
from waymark.model import policy
from waymark.model.policy import Principal


def owners(ctx: Context) -> dict[str, str | None]:
    """Each VM's owner."""
    with ctx.catalog.session() as session:
        return {v.id: v.owner_id for v in session.query(Vm)}


def visible(who: Principal, vm_id: str | None, owners: dict[str, str | None]) -> bool:
    """Whether the caller may see a job of ``vm_id`` (jobs of no VM are administrators')."""
    return who.admin or (vm_id in owners and policy.in_scope(who, vm_id, owners[vm_id]))


def job_list_for(ctx: Context, who: Principal, everything: bool) -> list[dict[str, Any]]:
    return in_scope(who, jobs.listing(ctx, everything=everything), owners(ctx))


def in_scope(who: Principal, listed: list[dict[str, Any]], owners: dict[str, str | None]
             ) -> list[dict[str, Any]]:
    """The jobs of ``listed`` the caller may see (``owners``: each VM's owner)."""
    return [j for j in listed if visible(who, j["vm_id"], owners)]


def history_for(ctx: Context, who: Principal, *, offset: int, limit: int
                ) -> tuple[list[dict[str, Any]], int]:
    """The task history the caller may see (their VMs' jobs; an administrator: every job),
    newest first, one page of it; and how many jobs it holds."""
    known = owners(ctx)
    return jobs.history(ctx, lambda job: visible(who, job.vm_id, known),
                        offset=offset, limit=limit)
