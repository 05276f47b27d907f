"""Backups to a repository on external storage (:mod:`waymark.backups.repository`): run, list,
verify, restore to the VM or as a new VM.

A backup reads the VM's disks as they are now (Now, not a checkpoint) and never creates a
checkpoint the user sees:

- a VM that is off or saved: ``qemu-img convert`` of each disk's chain (nothing writes it; a
  saved VM's disks are crash-consistent, its memory is not backed up);
- a running or paused VM: QEMU's own ``blockdev-backup`` (``sync: full``) of every disk, all
  started in one ``transaction``, so the point is one instant across disks (QEMU copies a block
  before the guest overwrites it); with the guest agent the file systems are frozen for just that
  instant (the freeze guard of live checkpoints: thawed whatever happens), making the point
  application-consistent, crash-consistent otherwise.

This release takes full backups only: each point says why in ``reason``. (Incrementals from
persistent dirty bitmaps come next; the repository format already chains points.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from waymark import durable
from waymark.backups import retention
from waymark.backups.repository import Repository, new_point_id, now
from waymark.catalog.models import Checkpoint, Disk, FrozenImage, Image, Vm
from waymark.checkpoints import tree
from waymark.checkpoints.hardware import HardwareConfig
from waymark.errors import Conflict, ImageError, InvalidInput, NotFound, WaymarkError
from waymark.guest import guard
from waymark.images import qemu_img
from waymark.ops import checkpoints, compact, liveness, lookup, machines, merges, recovery, vms
from waymark.ops.context import Context
from waymark.ops.journal import commit_handler
from waymark.qemu import blockjobs, cmdline, qmp

Report = Callable[[str, float], None] | None  # (what, fraction of it done)
JOB_PREFIX, NODE_PREFIX = "wm-backup-", "wb"
FULL_ONLY = "this release takes full backups only"


def init_repo(path: Path) -> Path:
    return Repository.init(path).root


# --- running ----------------------------------------------------------------------------------

@dataclass
class Outcome:
    vm: str
    point: dict[str, Any] | None = None
    failure: WaymarkError | None = None

    @property
    def error(self) -> str | None:
        return None if self.failure is None else self.failure.message


@dataclass(frozen=True)
class Target:
    """One disk being backed up: where QEMU or qemu-img writes it, where it ends."""

    disk_id: str
    image: Image
    tmp: Path
    final: Path

    @property
    def node(self) -> str:
        return f"{NODE_PREFIX}{self.final.stem[-8:]}{self.disk_id[:12]}"

    @property
    def job(self) -> str:
        return f"{JOB_PREFIX}{self.disk_id[:12]}"


def run(ctx: Context, vm_refs: list[str], repo_path: Path, report: Report = None
        ) -> list[Outcome]:
    """Back up each VM into the repository; one failing VM does not stop the others."""
    repo = Repository.open(repo_path)
    outcomes = []
    with repo.locked(ctx.settings.lock_timeout):
        repo.remove_partial()
        for ref in vm_refs:
            try:
                outcomes.append(Outcome(ref, point=_backup(ctx, repo, ref, report)))
            except WaymarkError as err:
                outcomes.append(Outcome(ref, failure=err))
    return outcomes


def _backup(ctx: Context, repo: Repository, vm_ref: str, report: Report) -> dict[str, Any]:
    with ctx.locked(vm_ref) as (vm_id, name):
        state = qmp.run_sync(machines.settle(ctx, vm_id, name))
        point_id = new_point_id()
        with ctx.catalog.session() as session:
            vm_row = session.get_one(Vm, vm_id)
            hardware = lookup.hardware(vm_row)
            targets = _targets(session, repo, vm_row, hardware, point_id)
            settings = {"id": vm_id, "name": name, "config": hardware.dump(),
                        "checkpoint_type": vm_row.checkpoint_type,
                        "max_checkpoints": vm_row.max_checkpoints}
        try:
            if state in liveness.LIVE_STATES:
                consistency = _live(ctx, vm_id, name, state, targets, report)
            else:
                consistency = _offline(state, targets, report)
            disks = [{"disk_id": t.disk_id, "virtual_size": t.image.virtual_size,
                      **repo.seal(t.tmp, t.final)} for t in targets]
        except BaseException:
            for target in targets:
                durable.remove(target.tmp)
            raise
        earlier = repo.points(vm_id) if (repo.root / "vms" / vm_id).is_dir() else []
        manifest = {"id": point_id, "created_at": now(), "kind": "full", "parent": None,
                    "reason": "the first backup of this VM" if not earlier else FULL_ONLY,
                    "consistency": consistency, "vm_state": state, "vm": settings,
                    "disks": disks}
        repo.write_manifest(manifest)
        return manifest


def _targets(session: Any, repo: Repository, vm_row: Vm, hardware: HardwareConfig,
             point_id: str) -> list[Target]:
    disks, images = lookup.disks(session, vm_row.id), lookup.images(session, vm_row.id)
    targets = []
    for disk_id in hardware.disks:
        active = disks[disk_id].active_image_id
        if active is None:
            continue  # a pass-through disk: not Waymark's to copy
        final = repo.disk_file(vm_row.id, disk_id, point_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        targets.append(Target(disk_id, images[active], durable.temp_path(final), final))
    if not targets:
        raise Conflict(f"VM {vm_row.name!r} has no disk Waymark can back up.",
                       hint="Pass-through disks are backed up by whatever owns them.")
    return targets


def _progress(report: Report, what: str) -> qemu_img.Progress:
    return None if report is None else (lambda fraction: report(what, fraction))


def _offline(state: str, targets: list[Target], report: Report) -> str:
    for target in targets:
        qemu_img.convert(Path(target.image.path), target.image.format, target.tmp,
                         on_progress=_progress(report, f"disk {target.disk_id[:12]}"))
    if state == "saved":
        return "crash-consistent: the VM is saved (its memory is not in the backup)"
    return "consistent: the VM was off"


def _live(ctx: Context, vm_id: str, name: str, state: str, targets: list[Target],
          report: Report) -> str:
    run = liveness.run_files(ctx, vm_id)
    if not merges.usable(run, name):
        raise Conflict(f"VM {name!r} is paused just after a memory checkpoint, when QEMU cannot "
                       "read its disks.", hint=f"Resume it (waymark vm resume {name}) or save it, "
                                               "then back it up.")
    for target in targets:
        qemu_img.create(target.tmp, size=target.image.virtual_size)
    return qmp.run_sync(_copy_live(run, name, state == "paused", targets, report))


async def _copy_live(run: cmdline.RunFiles, name: str, paused: bool, targets: list[Target],
                     report: Report) -> str:
    async with qmp.connect(run.qmp, name) as machine:
        await _clear_leftovers(machine)
        try:
            for target in targets:
                await machine.command("blockdev-add", driver="qcow2", **{
                    "node-name": target.node,
                    "file": {"driver": "file", "filename": str(target.tmp)}})
            consistency = await _start(machine, run, name, paused, targets)
            for target in targets:
                await blockjobs.follow(machine, target.job,
                                       _progress(report, f"disk {target.disk_id[:12]}"))
        finally:
            for target in targets:
                await blockjobs.abandon(machine, target.job)
            await blockjobs.delete_nodes(machine, [t.node for t in targets])
    return consistency


async def _clear_leftovers(machine: qmp.Qmp) -> None:
    """A killed run's jobs and target nodes (its files are gone already)."""
    for job in await machine.command("query-jobs"):
        if job["id"].startswith(JOB_PREFIX):
            await blockjobs.abandon(machine, job["id"])
    nodes = await machine.command("query-named-block-nodes", flat=True)
    await blockjobs.delete_nodes(machine, [n["node-name"] for n in nodes
                                           if n["node-name"].startswith(NODE_PREFIX)
                                           and n["drv"] == "qcow2"])


async def _start(machine: qmp.Qmp, run: cmdline.RunFiles, name: str, paused: bool,
                 targets: list[Target]) -> str:
    """Start every disk's backup job at one instant, frozen for it when the agent answers."""
    actions = [{"type": "blockdev-backup", "data": {
        "job-id": t.job, "device": cmdline.node_name(t.image.id), "target": t.node,
        "sync": "full", "auto-dismiss": False}} for t in targets]
    if paused:
        await machine.command("transaction", actions=actions)
        return "crash-consistent: the VM was paused (its agent cannot quiesce it)"
    started = False
    try:
        async with guard.frozen(run.agent, name):
            await machine.command("transaction", actions=actions)
            started = True
    except guard.FreezeFailed as err:
        if started:  # the guard thaws by itself; the jobs began while frozen
            return "application-consistent"
        await machine.command("transaction", actions=actions)
        return f"crash-consistent: {err.message.rstrip('.')}"
    return "application-consistent: file systems frozen through the guest agent"


# --- reading ----------------------------------------------------------------------------------

def listing(repo_path: Path, vm_ref: str | None = None) -> list[dict[str, Any]]:
    repo = Repository.open(repo_path)
    vm_id = _repo_vm(repo, vm_ref) if vm_ref else None
    return [{**summary(p), "repository": str(repo.root)} for p in repo.points(vm_id)]


def summary(point: dict[str, Any]) -> dict[str, Any]:
    return {"id": point["id"], "vm_id": point["vm"]["id"], "vm_name": point["vm"]["name"],
            "created_at": point["created_at"], "kind": point["kind"],
            "parent": point["parent"], "reason": point["reason"],
            "consistency": point["consistency"],
            "bytes": sum(d["bytes"] for d in point["disks"]),
            "virtual_bytes": sum(d["virtual_size"] for d in point["disks"])}


def _repo_vm(repo: Repository, ref: str) -> str:
    """A VM of the repository by name or id (it may no longer exist on this host)."""
    seen: set[tuple[str, str]] = {(p["vm"]["id"], p["vm"]["name"]) for p in repo.points()}
    matches = {i for i, n in seen if n == ref} or {i for i, _ in seen if i.startswith(ref)}
    if len(matches) != 1:
        raise NotFound(f"{'no' if not matches else 'more than one'} VM {ref!r} has backups in "
                       f"{repo.root}.", hint=f"List them: waymark backup list --repo {repo.root}")
    return matches.pop()


def verify(repo_path: Path, vm_ref: str | None = None, point_ref: str | None = None
           ) -> list[dict[str, Any]]:
    """Re-read every file of the chosen points: one entry per point, with its problems."""
    repo = Repository.open(repo_path)
    vm_id = _repo_vm(repo, vm_ref) if vm_ref else None
    points = [repo.point(point_ref, vm_id)] if point_ref else repo.points(vm_id)
    rows = [{"id": p["id"], "vm_name": p["vm"]["name"], "problems": repo.problems(p)}
            for p in points]
    if point_ref is None:
        rows += [{"id": bad.split(":")[0], "vm_name": None, "problems": [bad]}
                 for bad in repo.unreadable(vm_id)]
    return rows


# --- retention --------------------------------------------------------------------------------

def prune(ctx: Context, repo_path: Path, policy: retention.Policy, vm_ref: str | None = None,
          dry_run: bool = False) -> list[dict[str, Any]]:
    """Remove the points ``policy`` does not keep (per VM), and what only they needed.

    A point's manifest goes first (it stops existing), then its files. Every point a kept point
    needs is kept, so no kept point ever loses a parent.
    """
    if policy.empty():
        raise InvalidInput("prune needs at least one --keep-... rule (it would delete every "
                           "point).", hint="For example: --keep-last 7 --keep-weekly 4")
    repo = Repository.open(repo_path)
    removed: list[dict[str, Any]] = []
    with repo.locked(ctx.settings.lock_timeout):
        vm_ids = [_repo_vm(repo, vm_ref)] if vm_ref else sorted(
            {p["vm"]["id"] for p in repo.points()})
        for vm_id in vm_ids:
            points = repo.points(vm_id)
            kept = retention.keep([retention.Point(
                p["id"], datetime.fromisoformat(p["created_at"].replace("Z", "+00:00")),
                p["parent"]) for p in points], policy)
            for point in points:
                if point["id"] in kept:
                    continue
                removed.append(summary(point))
                if not dry_run:
                    repo.remove_point(point)
    return removed


# --- restoring --------------------------------------------------------------------------------

def _verified(repo: Repository, point: dict[str, Any]) -> list[dict[str, Any]]:
    """The point's chain, every file checked; ImageError names the damage."""
    chain = repo.chain(point)
    for link in chain:
        problems = repo.problems(link)
        if problems:
            raise ImageError(f"point {link['id']} is damaged: {'; '.join(problems)}. Nothing "
                             "was restored.", hint="Restore another point: waymark backup list")
    return chain


def restore_as_new(ctx: Context, repo_path: Path, vm_ref: str, point_ref: str | None,
                   new_name: str, report: Report = None) -> str:
    """A new VM (new id, new MACs) from a point; returns its id."""
    repo = Repository.open(repo_path)
    point = repo.point(point_ref or "latest", _repo_vm(repo, vm_ref))
    _verified(repo, point)
    hardware = HardwareConfig.load(point["vm"]["config"])
    copies = [vms.Copy(d["disk_id"], repo.root / d["file"], "qcow2", d["virtual_size"])
              for d in point["disks"]]
    hardware.disks = [d for d in hardware.disks if d in {c.key for c in copies}]
    return vms.create_from_copies(ctx, new_name, hardware, copies, point["vm"], None,
                                  _progress(report, "restoring"))


def restore(ctx: Context, repo_path: Path, vm_ref: str, point_ref: str | None,
            mode: checkpoints.ApplyMode, report: Report = None) -> dict[str, Any]:
    """Put a point back into the VM it came from (off): like an apply, with consent or a
    checkpoint of Now first. The tree stays; the restored disks become a new root checkpoint,
    "Restored from <point>", with Now under it."""
    repo = Repository.open(repo_path)
    with ctx.locked(vm_ref) as (vm_id, name):
        point = repo.point(point_ref or "latest", vm_id)
        _verified(repo, point)
        state = qmp.run_sync(machines.settle(ctx, vm_id, name))
        if state != "off":
            raise Conflict(f"VM {name!r} is {state}; a restore needs it off.",
                           hint=f"Stop it first: waymark vm stop {name}"
                                + (" --force (discards its saved state)" if state == "saved"
                                   else ""))
        first = mode is checkpoints.ApplyMode.CHECKPOINT_FIRST
        with ctx.catalog.session() as session:  # room for both, before anything changes
            checkpoints.require_room(session, session.get_one(Vm, vm_id), 2 if first else 1)
        safety = checkpoints.create_locked(ctx, vm_id, None, None) if first else None
        params, steps = _plan_restore(ctx, repo, vm_id, point)
        ctx.journal.run(vm_id, "backup_restore", params, steps,
                        _progress(report, "restoring"))
        recovery.recover_vm(ctx, vm_id)
        return {"point": point["id"], "checkpoint_id": params["checkpoint"]["id"],
                "safety_checkpoint_id": safety}


def _plan_restore(ctx: Context, repo: Repository, vm_id: str, point: dict[str, Any]
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with ctx.catalog.session() as session:
        vm_row = session.get_one(Vm, vm_id)
        checkpoints.require_room(session, vm_row)
        known = set(lookup.disks(session, vm_id))
        checkpoint_dir = vm_row.checkpoint_dir
    folder = ctx.disk_folder(vm_id)
    checkpoint_id = vms.new_id()
    images, steps, frozen, new_disks = [], [], [], []
    for disk in point["disks"]:
        base, top = vms.new_id(), vms.new_id()
        base_path, top_path = folder / f"{base}.qcow2", folder / f"{top}.qcow2"
        steps += [{"op": "convert", "path": str(base_path), "src": str(repo.root / disk["file"]),
                   "src_fmt": "qcow2"},
                  {"op": "create_image", "path": str(top_path), "backing": str(base_path),
                   "backing_fmt": "qcow2"}]
        row = {"vm_id": vm_id, "format": "qcow2", "pinned": False,
               "virtual_size": disk["virtual_size"], "chain_length": 1}
        images += [{**row, "id": base, "path": str(base_path), "parent_id": None},
                   {**row, "id": top, "path": str(top_path), "parent_id": base}]
        frozen.append({"disk_id": disk["disk_id"], "image_id": base, "active": top})
        if disk["disk_id"] not in known:
            new_disks.append(disk["disk_id"])
    label = tree.clean_name(f"Restored from {point['id']}")
    record = {"id": checkpoint_id, "vm_id": vm_id, "name": label, "parent_id": None,
              "kind": checkpoints.DISK_ONLY, "requested_type": "backup", "fallback_reason": None,
              "config": point["vm"]["config"], "memory_path": None, "memory_sha256": None,
              "skipped_disks": []}
    steps.append({"op": "write_file", "path": str(Path(checkpoint_dir) / f"{checkpoint_id}.json"),
                  "text": json.dumps({"checkpoint": checkpoint_id, "vm": vm_id,
                                      "restored_from": point["id"],
                                      "configuration": point["vm"]["config"]}, indent=2)})
    params = {"vm": vm_id, "checkpoint": record, "images": images, "frozen": frozen,
              "new_disks": new_disks, "config": point["vm"]["config"]}
    return params, steps


@commit_handler("backup_restore")
def _commit_restore(session: Any, params: dict[str, Any]) -> None:
    from waymark.ops.journal import now as stamp

    for row in params["images"]:
        session.add(Image(**row, created_at=stamp()))
    for disk_id in params["new_disks"]:  # the VM lost that disk since the backup
        session.add(Disk(id=disk_id, vm_id=params["vm"], active_image_id=None,
                         passthrough_path=None, created_at=stamp()))
    session.flush()
    session.add(Checkpoint(**params["checkpoint"], created_at=stamp()))
    session.flush()
    for row in params["frozen"]:
        session.add(FrozenImage(checkpoint_id=params["checkpoint"]["id"],
                                disk_id=row["disk_id"], image_id=row["image_id"]))
        session.get_one(Disk, row["disk_id"]).active_image_id = row["active"]
    vm_row = session.get_one(Vm, params["vm"])
    vm_row.config = params["config"]
    vm_row.current_checkpoint_id = params["checkpoint"]["id"]
    compact.mark(session, params["vm"])

