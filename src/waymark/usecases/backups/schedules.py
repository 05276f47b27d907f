"""Backup schedules: ``backup schedule add|list|remove`` and ``backup run-due`` (cron, systemd
timers; ``waymark serve`` will run them too).

A due schedule is *claimed* in the catalog before it runs, by one UPDATE that succeeds only when
nobody holds it (or its holder's process is gone): two runners never run the same slot. After the
run, the next slot is the first one after *now*, so a runner that missed several slots runs once.
Each run backs up the schedule's VMs (one failing VM does not stop the others), then prunes the
repository with the schedule's retention. A run that fails, whatever the cause (a refusal, or a
defect: any exception, logged with its traceback), is recorded as the schedule's last result
(``error``) and releases its claim, so the next runner, or the same ``waymark serve``, carries on.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from waymark import process
from waymark.catalog import db
from waymark.catalog.models import Schedule
from waymark.engine import lookup
from waymark.engine.context import Context
from waymark.errors import Conflict, InvalidInput, NotFound, WaymarkError
from waymark.external.repository import Repository
from waymark.model import names, retention, timing
from waymark.model.timing import rfc3339
from waymark.model.vocabulary import DeleteAnswer, deleted, gone
from waymark.usecases.backups import points as backups

log = logging.getLogger(__name__)


def add(ctx: Context, name: str, vm_ids: list[str], repo_path: Path, every: str, at: str,
        day: int | None, full_every: int | None, keep: retention.Policy, *,
        replace: bool = False) -> dict[str, Any]:
    """A new schedule of the VMs with these ids (the face resolved what was typed; a run
    backs up exactly these VMs, whatever they are named then). ``replace``: this one, edited,
    in the same transaction; its next run is computed anew."""
    label = names.clean(name, what="schedule name")
    if every not in timing.EVERY:
        raise InvalidInput(f"unknown period {every!r}.", hint="Use --daily, --weekly or --monthly.")
    when = timing.parse_at(at)
    repo = Repository.open(repo_path)  # it must exist now, not at 2 a.m.
    with ctx.catalog.session() as session:
        vm_ids = [lookup.vm_by_id(session, vm_id).id for vm_id in vm_ids]
        existing = session.get(Schedule, label)
        if existing is not None and not replace:
            raise Conflict(f"a schedule named {label!r} exists.",
                           hint=f"Remove it first: waymark backup schedule remove {label}")
        if existing is None and replace:
            raise NotFound(f"no backup schedule named {label!r}.",
                           hint="List them: waymark backup schedule list")
        if existing is not None:
            session.delete(existing)
            session.flush()
        created = datetime.now(UTC)
        session.add(Schedule(
            name=label, vms=vm_ids, repo=str(repo.root), every=every, at=at, day=day,
            full_every=full_every, keep=keep.__dict__, created_at=created,
            next_due_at=timing.next_run(every, when, day, created)))
    return show(ctx, label)


def _describe(row: Schedule) -> dict[str, Any]:
    return {"name": row.name, "vm_ids": row.vms, "repository": row.repo, "every": row.every,
            "at": row.at, "day": row.day, "full_every": row.full_every, "keep": row.keep,
            "next_due_at": rfc3339(row.next_due_at),
            "last_run_at": rfc3339(row.last_run_at) if row.last_run_at else None,
            "last_result": _recorded(row.last_result),
            "running": process.alive(row.claimed_pid, row.claimed_start)}


RECORDED_BEFORE = {"schedule": "schedule_name", "vm": "vm_name", "point": "point_id"}


def _recorded(result: Any) -> Any:
    """A run's result as recorded, in today's vocabulary: an older Waymark recorded some keys
    under other names (:data:`RECORDED_BEFORE`)."""
    if not isinstance(result, dict):
        return result
    renamed = {RECORDED_BEFORE.get(k, k): v for k, v in result.items()}
    if isinstance(renamed.get("vms"), list):
        renamed["vms"] = [{RECORDED_BEFORE.get(k, k): v for k, v in o.items()}
                          if isinstance(o, dict) else o for o in renamed["vms"]]
    return renamed


def show(ctx: Context, name: str) -> dict[str, Any]:
    with ctx.catalog.session() as session:
        row = _named(session, name)
        return _describe(row)


def listing(ctx: Context) -> list[dict[str, Any]]:
    with ctx.catalog.session() as session:
        return [_describe(r) for r in session.scalars(select(Schedule).order_by(Schedule.name))]


def _named(session: Session, name: str) -> Schedule:
    return db.required(session, Schedule, name, f"no backup schedule named {name!r}.",
                       hint="List them: waymark backup schedule list")


def remove(ctx: Context, name: str) -> DeleteAnswer:
    with ctx.catalog.session() as session:
        row = _named(session, name)
        session.delete(row)
    return deleted(gone("schedule", name))


def _claim(ctx: Context, name: str, due: datetime) -> bool:
    """Take the due slot of a schedule; False when another live runner has it."""
    pid, start = process.identity()
    with ctx.catalog.session() as session:
        row = session.get(Schedule, name)
        if row is None or row.next_due_at != due:
            return False
        if row.claimed_pid is not None and process.alive(row.claimed_pid, row.claimed_start):
            return False
        done = session.execute(
            update(Schedule).where(Schedule.name == name, Schedule.next_due_at == due,
                                   or_(Schedule.claimed_pid.is_(None),
                                       Schedule.claimed_pid == row.claimed_pid))
            .values(claimed_pid=pid, claimed_start=start))
        return bool(getattr(done, "rowcount", 0) == 1)


def run_due(ctx: Context, report: backups.Report = None) -> list[dict[str, Any]]:
    """Run every schedule that is due; one entry per run, with each VM's outcome."""
    moment = datetime.now(UTC)
    with ctx.catalog.session() as session:
        due = [(r.name, r.next_due_at) for r in session.scalars(select(Schedule))
               if timing.utc(r.next_due_at) <= moment]
    return [_run_one(ctx, name, when, report) for name, when in due if _claim(ctx, name, when)]



def _run_one(ctx: Context, name: str, due: datetime, report: backups.Report) -> dict[str, Any]:
    """One claimed run. Whatever it raises becomes its recorded result and the claim is
    released: a scheduler (``waymark serve``'s thread) outlives any one run, and a slot is never
    left claimed by a runner that is still alive but no longer running it."""
    result: dict[str, Any] = {"schedule_name": name, "due_at": rfc3339(due), "vms": []}
    try:
        _back_up(ctx, name, result, report)
    except WaymarkError as err:
        result["error"] = err.message
    except Exception as err:  # a defect, not a refusal: logged with its traceback, recorded
        log.exception("backup schedule %s failed", name)
        result["error"] = f"unexpected error ({type(err).__name__}: {err}); see the log."
    _finish(ctx, name, result)
    return result


def _back_up(ctx: Context, name: str, result: dict[str, Any], report: backups.Report) -> None:
    """Back up the schedule's VMs, then prune with its retention; fills ``result`` in."""
    with ctx.catalog.session() as session:
        row = session.get_one(Schedule, name)
        _slot_after(row, datetime.now(UTC))  # a timing it cannot read fails before any backup
        vms, repo, keep = list(row.vms), Path(row.repo), retention.Policy(**row.keep)
        full_every = row.full_every
    outcomes = backups.run(ctx, vms, repo, report, full_every=full_every)
    with ctx.catalog.session() as session:
        names = {v: lookup.vm_name(session, v) for v in vms}
    result["vms"] = [{"vm_name": names.get(o.vm, o.vm), "vm_id": o.vm,
                      "point_id": o.point["id"] if o.point else None, "error": o.error}
                     for o in outcomes]
    if not keep.empty():
        result["pruned"] = [p["id"] for p in backups.prune(ctx, repo, keep)]


def _finish(ctx: Context, name: str, result: dict[str, Any]) -> None:
    """Record the run, release the claim, and set the next slot: the first after now, so a
    runner that missed several slots runs once."""
    finished = datetime.now(UTC)
    with ctx.catalog.session() as session:
        row = session.get(Schedule, name)
        if row is None:  # removed while it ran
            return
        row.last_run_at, row.last_result = finished, result
        row.claimed_pid = row.claimed_start = None
        try:
            row.next_due_at = _slot_after(row, finished)
        except Exception:  # the run failed on it before any backup: it stays due
            log.warning("backup schedule %s: its timing gives no next slot", name)


def _slot_after(row: Schedule, moment: datetime) -> datetime:
    return timing.next_run(row.every, timing.parse_at(row.at), row.day, moment)
