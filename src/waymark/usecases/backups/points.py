"""Backups to a repository on external storage (:mod:`waymark.external.repository`): run, list,
verify, prune, restore to the VM or as a new VM.

A backup reads the VM's disks as they are now (Now, not a checkpoint) and never creates a
checkpoint the user sees. Every disk is copied by QEMU's ``blockdev-backup``, all disks started in
one ``transaction`` so the point is one instant across them (QEMU copies a block before the guest
overwrites it): a running or paused VM through its own QEMU, one that is off or saved through a
``qemu-storage-daemon`` holding its disks (:mod:`waymark.qemu.storage`; nothing runs the guest).
With the guest agent the file systems are frozen for just that instant (the freeze guard of live
checkpoints: thawed whatever happens), making the point application-consistent,
crash-consistent otherwise.

Incremental points: each disk carries a persistent dirty bitmap per repository
(:mod:`waymark.qemu.bitmaps`, which also makes it follow checkpoints and merges). A full point
adds (or re-adds) it in the same transaction as its ``sync: full`` jobs; an incremental copies
what it marks (``sync: incremental``, cleared by QEMU on success only) into a file whose backing
file is the previous point's. The catalog (``backup_bases``) records the point the bitmaps count
from, set to nothing while a run is under way: an incremental is taken only when that point is
the repository's newest of the VM, every disk has a consistent bitmap and the disks are the
same; otherwise the point is full and its ``reason`` says why (:func:`_full_reason`).
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from sqlalchemy.orm import Session

from waymark import durable
from waymark.catalog.models import BackupBase, Checkpoint, Disk, FrozenImage, Image, Vm
from waymark.engine import compaction, journal, lookup, settle
from waymark.engine.context import Context
from waymark.engine.journal import now as stamp
from waymark.engine.params import Params
from waymark.engine.running import live_merge, power, presence
from waymark.engine.steps import Convert, CreateImage, Step, WriteFile, WriteTpmState
from waymark.errors import Conflict, ImageError, InvalidInput, NotFound, WaymarkError
from waymark.external import repository, vm_files
from waymark.external.repository import Repository, new_point_id, now
from waymark.failpoints import failpoint
from waymark.guest import guard
from waymark.images import qemu_img
from waymark.model import names, retention, timing
from waymark.model.hardware import HardwareConfig
from waymark.qemu import bitmaps, blockjobs, cmdline, confine, qmp, storage, tpm
from waymark.usecases.access import quotas
from waymark.usecases.checkpoints import lifecycle as checkpoints
from waymark.usecases.vms import definitions as vms


class Reporter(Protocol):
    """Progress of a backup or restore: what (``Backing up web01 disk 1/2 (0a1b2c3d4e5f)``),
    the fraction of it done, and its bytes in all when known."""

    def __call__(self, what: str, fraction: float, size: int | None = None) -> None: ...


Report = Reporter | None
JOB_PREFIX, NODE_PREFIX = "wm-backup-", "wb"


class BackupRestore(Params, frozen=True, kw_only=True):
    """A backup point restored into VM ``vm`` as a new ``checkpoint`` (its catalog record):
    the new ``images`` (a base and an active overlay per disk), the ``frozen`` images (disk_id,
    image_id and its new ``active`` one), the disks the VM lost since (``new_disks``), the
    point's hardware ``config``."""

    kind: ClassVar[str] = "backup_restore"
    vm: str
    checkpoint: dict[str, Any]
    images: list[dict[str, Any]]
    frozen: list[dict[str, Any]]
    new_disks: list[str]
    config: dict[str, Any]
    tpm: WriteTpmState | None = None  # the point's TPM state made Now's (a finish intent)


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
    """One disk being backed up: where QEMU writes it, where it ends."""

    disk_id: str
    image: Image
    tmp: Path
    final: Path

    @property
    def source(self) -> str:
        return cmdline.node_name(self.image.id)

    @property
    def node(self) -> str:
        return f"{NODE_PREFIX}{self.final.stem[-8:]}{self.disk_id[:12]}"

    @property
    def file_node(self) -> str:
        """The node of the target's file, under :attr:`node` (added apart from it: the file is
        formatted through it first)."""
        return f"{NODE_PREFIX}f{self.final.stem[-8:]}{self.disk_id[:12]}"

    @property
    def job(self) -> str:
        return f"{JOB_PREFIX}{self.disk_id[:12]}"

    @property
    def creation(self) -> str:
        """The ``blockdev-create`` job formatting the target's file."""
        return f"{JOB_PREFIX}new-{self.disk_id[:12]}"


@dataclass
class Run:
    """One VM's backup as it goes: what it reads, and what it decided."""

    ctx: Context
    repo: Repository
    vm_id: str
    name: str
    state: str
    targets: list[Target]
    latest: dict[str, Any] | None  # the VM's newest point in the repository
    base: BackupBase | None  # what the catalog says the bitmaps count from
    asked_full: str | None
    report: Report
    parent: dict[str, Any] | None = None
    reason: str | None = None
    dirty: dict[str, int] = field(default_factory=dict)
    tpm: Path | None = None  # the VM's TPM folder, when it has one
    tpm_state: bytes | None = None  # its state at the instant the copies began
    closed: set[str] = field(default_factory=set)  # the jobs ended, their target nodes gone
    daemon: storage.Started | None = None  # the storage daemon reading a VM that is off

    @property
    def bitmap(self) -> str:
        return bitmaps.name(self.repo.id)


def run(ctx: Context, vm_ids: list[str], repo_path: Path, report: Report = None, *,
        full: bool = False, full_every: int | None = None) -> list[Outcome]:
    """Back up each VM into the repository; one failing VM does not stop the others.
    ``full`` forces full points; ``full_every`` N makes every Nth point of a chain full."""
    repo = Repository.open(repo_path)
    outcomes = []
    with repo.locked(ctx.settings.lock_timeout):
        repo.remove_partial()
        for vm_id in vm_ids:
            try:
                point = _backup(ctx, repo, vm_id, report, full, full_every)
                outcomes.append(Outcome(vm_id, point=point))
            except WaymarkError as err:
                outcomes.append(Outcome(vm_id, failure=err))
    return outcomes


def _backup(ctx: Context, repo: Repository, vm_id: str, report: Report, full: bool,
            full_every: int | None) -> dict[str, Any]:
    with ctx.locked(vm_id) as (_, name), contextlib.ExitStack() as stack:
        state = qmp.run_sync(power.settle(ctx, vm_id, name))
        point_id = new_point_id()
        with ctx.catalog.session() as session:
            vm_row = session.get_one(Vm, vm_id)
            hardware = lookup.hardware(vm_row)
            targets = _targets(session, repo, vm_row, hardware, point_id)
            settings = {"id": vm_id, "name": name, "config": hardware.dump(),
                        "checkpoint_type": vm_row.checkpoint_type,
                        "max_checkpoints": vm_row.max_checkpoints}
            base = session.get(BackupBase, (vm_id, repo.id))
            if base is not None:
                session.expunge(base)
        daemon = None if state in presence.LIVE_STATES else stack.enter_context(
            _daemon(ctx, vm_id, name, hardware, targets))
        earlier = repo.points(vm_id) if (repo.root / "vms" / vm_id).is_dir() else []
        latest = earlier[-1] if earlier else None
        asked = "--full was asked" if full else None
        if latest is not None and full_every and len(repo.chain(latest)) >= full_every:
            asked = f"the schedule takes a full point every {full_every}"
        job = Run(ctx, repo, vm_id, name, state, targets, latest, base, asked, report,
                  tpm=power.tpm_folder(ctx, vm_id) if hardware.tpm else None, daemon=daemon)
        consistency, disks, carried = _copied(job, hardware)
        parent = job.parent["id"] if job.parent else None
        manifest = {"id": point_id, "created_at": now(),
                    "kind": "incremental" if parent else "full", "parent": parent,
                    "reason": job.reason or f"the changes since point {parent}",
                    "consistency": consistency, "vm_state": state, "vm": settings,
                    "disks": disks, "vm_files": carried,
                    "tpm_state": None if job.tpm_state is None
                    else base64.b64encode(job.tpm_state).decode()}
        repo.write_manifest(manifest)
        _set_base(ctx, vm_id, repo.id, point_id)
        return manifest


def _copied(job: Run, hardware: HardwareConfig
            ) -> tuple[str, list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every disk copied and sealed, and the files the VM needs beyond its disks carried
    meanwhile (on a thread of their own, while QEMU copies): the point's consistency, its
    disks' and its files' manifest entries. A disk file left unsealed is removed."""
    try:
        with ThreadPoolExecutor(1, "carry") as side, job.repo.sealing() as sealing:
            carried = side.submit(job.repo.carry, job.vm_id, vm_files.named(hardware))
            consistency = qmp.run_sync(_copy(job, sealing))
            sealed = sealing.finish()
            files = carried.result()
    except BaseException:
        for target in job.targets:
            durable.remove(target.tmp)
        raise
    disks = [{"disk_id": t.disk_id, "virtual_size": t.image.virtual_size,
              **({"dirty_bytes": job.dirty[t.disk_id]} if job.parent else {}),
              **sealed[t.tmp]} for t in job.targets]
    return consistency, disks, files


def _set_base(ctx: Context, vm_id: str, repo_id: str, point_id: str | None) -> None:
    with ctx.catalog.session() as session:
        row = session.get(BackupBase, (vm_id, repo_id))
        if row is None:
            session.add(BackupBase(vm_id=vm_id, repo_id=repo_id, point_id=point_id,
                                   updated_at=stamp()))
        else:
            row.point_id, row.updated_at = point_id, stamp()


def _targets(session: Any, repo: Repository, vm_row: Vm, hardware: HardwareConfig,
             point_id: str) -> list[Target]:
    disks, images = lookup.disks(session, vm_row.id), lookup.images(session, vm_row.id)
    targets = []
    for disk_id in hardware.disks:
        active = disks[disk_id].active_image_id
        if active is None:
            continue  # a pass-through disk: not Waymark's to copy
        final = repo.disk_file(vm_row.id, disk_id, point_id)
        repo.writable(final.parent)
        targets.append(Target(disk_id, images[active], durable.temp_path(final), final))
    if not targets:
        raise Conflict(f"VM {vm_row.name!r} has no disk Waymark can back up.",
                       hint="Pass-through disks are backed up by whatever owns them.")
    return targets


def _full_reason(job: Run, tracked: dict[str, list[bitmaps.Bitmap]]) -> str | None:
    """Why this point cannot be incremental (None: it can, and is proven correct)."""
    latest = job.latest
    if latest is None:
        return "the first backup of this VM in this repository"
    if job.asked_full:
        return job.asked_full
    if job.base is None:
        return "no backup of this VM to this repository has been taken on this host"
    if job.base.point_id is None:
        return "the previous backup run did not finish"
    if job.base.point_id != latest["id"]:
        return (f"the newest point {latest['id']} is not the one change tracking counts from "
                f"({job.base.point_id})")
    before = {d["disk_id"]: d["virtual_size"] for d in latest["disks"]}
    if before != {t.disk_id: t.image.virtual_size for t in job.targets}:
        return f"the VM's disks were added, removed or resized since point {latest['id']}"
    for target in job.targets:
        found = [b for b in tracked.get(target.source, []) if b["name"] == job.bitmap]
        disk = f"disk {target.disk_id[:12]}"
        if not found:
            return (f"{disk} has no change tracking since point {latest['id']} (a checkpoint "
                    "was applied or a backup restored since, or its QEMU was killed or crashed "
                    "before it first saved it)")
        if found[0].get("inconsistent"):
            return (f"{disk}'s change tracking is inconsistent: its QEMU stopped without saving "
                    "it (killed or crashed)")
    return None


def _progress(report: Report, what: str) -> qemu_img.Progress:
    return None if report is None else (lambda fraction: report(what, fraction))


class _Counters:
    """The counters of the disks' copies, which QEMU runs at once, shown one disk after the
    other (``Backing up web01 disk 1/2 (0a1b2c3d4e5f)``, its bytes as QEMU counts them: a full
    point's whole disk, an incremental one's changed clusters): the progress of the first disk
    not ended yet, and each disk's end once the disks before it have ended."""

    def __init__(self, job: Run) -> None:
        self.job = job
        self.ended: dict[str, int] = {}  # by QEMU's job id: the bytes it copied
        self.shown = 0  # the disks whose end was reported

    def _report(self, target: Target, done: int, total: int) -> None:
        if self.job.report is None:
            return
        what = (f"Backing up {self.job.name} disk {self.job.targets.index(target) + 1}/"
                f"{len(self.job.targets)} ({target.disk_id[:12]})")
        self.job.report(what, done / total if total else 1.0, total)

    def progress(self, job_id: str, done: int, total: int) -> None:
        if self.shown < len(self.job.targets) and self.job.targets[self.shown].job == job_id:
            self._report(self.job.targets[self.shown], done, total)

    def end(self, job_id: str, copied: int) -> None:
        """(a small copy may end before any progress was seen)"""
        self.ended[job_id] = copied
        targets = self.job.targets
        while self.shown < len(targets) and targets[self.shown].job in self.ended:
            total = self.ended[targets[self.shown].job]
            self._report(targets[self.shown], total, total)
            self.shown += 1


@contextlib.asynccontextmanager
async def _qemu(job: Run) -> AsyncIterator[qmp.Qmp]:
    """The QEMU that reads the disks: the VM's own, or a storage daemon when it is off."""
    if job.state in presence.LIVE_STATES:
        run = presence.run_files(job.ctx, job.vm_id)
        if not live_merge.usable(run, job.name):
            raise Conflict(f"VM {job.name!r} is paused just after a memory checkpoint, when "
                           "QEMU cannot read its disks.",
                           hint=f"Resume it (waymark vm resume {job.name}) or save it, then "
                                "back it up.")
        async with qmp.connect(run.qmp, job.name) as machine:
            yield machine
        return
    assert job.daemon is not None  # started by _backup for a VM that is not running
    async with storage.session(job.daemon) as machine:
        yield machine


def _daemon(ctx: Context, vm_id: str, name: str, hardware: HardwareConfig,
            targets: list[Target]) -> contextlib.AbstractContextManager[storage.Started]:
    """The storage daemon of a VM that is off or saved, started as soon as its disks are
    known: it opens them while the repository's points are read."""
    wanted = {t.disk_id for t in targets}
    chains = [c for c in power.disk_chains(ctx, vm_id, hardware) if c.disk_id in wanted]
    return storage.started(chains, name)


async def _copy(job: Run, sealing: repository.Sealing) -> str:
    """Decide full or incremental, then copy every disk, each file sealed as its copy ends;
    the point's consistency."""
    async with _qemu(job) as machine:
        await _clear_leftovers(job, machine)
        tracked = await bitmaps.on_nodes(machine)
        job.reason = _full_reason(job, tracked)
        job.parent = None if job.reason else job.latest
        try:
            await _add_targets(job, machine)
            _set_base(job.ctx, job.vm_id, job.repo.id, None)  # unproven until the manifest
            if job.parent is None:
                await _drop_bitmaps(machine, job, tracked)
            async with machine.events("JOB_STATUS_CHANGE") as listener:
                consistency = await _start(machine, job)
                failpoint("backup-started")
                counters = _Counters(job)
                await blockjobs.follow_each(
                    machine, listener, [t.job for t in job.targets],
                    lambda done: _concluded(machine, job, sealing, counters, done),
                    on_bytes=counters.progress)
        finally:
            left = [t for t in job.targets if t.job not in job.closed]
            for target in left:
                await blockjobs.abandon(machine, target.creation)
                await blockjobs.abandon(machine, target.job)
            if left:
                await blockjobs.delete_nodes(machine, [t.node for t in left]
                                             + [t.file_node for t in left])
    return consistency


UNFLUSHED = {"no-flush": True}


async def _add_targets(job: Run, machine: qmp.Qmp) -> None:
    """Each disk's target made by the QEMU that copies into it, all at once: its file created
    empty (inside the repository: :meth:`~waymark.external.repository.Repository.new_file`),
    opened by QEMU (:func:`_target_file`), formatted by ``blockdev-create`` (standalone
    for a full point, on the parent's file otherwise, named relatively: the repository can
    move), then opened as the qcow2 node the copy writes. No ``qemu-img`` process, and nothing
    flushed: the file is written without flushes (``cache.no-flush``, as ``qemu-img convert``
    writes), and :class:`~waymark.external.repository.Sealing` makes it durable once, when it
    is whole."""
    for target in job.targets:
        job.repo.new_file(target.tmp)
        filename = await _target_file(job, machine, target.tmp)
        await machine.command("blockdev-add", **cmdline.file_node(
            filename, False, cache=UNFLUSHED, **{"node-name": target.file_node}))
    async with machine.events("JOB_STATUS_CHANGE") as listener:
        for target in job.targets:
            await machine.command("blockdev-create", **{
                "job-id": target.creation, "options": _format(job, target)})
        await blockjobs.follow_each(machine, listener, [t.creation for t in job.targets],
                                    _formatted)
    for target in job.targets:
        await machine.command("blockdev-add", driver="qcow2", backing=None, cache=UNFLUSHED,
                              file=target.file_node, **{"node-name": target.node})


def _format(job: Run, target: Target) -> dict[str, Any]:
    """``blockdev-create``'s qcow2 options for the target (as ``qemu-img create`` makes it;
    an incremental's backing file not opened, as ``-u``)."""
    options: dict[str, Any] = {"driver": "qcow2", "file": target.file_node,
                               "size": target.image.virtual_size}
    if job.parent is not None:
        below = next(d for d in job.parent["disks"] if d["disk_id"] == target.disk_id)
        options |= {"backing-file": Path(below["file"]).name, "backing-fmt": "qcow2"}
    return options


async def _formatted(done: dict[str, Any]) -> None:
    """(a target's file is formatted: nothing to do until all are)"""


async def _concluded(machine: qmp.Qmp, job: Run, sealing: repository.Sealing,
                     counters: _Counters, done: dict[str, Any]) -> None:
    """One disk's copy ended: its node closed (QEMU writes the image's tables as it closes
    it), its file sealed while the others are still copied."""
    target = next(t for t in job.targets if t.job == done["id"])
    # an incremental job's total: its bitmap as the job froze it
    job.dirty[target.disk_id] = int(done.get("total-progress", 0))
    counters.end(target.job, job.dirty[target.disk_id])
    await machine.command("blockdev-del", **{"node-name": target.node})
    await machine.command("blockdev-del", **{"node-name": target.file_node})
    job.closed.add(target.job)
    sealing.add(target.tmp, target.final)


async def _target_file(job: Run, machine: qmp.Qmp, path: Path) -> str:
    """A target as the VM's QEMU opens it (handed over open: QEMU's user cannot open paths);
    the storage daemon of a VM that is off runs as Waymark and opens the path."""
    if job.state in presence.LIVE_STATES:
        return await confine.open_image(machine, str(path), writable=True)
    return str(path)


async def _drop_bitmaps(machine: qmp.Qmp, job: Run, tracked: dict[str, list[bitmaps.Bitmap]]
                        ) -> None:
    """Before a full point: this repository's old bitmaps go (re-added with the jobs)."""
    for target in job.targets:
        if any(b["name"] == job.bitmap for b in tracked.get(target.source, [])):
            await machine.command("block-dirty-bitmap-remove", node=target.source,
                                  name=job.bitmap)


async def _clear_leftovers(job: Run, machine: qmp.Qmp) -> None:
    """A killed run's jobs and target nodes in the VM's QEMU (its files are gone already; a
    storage daemon, started for this run, has none)."""
    if job.state not in presence.LIVE_STATES:
        return
    for found in await machine.command("query-jobs"):
        if found["id"].startswith(JOB_PREFIX):
            await blockjobs.abandon(machine, found["id"])
    nodes = await machine.command("query-named-block-nodes", flat=True)
    ours = [n for n in nodes if n["node-name"].startswith(NODE_PREFIX)]
    left = ([n["node-name"] for n in ours if n["drv"] == "qcow2"]  # then the files under them
            + [n["node-name"] for n in ours if n["drv"] != "qcow2"])
    if left:
        await blockjobs.delete_nodes(machine, left)


def _actions(job: Run) -> list[dict[str, Any]]:
    actions = []
    for target in job.targets:
        data = {"job-id": target.job, "device": target.source, "target": target.node,
                "auto-dismiss": False}
        if job.parent is None:
            actions += [bitmaps.add_action(target.source, job.bitmap),
                        {"type": "blockdev-backup", "data": {**data, "sync": "full"}}]
        else:
            actions.append({"type": "blockdev-backup", "data": {
                **data, "sync": "incremental", "bitmap": job.bitmap,
                "bitmap-mode": "on-success"}})
    return actions


async def _begin(machine: qmp.Qmp, job: Run, actions: list[dict[str, Any]]) -> None:
    """The backup jobs started at one instant, and the TPM's state copied at that instant: a
    running guest's CPUs stop around both (a few milliseconds)."""
    if job.tpm is None:
        await machine.command("transaction", actions=actions)
        return
    running = job.state == "running"
    if running:
        await machine.command("stop")
    try:
        await machine.command("transaction", actions=actions)
        job.tpm_state = tpm.read_state(job.tpm)
    finally:
        if running:
            await machine.command("cont")


async def _start(machine: qmp.Qmp, job: Run) -> str:
    """Start every disk's backup job at one instant, frozen for it when the agent answers."""
    actions = _actions(job)
    if job.state not in presence.LIVE_STATES:
        await _begin(machine, job, actions)
        if job.state == "saved":
            return "crash-consistent: the VM is saved (its memory is not in the backup)"
        return "consistent: the VM was off"
    if job.state == "paused":
        await _begin(machine, job, actions)
        return "crash-consistent: the VM was paused (its agent cannot quiesce it)"
    run = presence.run_files(job.ctx, job.vm_id)
    started = False
    try:
        async with guard.frozen(run.agent, job.name, machine=machine):
            await _begin(machine, job, actions)
            started = True
    except guard.FreezeFailed as err:
        if started:  # the guard thaws by itself; the jobs began while frozen
            return "application-consistent"
        await _begin(machine, job, actions)
        return f"crash-consistent: {err.message.rstrip('.')}"
    return "application-consistent: file systems frozen through the guest agent"


# --- reading ----------------------------------------------------------------------------------

def listing(repo_path: Path, vm_id: str | None = None) -> list[dict[str, Any]]:
    repo = Repository.open(repo_path)
    return [{**summary(p), "repository": str(repo.root)} for p in repo.points(vm_id)]


def summary(point: dict[str, Any]) -> dict[str, Any]:
    return {"id": point["id"], "vm_id": point["vm"]["id"], "vm_name": point["vm"]["name"],
            "created_at": timing.moment(point["created_at"], what="point's time"),
            "kind": point["kind"], "parent_id": point["parent"], "reason": point["reason"],
            "consistency": point["consistency"],
            "bytes": sum(d["bytes"] for d in point["disks"]),
            "virtual_bytes": sum(d["virtual_size"] for d in point["disks"])}


def repo_vm(repo_path: Path, ref: str) -> str:
    """The id of the VM ``ref`` names among those with points in the repository (it may no
    longer exist on this host), for a face: as :func:`waymark.engine.lookup.vm`, an exact full id
    first (whatever a VM is named), then a name, then an id prefix. Points are kept and found
    by the VM's id; the use cases take that id."""
    repo = Repository.open(repo_path)
    seen: set[tuple[str, str]] = {(p["vm"]["id"], p["vm"]["name"]) for p in repo.points()}
    matches = ({i for i, _ in seen if i == ref.lower()} or {i for i, n in seen if n == ref}
               or {i for i, _ in seen if i.startswith(ref.lower())})
    if len(matches) != 1:
        raise NotFound(f"{'no' if not matches else 'more than one'} VM {ref!r} has backups in "
                       f"{repo.root}.", hint=f"List them: waymark backup list --repo {repo.root}")
    return matches.pop()


def verify(repo_path: Path, vm_id: str | None = None, point_ref: str | None = None
           ) -> list[dict[str, Any]]:
    """Re-read every file of the chosen points (with ``point_ref``: that point and every point
    it needs): one entry per point, with its problems, a missing parent among them."""
    repo = Repository.open(repo_path)
    known = {p["id"]: p for p in repo.points(vm_id)}
    points = (repo.chain(repo.point(point_ref, vm_id), missing_ok=True)[::-1] if point_ref
              else list(known.values()))
    rows = [{"id": p["id"], "vm_name": p["vm"]["name"],
             "problems": repo.problems(p) + ([f"needs point {p['parent']}, which is missing"]
                                            if p["parent"] and p["parent"] not in known else [])}
            for p in points]
    if point_ref is None:
        rows += [{"id": bad.split(":")[0], "vm_name": None, "problems": [bad]}
                 for bad in repo.unreadable(vm_id)]
    return rows


# --- retention --------------------------------------------------------------------------------

def prune(ctx: Context, repo_path: Path, policy: retention.Policy, vm_id: str | None = None,
          dry_run: bool = False, only: Collection[str] | None = None) -> list[dict[str, Any]]:
    """Remove the points ``policy`` does not keep (per VM), oldest first; with ``only`` (the
    ids a dry run listed, which a user confirmed), none outside it: a point the rules would
    remove only since then (a newer point was made) stays.

    A point no other point needs goes at once (its manifest first, then its files). One whose
    child needs it is merged into the child (:meth:`Repository.merge_away`): the child becomes
    self-sufficient before the point goes, so no kept point ever loses a parent.
    """
    if policy.empty():
        raise InvalidInput("prune needs at least one --keep-... rule (it would delete every "
                           "point).", hint="For example: --keep-last 7 --keep-weekly 4")
    repo = Repository.open(repo_path)
    removed: list[dict[str, Any]] = []
    with repo.locked(ctx.settings.lock_timeout):
        repo.remove_partial()  # finishes an interrupted merge first
        vm_ids = [vm_id] if vm_id else sorted(
            {p["vm"]["id"] for p in repo.points()})
        for one in vm_ids:
            points = repo.points(one)
            kept = retention.keep([retention.Point(
                p["id"], timing.parse_rfc3339(p["created_at"], what="point's time"))
                for p in points], policy)
            for point_id in [p["id"] for p in points if p["id"] not in kept
                             and (only is None or p["id"] in only)]:
                point = repo.point(point_id, one)  # as earlier merges left it
                removed.append(summary(point))
                if not dry_run:
                    _remove(repo, point)
    return removed


def _remove(repo: Repository, point: dict[str, Any]) -> None:
    child = next((p for p in repo.points(point["vm"]["id"]) if p["parent"] == point["id"]), None)
    if child is None:
        repo.remove_point(point)
    else:
        repo.merge_away(point, child)


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


def _config(ctx: Context, repo: Repository, point: dict[str, Any], vm_id: str | None,
            carried: list[vm_files.Carried] | None = None) -> HardwareConfig:
    """The point's VM configuration, checked as strictly as CLI input (it comes from storage
    others may write): refused naming the manifest. ``carried``: the files the new VM gets
    copies of (their host paths are then not checked: the copies replace them)."""
    where = repo.relative(repo.manifest_file(point["vm"]["id"], point["id"]))
    return vms.untrusted_hardware(ctx, point["vm"].get("config"), vm_id=vm_id, where=where,
                                  carried=carried or [])


def restore_as_new(ctx: Context, repo_path: Path, vm_id: str, point_ref: str | None,
                   new_name: str, report: Report = None, owner_id: str | None = None) -> str:
    """A new VM (new id, new MACs) from a point; returns its id. Holds the repository's lock
    (repository first, then VM, as a run): a prune does not merge the chain it reads."""
    new_name = names.clean(new_name, what="VM name")  # before the repository is touched
    repo = Repository.open(repo_path)
    with repo.locked(ctx.settings.lock_timeout):
        repo.remove_partial()
        point = repo.point(point_ref or "latest", vm_id)
        _verified(repo, point)
        carried = repo.carried(point, repo.relative(repo.manifest_file(vm_id, point["id"])))
        hardware = _config(ctx, repo, point, None, carried)
        copies = [vms.Copy(d["disk_id"], repo.root / d["file"], "qcow2", d["virtual_size"],
                           confined_to=repo.root)
                  for d in point["disks"]]
        hardware.rekeyed({c.key: c.key for c in copies})
        what = f"Restoring point {point['id']} as new VM {new_name}"
        return vms.create_from_copies(ctx, new_name, hardware, copies, point["vm"], None,
                                      _progress(report, what), owner_id=owner_id,
                                      carried=carried,
                                      tpm_state=repository.tpm_state(point, point["id"]))


def restore(ctx: Context, repo_path: Path, vm_id: str, point_ref: str | None,
            mode: checkpoints.ApplyMode, report: Report = None) -> dict[str, Any]:
    """Put a point back into the VM it came from (off): like an apply, with consent or a
    checkpoint of Now first. The tree stays; the restored disks become a new root checkpoint,
    "Restored from <point>", with Now under it."""
    repo = Repository.open(repo_path)
    with repo.locked(ctx.settings.lock_timeout), ctx.locked(vm_id) as (_, name):
        repo.remove_partial()
        point = repo.point(point_ref or "latest", vm_id)
        _verified(repo, point)
        hardware = _config(ctx, repo, point, vm_id)
        state = qmp.run_sync(power.settle(ctx, vm_id, name))
        if state != "off":
            raise Conflict(f"VM {name!r} is {state}; a restore needs it off.",
                           hint=f"Stop it first: waymark vm stop {name}"
                                + (" --force (discards its saved state)" if state == "saved"
                                   else ""))
        first = mode is checkpoints.ApplyMode.CHECKPOINT_FIRST
        with ctx.catalog.session() as session:  # room for both, before anything changes
            vm_row = session.get_one(Vm, vm_id)
            checkpoints.require_room(session, vm_row, 2 if first else 1)
            change = quotas.hardware_replaced(
                session, vm_row, hardware,
                {d["disk_id"]: int(d["virtual_size"]) for d in point["disks"]}, checkpoints=1)
        change.check_before(ctx, safety_checkpoint=first)
        safety = checkpoints.create_locked(
            ctx, vm_id, None, None,
            text=checkpoints.safety_notes(f"restoring backup point {point['id']}")) \
            if first else None
        params, steps = _plan_restore(ctx, repo, vm_id, point, hardware)
        with change.admitted(ctx):
            ctx.journal.run(vm_id, params, steps,
                            _progress(report, f"Restoring {name} from point {point['id']}"))
        settle.settle_vm(ctx, vm_id)
        return {"point_id": point["id"], "checkpoint_id": params.checkpoint["id"],
                "safety_checkpoint_id": safety}


def _plan_restore(ctx: Context, repo: Repository, vm_id: str, point: dict[str, Any],
                  hardware: HardwareConfig) -> tuple[BackupRestore, list[Step]]:
    with ctx.catalog.session() as session:
        vm_row = session.get_one(Vm, vm_id)
        checkpoints.require_room(session, vm_row)
        known = set(lookup.disks(session, vm_id))
        checkpoint_dir = vm_row.checkpoint_dir
    folder = ctx.disk_folder(vm_id)
    checkpoint_id = vms.new_id()
    images, frozen, new_disks = [], [], []
    steps: list[Step] = []
    for disk in point["disks"]:
        base, top = vms.new_id(), vms.new_id()
        base_path, top_path = folder / f"{base}.qcow2", folder / f"{top}.qcow2"
        steps += [Convert(path=str(base_path), src=str(repo.root / disk["file"]),
                          src_fmt="qcow2", confined_to=str(repo.root)),
                  CreateImage(path=str(top_path), backing=str(base_path), backing_fmt="qcow2")]
        row = {"vm_id": vm_id, "format": "qcow2", "pinned": False,
               "virtual_size": disk["virtual_size"], "chain_length": 1}
        images += [{**row, "id": base, "path": str(base_path), "parent_id": None},
                   {**row, "id": top, "path": str(top_path), "parent_id": base}]
        frozen.append({"disk_id": disk["disk_id"], "image_id": base, "active": top})
        if disk["disk_id"] not in known:
            new_disks.append(disk["disk_id"])
    label = names.clean(f"Restored from {point['id']}", what="checkpoint name", commas=True)
    record: dict[str, Any] = {"id": checkpoint_id, "vm_id": vm_id, "name": label, "parent_id": None,
              "kind": checkpoints.DISK_ONLY, "requested_type": "backup", "fallback_reason": None,
              "config": hardware.dump(), "memory_path": None, "memory_sha256": None,
              "skipped_disks": [], "tpm_state": point.get("tpm_state")}
    steps.append(WriteFile(path=str(Path(checkpoint_dir) / f"{checkpoint_id}.json"),
                           text=json.dumps({"checkpoint": checkpoint_id, "vm": vm_id,
                                            "restored_from": point["id"],
                                            "configuration": point["vm"]["config"]}, indent=2)))
    params = BackupRestore(vm=vm_id, checkpoint=record, images=images, frozen=frozen,
                           new_disks=new_disks, config=point["vm"]["config"],
                           tpm=None if record["tpm_state"] is None else WriteTpmState(
                               path=str(power.tpm_folder(ctx, vm_id)),
                               state=record["tpm_state"]))
    return params, steps


def commit_restore(session: Session, params: BackupRestore) -> None:
    for row in params.images:
        session.add(Image(**row, created_at=stamp()))
    for disk_id in params.new_disks:  # the VM lost that disk since the backup
        session.add(Disk(id=disk_id, vm_id=params.vm, active_image_id=None,
                         passthrough_path=None, created_at=stamp()))
    session.flush()
    session.add(Checkpoint(**params.checkpoint, created_at=stamp()))
    session.flush()
    for row in params.frozen:
        session.add(FrozenImage(checkpoint_id=params.checkpoint["id"],
                                disk_id=row["disk_id"], image_id=row["image_id"]))
        session.get_one(Disk, row["disk_id"]).active_image_id = row["active"]
    vm_row = session.get_one(Vm, params.vm)
    vm_row.config = params.config
    vm_row.current_checkpoint_id = params.checkpoint["id"]
    if params.tpm is not None:
        journal.add(session, params.vm, checkpoints.TpmStateInstall(), [params.tpm])
    compaction.mark(session, params.vm)

