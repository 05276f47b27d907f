"""Compaction: reclaim images no checkpoint and no disk needs.

The path of an ordinary delete: :func:`waymark.usecases.checkpoints.deletion.delete_checkpoints`
changes the tree and leaves the ``compact`` marker (:func:`mark`); then :func:`compact_as_job`
runs :func:`run`, which asks the planner (:func:`waymark.model.planner.next_step`, pure: the
cheaper merge direction by allocated bytes) for one step, turns it into journal file steps
(:func:`_steps`: qemu-img offline, QEMU's block jobs for a running VM's chains,
:mod:`waymark.engine.running.live_merge`), journals and runs them as one intent, and asks again
until the graph is compact. A step takes a whole run of layers: a line of 200 deleted
checkpoints is one intent that merges (one ``qemu-img commit -b`` or QEMU block job) and one
that removes the emptied files (one ``DeleteFiles`` step). A crash anywhere leaves pending
intents plus the marker, and the next command on the VM continues from there
(:mod:`waymark.engine.settle`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from waymark import process
from waymark.catalog.models import Checkpoint, Disk, FrozenImage, Image, Intent, Job, Vm
from waymark.engine import consolidation, jobs, journal, lookup
from waymark.engine.context import Context
from waymark.engine.journal import now
from waymark.engine.params import Params
from waymark.engine.running import live_merge, presence
from waymark.engine.steps import CarryBitmaps, Commit, Rebase, Step, removal
from waymark.errors import Cancelled
from waymark.images import qemu_img
from waymark.model import planner
from waymark.qemu import cmdline
from waymark.qemu.cmdline import RunFiles

log = logging.getLogger(__name__)

MARKER = "compact"


allocated = qemu_img.allocated


def referenced_ids(session: Session, vm_id: str) -> set[str]:
    active = session.scalars(select(Disk.active_image_id).where(Disk.vm_id == vm_id))
    frozen = session.scalars(
        select(FrozenImage.image_id).join(Image, Image.id == FrozenImage.image_id)
        .where(Image.vm_id == vm_id))
    return {i for i in active if i is not None} | set(frozen)


def graph(session: Session, vm_id: str) -> list[planner.ImageNode]:
    refs = referenced_ids(session, vm_id)
    return [planner.ImageNode(i.id, i.parent_id, i.id in refs or i.pinned, i.pinned,
                              0 if i.pinned else allocated(i.path))
            for i in lookup.images(session, vm_id).values()]


@dataclass(frozen=True)
class LiveVm:
    """A VM whose QEMU has its disks' live chains open: ``chains`` maps every image of a live
    chain to its disk's active image."""

    run: RunFiles
    name: str
    chains: dict[str, str]


def live_chains(session: Session, vm_id: str) -> dict[str, str]:
    images = lookup.images(session, vm_id)
    hardware = lookup.hardware(session.get_one(Vm, vm_id))
    disks = lookup.disks(session, vm_id)
    chains: dict[str, str] = {}
    for disk_id in hardware.disks:
        active = disks[disk_id].active_image_id
        image = images.get(active) if active else None
        while image is not None:
            chains[image.id] = str(active)
            image = images.get(image.parent_id) if image.parent_id else None
    return chains


def _is_active(session: Session, image_id: str) -> bool:
    """Whether the image is a disk's active one (after an offline commit into its base, the
    base takes that role, and the backup change tracking with it)."""
    return session.scalar(select(Disk.id).where(Disk.active_image_id == image_id)) is not None


def _steps(session: Session, step: planner.Step, live: LiveVm | None) -> list[Step]:
    if isinstance(step, planner.Drop):
        rows = {i.id: i for i in session.scalars(select(Image).where(Image.id.in_(step.images)))}
        images = [rows[i] for i in step.images]
        release = [live_merge.release_step(live.run, live.name, i.id) for i in images] \
            if live else []
        return [*release, removal([i.path for i in images])]
    # a run's layers between ``image`` and ``child`` go with it: ``qemu-img commit -b`` and
    # QEMU's block-commit take every layer from the child down to the base, a safe rebase and
    # block-stream every layer down to the new backing
    image = session.get_one(Image, step.image)
    child = session.get_one(Image, step.child)
    root = live.chains.get(child.id) if live else None
    if isinstance(step, planner.CommitDown):
        grandchildren = session.scalars(select(Image).where(Image.parent_id == child.id))
        # abandonable: a partial commit: only K's chain reads U, through K
        first: Step = live_merge.commit_step(
            live.run, live.name, root=cmdline.node_name(root), top=child, base=image,
            active=root == child.id, abandonable=True) if live and root \
            else Commit(top=child.path, base=image.path, abandonable=True)
        carry = ([CarryBitmaps(src=child.path, path=image.path)]
                 if isinstance(first, Commit) and _is_active(session, child.id) else [])
        return [first, *carry] + [
            # a child QEMU has open is relinked by QEMU's commit (by qemu-img if QEMU is gone)
            live_merge.relink_step(live.run, live.name, g, image) if live and g.id in live.chains
            else Rebase(path=g.path, backing=image.path, backing_fmt=image.format, unsafe=True)
            for g in grandchildren]
    base = session.get(Image, image.parent_id) if image.parent_id else None
    # abandonable: a partial pull copies U's clusters unchanged
    if live and root:
        return [live_merge.stream_step(live.run, live.name, into=child, gone=image, base=base,
                                       abandonable=True)]
    return [Rebase(path=child.path, backing=base.path if base else None,
                   backing_fmt=base.format if base else None, unsafe=False, abandonable=True)]


def _live(ctx: Context, vm_id: str) -> tuple[bool, LiveVm | None]:
    """Whether merges may run now, and the VM's QEMU for them (None: the VM is off). They wait
    while a live VM's block layer is inactive (a paused VM checkpointed in ``postmigrate``)."""
    with ctx.catalog.session() as session:
        vm_row = session.get(Vm, vm_id)
        if vm_row is None or vm_row.state not in ("running", "paused"):
            return True, None
        name = vm_row.name
    run = RunFiles(ctx.vm_folder(vm_id) / "run")
    if presence.find(run) is None:  # QEMU died (mid-merge, maybe): the files are free now
        presence.reconcile(ctx, vm_id)
        return True, None
    if not live_merge.usable(run, name):
        return False, None
    with ctx.catalog.session() as session:
        return True, LiveVm(run, name, live_chains(session, vm_id))


class CompactMarker(Params, frozen=True, kw_only=True):
    """The marker: the VM's graph needs compacting (cleared by compaction, never driven)."""

    kind: ClassVar[str] = MARKER


class MergeIntent(Params, frozen=True, kw_only=True):
    """One planned merge step: ``image`` (U) merged with or dropped, ``child`` (K; None for a
    drop); ``direction`` is the kind's name again (as the catalog has always held it)."""

    image: str
    child: str | None
    direction: str


class DropIntent(MergeIntent, frozen=True, kw_only=True, omit_defaults=True):
    """``then``: the ancestors removed with ``image``, child first (written only when there
    are some: a one-image drop's JSON is as it always was)."""

    kind: ClassVar[str] = "drop"
    then: tuple[str, ...] = ()


class CommitDownIntent(MergeIntent, frozen=True, kw_only=True):
    kind: ClassVar[str] = "commit_down"


class PullUpIntent(MergeIntent, frozen=True, kw_only=True):
    kind: ClassVar[str] = "pull_up"


_KINDS: dict[type[planner.Step], type[MergeIntent]] = {
    planner.Drop: DropIntent, planner.CommitDown: CommitDownIntent, planner.PullUp: PullUpIntent}


def mark(session: Session, vm_id: str) -> None:
    """Record, in the caller's transaction, that the VM's graph needs compacting."""
    journal.add(session, vm_id, CompactMarker(), [])


Reporter = jobs.StepsReport
"""Progress of a compaction: (step number from 1, steps planned, what, fraction of that step)."""


Gone = Mapping[str, str]
"""The frozen images of checkpoints a delete removed -> the checkpoint's name (the merge job's
``layers``): a step's description names the deleted checkpoint, not an image file."""


class Names:
    """How a step's description names a VM's images: by the checkpoints that freeze them,
    ``Now`` for a disk's active image, the deleted checkpoint whose layer it was; and the disk
    they belong to (its place among the VM's disks)."""

    def __init__(self, session: Session, vm_id: str, gone: Gone) -> None:
        self.vm = lookup.vm_name(session, vm_id)
        self.gone = gone
        self.images = lookup.images(session, vm_id)
        self.frozen: dict[str, list[str]] = {}
        query = select(FrozenImage.image_id, Checkpoint.name).join(
            Checkpoint, FrozenImage.checkpoint_id == Checkpoint.id).where(
            Checkpoint.vm_id == vm_id).order_by(Checkpoint.created_at)
        for image_id, name in session.execute(query):
            self.frozen.setdefault(image_id, []).append(name)
        disks = lookup.disks(session, vm_id)
        vm_row = session.get(Vm, vm_id)
        attached = lookup.hardware(vm_row).guest_disks if vm_row is not None else []
        self.active = {d.active_image_id for d in disks.values()}
        self.disk_of_base: dict[str, str] = {}
        for disk_id in [*attached, *(d for d in disks if d not in attached)]:
            active = disks[disk_id].active_image_id if disk_id in disks else None
            if active is not None and active in self.images:
                self.disk_of_base.setdefault(self._base(active), self._disk(disk_id, attached))

    def _base(self, image_id: str) -> str:
        image = self.images[image_id]
        while image.parent_id is not None and image.parent_id in self.images:
            image = self.images[image.parent_id]
        return image.id

    @staticmethod
    def _disk(disk_id: str, attached: list[str]) -> str:
        """``disk 2/3`` (none for a VM's only disk), ``detached disk ID``."""
        if disk_id not in attached:
            return f"detached disk {disk_id[:12]}"
        return f"disk {attached.index(disk_id) + 1}/{len(attached)}" if len(attached) > 1 else ""

    def of(self, image_id: str) -> str:
        """The image as a person knows it."""
        if image_id in self.frozen:
            return " and ".join(repr(n) for n in self.frozen[image_id])
        if image_id in self.active:
            return "Now"
        if image_id in self.gone:
            return f"deleted {self.gone[image_id]!r}"
        return "a merged layer"  # a file whose content a merge moved (its role with it)

    def where(self, image_id: str) -> str:
        """``VM disk 1/2:`` (``VM:`` for its only disk), the prefix of the step's
        description."""
        disk = self.disk_of_base.get(self._base(image_id)) if image_id in self.images else None
        return f"{self.vm} {disk}:" if disk else f"{self.vm}:"


def _describe(names: Names, step: planner.Step) -> str:
    """The step in words: the VM, the disk and the checkpoints, never an image file."""
    image = names.of(step.image)
    if isinstance(step, planner.Drop):
        return f"{names.where(step.image)} removing {image}{_more(step.then, 'below it')}"
    child = names.of(step.child)
    if isinstance(step, planner.CommitDown):
        return (f"{names.where(step.image)} merging {child}{_more(step.between, 'below it')} "
                f"into {image}")
    return (f"{names.where(step.image)} merging {image}{_more(step.between, 'above it')} "
            f"into {child}")


def _more(layers: tuple[str, ...], where: str) -> str:
    """`` and the 3 layers below it`` (nothing for none): the rest of a run one step takes."""
    if not layers:
        return ""
    return f" and the layer {where}" if len(layers) == 1 else \
        f" and the {len(layers)} layers {where}"


def _moved(nodes: list[planner.ImageNode], step: planner.Step) -> int | None:
    """The bytes a step copies (the allocated bytes of the files whose clusters move; a drop
    copies none)."""
    return None if isinstance(step, planner.Drop) else planner.moved(nodes, step)


def run(ctx: Context, vm_id: str, report: Reporter | None = None, gone: Gone | None = None
        ) -> int:
    """Compact until nothing is left to do; returns the number of steps taken.

    A running VM's live chains are merged by its QEMU (:mod:`waymark.engine.running.live_merge`);
    when its
    block layer is inactive the marker stays for a later command. ``gone``: the names of
    deleted checkpoints by their frozen images, for the steps' descriptions.
    """
    taken = 0
    while True:
        ready, live = _live(ctx, vm_id)
        if not ready:
            return taken
        with ctx.catalog.session() as session:
            nodes = graph(session, vm_id)
            step = planner.next_step(nodes)
            if step is None:
                break
            total = taken + len(planner.plan(nodes))
            params = _params(step)
            steps = _steps(session, step, live)
            what = _describe(Names(session, vm_id, gone or {}), step)
            size = _moved(nodes, step)
        log.info("compaction: %s", what)
        number = taken + 1
        progress = None if report is None else \
            _Changes(partial(report, number, total, what, size=size))
        # a merge only removes or merges what nothing needs: always finished, never undone,
        # except that a cancelled job abandons it mid-copy (see ``abandonable``)
        try:
            if progress is not None:
                progress(0.0)
            ctx.journal.run(vm_id, params, steps, progress, shape="finish")
            if progress is not None:
                progress(1.0)
        except Cancelled:
            _unmark(ctx, vm_id)  # the rest waits for the next delete or check --repair
            raise
        taken = number
    _unmark(ctx, vm_id)
    return taken


class _Changes:
    """A step's progress passed on only when its fraction changes: ``qemu-img -p`` repeats one
    fraction many times (hundreds of 0.00 lines in a commit across 200 layers), and a job's
    reporter writes the catalog at every 0 and 1 it is given (each a transaction)."""

    def __init__(self, report: Callable[[float], None]) -> None:
        self.report: Callable[[float], None] = report
        self.last: float | None = None

    def __call__(self, fraction: float) -> None:
        if fraction != self.last:
            self.last = fraction
            self.report(fraction)


def _params(step: planner.Step) -> MergeIntent:
    if isinstance(step, planner.Drop):
        return DropIntent(image=step.image, child=None, direction=DropIntent.kind,
                          then=step.then)
    merge = _KINDS[type(step)]
    return merge(image=step.image, child=step.child, direction=merge.kind)


def _unmark(ctx: Context, vm_id: str) -> None:
    with ctx.catalog.session() as session:
        session.execute(update(Intent).where(Intent.vm_id == vm_id, Intent.kind == MARKER,
                                             Intent.status == "pending")
                        .values(status="committed", updated_at=now()))


def pending_steps(session: Session, vm_id: str) -> int:
    """How many merge steps the VM's image graph is from compact."""
    return len(planner.plan(graph(session, vm_id)))


def commit_drop(session: Session, params: DropIntent) -> None:
    """The dropped images' rows go, in one statement (each row's parent goes with it); a
    consolidation of their view is forgotten."""
    consolidation.removed(session, params.image, *params.then)
    session.execute(delete(Image).where(Image.id.in_([params.image, *params.then])))


def commit_down(session: Session, params: CommitDownIntent) -> None:
    """The child's roles (active, frozen, backing of its children) move to the merged file."""
    into, child = params.image, str(params.child)
    consolidation.merged(session, into, child)
    # the layers a run's commit went through now read ``into``'s new clusters: a copy of one's
    # view is stale (they are dropped next, unreferenced)
    consolidation.removed(session, *_between(session, child, into))
    session.execute(update(Disk).where(Disk.active_image_id == child)
                    .values(active_image_id=into))
    session.execute(update(FrozenImage).where(FrozenImage.image_id == child)
                    .values(image_id=into))
    session.execute(update(Image).where(Image.parent_id == child, Image.id != into)
                    .values(parent_id=into))


def _between(session: Session, top: str, base: str) -> list[str]:
    """The images strictly between ``top`` and its ancestor ``base``, top down."""
    found: list[str] = []
    parent = session.get_one(Image, top).parent_id
    while parent is not None and parent != base:
        found.append(parent)
        parent = session.get_one(Image, parent).parent_id
    return found


def commit_pull_up(session: Session, params: PullUpIntent) -> None:
    consolidation.removed(session, params.image)
    image = session.get_one(Image, params.image)
    session.get_one(Image, params.child).parent_id = image.parent_id


def owned_files(session: Session, vm_id: str) -> list[Path]:
    return [Path(i.path) for i in lookup.images(session, vm_id).values() if not i.pinned]


def held(session: Session, vm_id: str) -> int:
    """The bytes a VM's own images and its checkpoints' memory states take on disk: measured
    before a delete (the merge job's ``held_bytes``) and after its merges, the space it freed
    (the job's result ``freed_bytes``)."""
    memory = session.scalars(select(Checkpoint.memory_path).where(
        Checkpoint.vm_id == vm_id, Checkpoint.memory_path.is_not(None)))
    return sum(allocated(str(p)) for p in owned_files(session, vm_id)) + \
        sum(allocated(p) for p in memory if p is not None)


def _freed(ctx: Context, vm_id: str, params: dict[str, object]) -> dict[str, int]:
    """The space a delete freed (its merge job's ``held_bytes`` less what is held now; never
    below 0: a running guest may write meanwhile), when the job measured it first."""
    before = params.get("held_bytes")
    if not isinstance(before, int):
        return {}
    with ctx.catalog.session() as session:
        return {"freed_bytes": max(0, before - held(session, vm_id))}


# --- the merge job ----------------------------------------------------------------------------

WORKER_LOCK_TIMEOUT = 24 * 3600.0  # a detached worker waits for the VM as long as it takes


def compact_if_marked(ctx: Context, vm_id: str, report: Reporter | None = None) -> None:
    """Compact the VM (its lock is held) if a change left the ``compact`` marker, as its merge
    job if it has one (:func:`compact_as_job`)."""
    if any(intent.kind == MARKER for intent in ctx.journal.pending(vm_id)):
        compact_as_job(ctx, vm_id, report)


def compact_as_job(ctx: Context, vm_id: str, echo: Reporter | None = None) -> None:
    """Run the VM's pending compaction (its lock is held), as its merge job if it has one.

    A merge job another live process runs is left to it; one whose process died is adopted.
    """
    with ctx.catalog.session() as session:
        job = session.scalars(select(Job).where(
            Job.vm_id == vm_id, Job.kind == "merge", Job.status.in_(jobs.UNFINISHED))
            .order_by(Job.created_at.desc())).first()
        job_id = job.id if job else None
        elsewhere = job is not None and jobs.worker_alive(job) and not jobs.mine(job)
        params = dict(job.params or {}) if job is not None else {}
        gone = dict(params.get("layers", {}))
    if job_id is None:
        run(ctx, vm_id, echo)
        return
    if elsewhere:
        return
    reporter = jobs.Reporter(ctx, job_id, echo)
    with jobs.running(ctx, job_id):
        steps = run(ctx, vm_id, reporter.steps, gone)
    jobs.finish(ctx, job_id, "completed",
                result={"merge_steps": steps, **_freed(ctx, vm_id, params)})


def run_merge_job(ctx: Context, job_id: str) -> None:
    """The ``merge`` job's runner: take the VM's lock (settling the VM there runs
    :func:`compact_as_job`), then complete the row if another command merged first."""
    with ctx.catalog.session() as session:
        job = session.get_one(Job, job_id)
        vm_id = job.vm_id
        vm_row = session.get(Vm, vm_id) if vm_id else None
    if vm_row is None or vm_id is None:
        jobs.finish(ctx, job_id, "completed", result={"merge_steps": 0})
        return
    jobs.record_worker(ctx, job_id, *process.identity())
    with ctx.vm_locked(vm_id, vm_row.name, timeout=WORKER_LOCK_TIMEOUT):
        pass  # the lock settles the VM: its compaction runs as this job
    with ctx.catalog.session() as session:
        unfinished = session.get_one(Job, job_id).status in jobs.UNFINISHED
    if unfinished:  # another command did the merging before this one got the lock
        jobs.finish(ctx, job_id, "completed", result={"merge_steps": 0})
