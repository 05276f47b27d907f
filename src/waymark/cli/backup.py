"""``waymark backup``: backups to a repository on external storage (docs/backups.md)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from waymark.cli.main import face
from waymark.cli.output import StepProgress, emit, fail_after, json_option
from waymark.errors import ImageError, InvalidInput, WaymarkError
from waymark.model import retention, timing
from waymark.model.units import human
from waymark.usecases import views
from waymark.usecases.backups import points as backups
from waymark.usecases.backups import schedules
from waymark.usecases.checkpoints import lifecycle as checkpoints

REPO = click.option("--repo", "repo", required=True, metavar="PATH",
                    type=click.Path(path_type=Path), help="The backup repository's folder.")


@click.group()
def backup() -> None:
    """Backups to external storage: run, list, verify, restore."""


@backup.group("repo")
def repo_group() -> None:
    """Backup repositories."""


@repo_group.command("init")
@click.argument("path", type=click.Path(path_type=Path))
@json_option
def repo_init(path: Path, as_json: bool) -> None:
    """Make PATH (a new or empty folder on the backup storage) a repository."""
    root = backups.init_repo(path)
    emit(as_json, {"repository": str(root)},
         [f"Initialized backup repository {root}. Back up into it with: "
          f"waymark backup run VM --repo {root}"])


def _reporter(plain: bool = False) -> backups.Reporter:
    """A progress line per VM and disk (``[2/2] Backing up web01 disk 1/2 (1a2b3c4d5e6f)  40%
    340 MiB of 1.0 GiB, ...``): each new disk is one more step."""
    line, seen = StepProgress(plain), []

    def report(what: str, fraction: float, size: int | None = None) -> None:
        if what not in seen:
            seen.append(what)
        line(seen.index(what) + 1, len(seen), what, fraction, size)

    return report


@backup.command("run")
@click.argument("vm_refs", metavar="VM...", nargs=-1, required=True)
@REPO
@click.option("--full", is_flag=True,
              help="A full point even when an incremental one is possible.")
@json_option
def run(vm_refs: tuple[str, ...], repo: Path, full: bool, as_json: bool) -> None:
    """Back up VMs (running ones live, application-consistent when their agent answers):
    incremental when it can be proven correct, else full, saying why."""
    outcomes = _run(vm_refs, repo, full, as_json)
    data = [{"vm": o.vm, "ok": o.error is None, "error": o.error,
             "point": backups.summary(o.point) if o.point else None} for o in outcomes]
    lines = []
    for o in outcomes:
        if o.point is None:
            lines.append(f"{o.vm}: FAILED: {o.error}")
            continue
        s = backups.summary(o.point)
        lines.append(f"{o.vm}: point {s['id']} ({s['kind']}: {s['reason']}; {s['consistency']}; "
                     f"{human(s['bytes'])})")
    emit(as_json, data, lines)
    failed = [o for o in outcomes if o.failure is not None]
    if failed:  # exit as the first failure would (73 for a full backup storage, ...)
        first = failed[0].failure
        assert first is not None
        fail_after(as_json, type(first)(
            f"the backup of {', '.join(o.vm for o in failed)} failed: {first.message}",
            hint=first.hint or "Fix what the message says, then run it again; the other VMs' "
                               "points are safe."))


def _run(vm_refs: tuple[str, ...], repo: Path, full: bool, as_json: bool
         ) -> list[backups.Outcome]:
    """Each VM resolved once (a VM no name or id matches is one failed outcome), then backed
    up by id; the outcomes name the VMs as they were typed, in order."""
    resolved: list[tuple[str, str | WaymarkError]] = []
    for ref in vm_refs:
        try:
            resolved.append((ref, face().vm_id(ref)))
        except WaymarkError as err:
            resolved.append((ref, err))
    ids = [found for _, found in resolved if isinstance(found, str)]
    done = iter(backups.run(face().ctx, ids, repo, _reporter(plain=as_json), full=full))
    return [backups.Outcome(ref, failure=found) if isinstance(found, WaymarkError)
            else replace(next(done), vm=ref) for ref, found in resolved]


@backup.command("list")
@click.argument("vm_ref", metavar="[VM]", required=False)
@REPO
@json_option
def list_(vm_ref: str | None, repo: Path, as_json: bool) -> None:
    """Points in time: full or incremental, size, consistency."""
    rows = backups.listing(repo, _repo_vm(repo, vm_ref))
    lines = [f"{r['id']}  {r['vm_name']:<16} {r['kind']:<11} {human(r['bytes']):>9}  "
             f"{r['consistency'].split(':')[0]}" for r in rows]
    emit(as_json, rows, lines or ["No backup points."])


@backup.command("verify")
@click.argument("vm_ref", metavar="[VM]", required=False)
@REPO
@click.option("--point", "point_ref", metavar="ID", help="Only this point.")
@json_option
def verify(vm_ref: str | None, repo: Path, point_ref: str | None, as_json: bool) -> None:
    """Re-read every file of the points: checksums and qemu-img check."""
    rows = backups.verify(repo, _repo_vm(repo, vm_ref), point_ref)
    lines = [f"{r['id']}  {r['vm_name']}: " + ("ok" if not r["problems"]
                                                 else "DAMAGED: " + "; ".join(r["problems"]))
             for r in rows]
    emit(as_json, rows, lines or ["No backup points."])
    damaged = [r["id"] for r in rows if r["problems"]]
    if damaged:
        fail_after(as_json, ImageError(
            f"{len(damaged)} point(s) are damaged: {', '.join(damaged)}.",
            hint="Do not restore them; take a new backup, or restore another point."))


@backup.command("restore")
@click.argument("vm_ref", metavar="VM")
@REPO
@click.option("--point", "point_ref", metavar="ID", help="Default: the newest point.")
@click.option("--checkpoint-first", is_flag=True, help="Checkpoint Now first, then restore.")
@click.option("--discard-current", is_flag=True, help="Restore; the current state is lost.")
@click.option("--as-new", "new_name", metavar="NAME", help="Restore as a new VM instead.")
@json_option
def restore(vm_ref: str, repo: Path, point_ref: str | None, checkpoint_first: bool,
            discard_current: bool, new_name: str | None, as_json: bool) -> None:
    """Restore a point into its VM (off; its checkpoints stay) or as a new VM."""
    ctx = face().ctx
    if new_name is not None:
        if checkpoint_first or discard_current:
            raise InvalidInput("--as-new leaves the original VM alone: drop --checkpoint-first "
                               "and --discard-current.")
        vm_id = backups.restore_as_new(ctx, repo, backups.repo_vm(repo, vm_ref), point_ref,
                                       new_name, _reporter(plain=as_json))
        emit(as_json, {"restored_as": views.vm_show(ctx, vm_id)},
             [f"Restored as new VM {new_name} ({vm_id[:12]}). Start it with: "
              f"waymark vm start {new_name}"])
        return
    if checkpoint_first == discard_current:
        raise InvalidInput("restoring into the VM replaces its current disks.",
                           hint="Add --checkpoint-first (keep Now as a checkpoint) or "
                                "--discard-current, or restore elsewhere with --as-new NAME.")
    mode = (checkpoints.ApplyMode.CHECKPOINT_FIRST if checkpoint_first
            else checkpoints.ApplyMode.DISCARD_CURRENT)
    done: dict[str, Any] = backups.restore(ctx, repo, face().vm_id(vm_ref), point_ref, mode,
                                           _reporter(plain=as_json))
    lines = [f"Restored point {done['point_id']} into {vm_ref}; Now is under the new checkpoint "
             f"'Restored from {done['point_id']}'."]
    if done["safety_checkpoint_id"]:
        lines.insert(0, f"Checkpointed Now first ({done['safety_checkpoint_id'][:12]}).")
    emit(as_json, done, lines)


def _repo_vm(repo: Path, vm_ref: str | None) -> str | None:
    """The id of the VM (with points in the repository) ``vm_ref`` names, if one is named."""
    return backups.repo_vm(repo, vm_ref) if vm_ref else None


def keep_options(fn: Any) -> Any:
    for flag, what in (("--keep-monthly", "the newest point of each of the last N months"),
                       ("--keep-weekly", "the newest point of each of the last N weeks"),
                       ("--keep-daily", "the newest point of each of the last N days"),
                       ("--keep-last", "the newest N points")):
        fn = click.option(flag, type=click.IntRange(0), default=0, help=f"Keep {what}.")(fn)
    return fn


def policy(keep_last: int, keep_daily: int, keep_weekly: int,
           keep_monthly: int) -> retention.Policy:
    return retention.Policy(keep_last, keep_daily, keep_weekly, keep_monthly)


@backup.command("prune")
@click.argument("vm_ref", metavar="[VM]", required=False)
@REPO
@keep_options
@click.option("--dry-run", is_flag=True, help="Only say what would go.")
@json_option
def prune(vm_ref: str | None, repo: Path, keep_last: int, keep_daily: int, keep_weekly: int,
          keep_monthly: int, dry_run: bool, as_json: bool) -> None:
    """Remove the points no --keep rule keeps (a kept point keeps what it needs)."""
    removed = backups.prune(face().ctx, repo, policy(keep_last, keep_daily, keep_weekly,
                                                      keep_monthly),
                            _repo_vm(repo, vm_ref), dry_run)
    verb = "Would remove" if dry_run else "Removed"
    emit(as_json, {"removed": removed, "dry_run": dry_run},
         [f"{verb} point {r['id']} of {r['vm_name']} ({human(r['bytes'])})." for r in removed]
         or ["Nothing to remove."])


@backup.group("schedule")
def schedule() -> None:
    """Scheduled backups (run them from cron or a systemd timer: waymark backup run-due)."""


@schedule.command("add")
@click.argument("name")
@click.option("--vm", "vm_refs", metavar="VM", multiple=True, required=True)
@REPO
@click.option("--daily", metavar="HH:MM", help="Every day at HH:MM (this host's time).")
@click.option("--weekly", nargs=2, metavar="DAY HH:MM", help="Every week: e.g. sun 03:00.")
@click.option("--monthly", nargs=2, metavar="N HH:MM", help="Every month on day N (1-28).")
@click.option("--full-every", type=click.IntRange(1), metavar="N",
              help="Every Nth run is a full backup (for incremental backups, to come).")
@keep_options
@json_option
def schedule_add(name: str, vm_refs: tuple[str, ...], repo: Path, daily: str | None,
                 weekly: tuple[str, str] | None, monthly: tuple[str, str] | None,
                 full_every: int | None, keep_last: int, keep_daily: int, keep_weekly: int,
                 keep_monthly: int, as_json: bool) -> None:
    """Back up VMs into a repository on a schedule, then apply the --keep rules."""
    chosen = [(k, v) for k, v in (("daily", daily), ("weekly", weekly), ("monthly", monthly))
              if v]
    if len(chosen) != 1:
        raise InvalidInput("give exactly one of --daily, --weekly, --monthly.",
                           hint="For example: --daily 02:30")
    every, value = chosen[0]
    day = None
    at = value if isinstance(value, str) else value[1]
    if every == "weekly":
        day = timing.parse_weekday(value[0])
    elif every == "monthly":
        if not str(value[0]).isdigit():
            raise InvalidInput(f"{value[0]!r} is not a day of the month.", hint="Give 1 to 28.")
        day = timing.check_month_day(int(value[0]))
    d = schedules.add(face().ctx, name, [face().vm_id(ref) for ref in vm_refs], repo, every, at,
                      day, full_every, policy(keep_last, keep_daily, keep_weekly, keep_monthly))
    emit(as_json, d, [f"Scheduled {d['name']}: next run {d['next_due_at']}. Make sure something "
                      "runs 'waymark backup run-due' regularly (cron, a systemd timer)."])


@schedule.command("list")
@json_option
def schedule_list(as_json: bool) -> None:
    """The schedules, when each runs next and how its last run went."""
    rows = schedules.listing(face().ctx)
    lines = [f"{r['name']:<20} {r['every']:<8} {r['at']}  next {r['next_due_at']}  last "
             f"{r['last_run_at'] or '-'}{'  (running)' if r['running'] else ''}"
             f"{_last_failure(r['last_result'])}" for r in rows]
    emit(as_json, rows, lines or ["No backup schedules."])


def _last_failure(result: dict[str, Any] | None) -> str:
    """What went wrong in a schedule's last run, for its line in ``schedule list``."""
    if not result:
        return ""
    failed = [f"{v['vm_name']}: {v['error']}" for v in result["vms"] if v["error"]]
    if result.get("error"):
        failed.append(result["error"])
    return f"  FAILED: {'; '.join(failed)}" if failed else ""


@schedule.command("remove")
@click.argument("name")
@json_option
def schedule_remove(name: str, as_json: bool) -> None:
    """Remove a schedule (its points stay in the repository)."""
    emit(as_json, schedules.remove(face().ctx, name), [f"Removed schedule {name}."])


@backup.command("run-due")
@json_option
def run_due(as_json: bool) -> None:
    """Run the schedules that are due (a missed slot runs once); for cron or systemd timers."""
    runs = schedules.run_due(face().ctx, _reporter(plain=as_json))
    lines = []
    for r in runs:
        lines += [f"{r['schedule_name']}: {v['vm_name']}: "
                  + (f"point {v['point_id']}" if v["point_id"] else f"FAILED: {v['error']}")
                  for v in r["vms"]]
        if r.get("error"):
            lines.append(f"{r['schedule_name']}: FAILED: {r['error']}")
    emit(as_json, runs, lines or ["Nothing is due."])
    if any(r.get("error") or any(v["error"] for v in r["vms"]) for r in runs):
        fail_after(as_json, WaymarkError("some scheduled backups failed (see above).",
                                         hint="See: waymark backup schedule list"))
