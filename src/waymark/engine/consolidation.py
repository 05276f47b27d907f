"""Consolidation: Now reads through two hops whatever the number of checkpoints.

Every checkpoint adds a layer under Now, and QEMU pays a lookup per layer on every read that
misses the upper ones (4 KiB random reads of Now with 50 layers under it: 0.23-0.32x of one
image). The checkpoints' frozen images must stay as they are (apply and backups read them), so
a disk gets a *consolidation* beside them: ``S``, a qcow2 with no backing file whose content is
the view of one frozen image ``F`` on Now's path (the catalog's ``consolidations`` row: the
disk, ``S``'s path, ``F``, ``linked``, its bytes). While ``linked``, the disk's active image
``A``, whose catalog parent is ``F``, names ``S`` as its backing file (``qemu-img rebase -u``:
its header only, safe because ``S``'s view is ``F``'s), so a read stops at ``A`` or ``S``.

``S`` is no part of the image graph: the planner, the live chains and QEMU's command line never
see it (a VM boots with the real chain; see *Running VMs*). The invariant that keeps it simple:
``S`` is only ever the backing file of the active image, never of a frozen one. So before any
intent that freezes the active image or changes the chain under it is written (checkpoint
create and apply, merges, VM store, backup restore: every :meth:`Journal.run
<waymark.engine.journal.Journal.run>` but consolidation's own), :func:`unlink` relinks ``A``
onto its real parent (O(1), journaled): the composition root hooks it in
(:data:`waymark.engine.journal.BEFORE_INTENT`). A VM's deletion forgets its consolidations
(:func:`forget`, in the transaction that deletes its rows); a merge that changes the view of
the image a consolidation holds (a commit into it) or removes that image forgets that one
(:func:`merged`, :func:`removed`, in the merge's commit), and a merge of its child into it
moves the record to the merged file, whose view it then is.

:func:`consolidate` (the VM off or running, its lock held; run by the ``consolidate`` job or
``waymark vm consolidate``) brings each disk back to two hops when ``A``'s real chain is deeper
than :data:`DEPTH`:

- ``S`` already holds the view of an image on ``A``'s path: each layer above that image, bottom
  up, is committed into ``S`` (:class:`~waymark.engine.steps.CommitOnto`: the layer opened with
  its backing overridden to ``S``, the layer unchanged), then ``A`` is relinked onto ``S``. One
  *commit, then finish* intent (``consolidation_advance``); the record changes at its commit.
  After ``checkpoint create`` that is one layer: the data written since the last checkpoint.
- otherwise (the first time, after an apply elsewhere, or the base gone): a new ``S`` is built
  by ``qemu-img convert`` of ``F``'s chain (a *prepare* intent, ``consolidation_build``: a
  failure removes the new file), the old one dropped in its commit, then linked as above.

A crash anywhere: every step is idempotent (a commit's layer wins over what ``S`` held, a
relink between two equal views), every intent is finished or rolled back by the next command
on the VM, and ``waymark check`` knows ``S`` (:func:`findings`).

Space: ``S`` costs about the data of the chain it replaces (reported per VM: ``vm show``'s
``consolidation``, read without the ORM by ``catalog/reads.py``'s ``consolidations``). It is
bounded by the free space: no consolidation is built or advanced when it would leave less than
:data:`MARGIN` free. An administrator turns it off per VM (``vm set --consolidate off``:
unlinked and its files deleted, :func:`disable`).

Running VMs: the same, live (:mod:`waymark.engine.running.live_consolidation`): linking and
unlinking change QEMU's graph and ``A``'s header at once (the ``qmp_link`` step), never a
header write under a running QEMU; ``S`` is only written (built, advanced) while no QEMU has it
open, and the frozen layers it is made from are only read. A VM boots on its real chain (the
boot hook unlinks it) and the ``consolidate`` job its start leaves links it live right after
(docs/engine.md, "Consolidation").
"""

from __future__ import annotations

import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from waymark.catalog.models import Consolidation, Disk, Image, Job, Vm
from waymark.engine import jobs, journal, lookup
from waymark.engine.context import Context
from waymark.engine.journal import Journal, now
from waymark.engine.params import Params
from waymark.engine.running import live_consolidation, observe, presence
from waymark.engine.steps import CommitOnto, Convert, DeleteFile, Rebase, Step
from waymark.errors import ToolError, WaymarkError
from waymark.images.qemu_img import Progress
from waymark.qemu import qmp
from waymark.qemu.cmdline import RunFiles

log = logging.getLogger(__name__)

DEPTH = 4  # layers under the active image tolerated before consolidating
MARGIN = 1 << 30  # free bytes a consolidation must leave on its file system


def allocated(path: str) -> int:
    """Bytes the file takes on disk (0: gone)."""
    try:
        return Path(path).stat().st_blocks * 512
    except FileNotFoundError:
        return 0


# --- the intents ------------------------------------------------------------------------------

class ConsolidationUnlink(Params, frozen=True, kw_only=True):
    """The active images of ``disks`` relinked onto their real parents (``S`` stays, unlinked,
    to be advanced later)."""

    kind: ClassVar[str] = "consolidation_unlink"
    disks: list[str]


class ConsolidationAdvance(Params, frozen=True, kw_only=True):
    """``disk``'s ``S`` brought to the view of ``image`` (the layers committed into it) and the
    active image ``active`` linked onto it."""

    kind: ClassVar[str] = "consolidation_advance"
    disk: str
    image: str
    active: str


class ConsolidationBuild(Params, frozen=True, kw_only=True):
    """A new ``S`` (``path``) for ``disk``: the view of ``image``; ``old``, the file it
    replaces (dropped at its commit)."""

    kind: ClassVar[str] = "consolidation_build"
    vm: str
    disk: str
    path: str
    image: str
    old: str | None = None


class ConsolidationDrop(Params, frozen=True, kw_only=True):
    """Consolidation files nothing needs any more, deleted (*commit, then finish*)."""

    kind: ClassVar[str] = "consolidation_drop"


OWN_KINDS = frozenset(cls.kind for cls in (ConsolidationUnlink, ConsolidationAdvance,
                                           ConsolidationBuild, ConsolidationDrop))


def commit_unlink(session: Session, params: ConsolidationUnlink) -> None:
    for disk_id in params.disks:
        row = session.get(Consolidation, disk_id)
        if row is not None:
            row.linked, row.updated_at = False, now()


def commit_advance(session: Session, params: ConsolidationAdvance) -> None:
    row = session.get_one(Consolidation, params.disk)
    row.image_id, row.linked, row.updated_at = params.image, True, now()
    row.bytes = allocated(row.path)


def commit_build(session: Session, params: ConsolidationBuild) -> None:
    session.merge(Consolidation(disk_id=params.disk, vm_id=params.vm, path=params.path,
                                image_id=params.image, linked=False,
                                bytes=allocated(params.path), updated_at=now()))
    if params.old is not None and params.old != params.path:
        journal.add(session, params.vm, ConsolidationDrop(), [DeleteFile(path=params.old)])


KINDS = (journal.intent_kind(ConsolidationUnlink, commit_unlink),
         journal.intent_kind(ConsolidationAdvance, commit_advance),
         journal.intent_kind(ConsolidationBuild, commit_build),
         journal.intent_kind(ConsolidationDrop))


# --- a running VM's QEMU -----------------------------------------------------------------------

@dataclass(frozen=True)
class Live:
    """The QEMU running a VM (its run folder, the VM's name): links change its graph too."""

    run: RunFiles
    name: str


def live(home: Path | None, session: Session, vm_id: str) -> Live | None:
    """The VM's QEMU when the VM runs (or is paused) and its QEMU is there, else None."""
    vm_row = session.get(Vm, vm_id)
    if home is None or vm_row is None or vm_row.state not in observe.LIVE_STATES:
        return None
    run = observe.run_files(home, vm_id)
    return Live(run, vm_row.name) if presence.find(run) is not None else None


def _relink(qemu: Live | None, active: Image, backing: list[Image], *, release: list[str],
            consolidation: tuple[str, str] | None = None) -> Step:
    """The step that makes ``active`` read ``consolidation`` (its disk and file), else the
    chain ``backing`` (its real parent first): a header write when QEMU is off; in QEMU's
    graph and its header at once when it runs (``release``: the nodes QEMU then drops)."""
    target = backing[0].path if consolidation is None else consolidation[1]
    if qemu is None:
        return Rebase(path=active.path, backing=target, unsafe=True,
                      backing_fmt=backing[0].format if consolidation is None else "qcow2")
    layers = ([live_consolidation.consolidation_layer(*consolidation)]
              if consolidation is not None
              else [live_consolidation.image_layer(image) for image in backing])
    return live_consolidation.link_step(qemu.run, qemu.name, active, layers, release)


# --- unlinking: before anything changes the chain ---------------------------------------------

def _unlink_steps(session: Session, vm_id: str, qemu: Live | None
                  ) -> tuple[list[str], list[Step]]:
    """The linked disks of the VM and the steps relinking their active images."""
    disks: list[str] = []
    steps: list[Step] = []
    images = lookup.images(session, vm_id)
    for row in session.scalars(select(Consolidation).where(Consolidation.vm_id == vm_id,
                                                           Consolidation.linked)):
        disk = session.get(Disk, row.disk_id)
        active = images.get(disk.active_image_id or "") if disk is not None else None
        parent = images.get(active.parent_id or "") if active is not None else None
        disks.append(row.disk_id)
        if active is not None and parent is not None:
            steps.append(_relink(qemu, active, _chain(images, parent), release=[
                live_consolidation.consolidation_nodes(row.disk_id)[0]]))
    return disks, steps


def unlink(jour: Journal, vm_id: str) -> None:
    """Relink the VM's linked active images onto their real parents, so what follows sees the
    real chain: a header write each when the VM is off, live in QEMU's graph too when it runs
    (:mod:`waymark.engine.running.live_consolidation`). The caller holds the VM's lock."""
    with jour.catalog.session() as session:
        if session.scalars(select(Consolidation.disk_id).where(
                Consolidation.vm_id == vm_id, Consolidation.linked)).first() is None:
            return  # nothing linked (most VMs): no look at their QEMU
        qemu = live(jour.catalog.home, session, vm_id)
        disks, steps = _unlink_steps(session, vm_id, qemu)
    if disks:
        jour.run(vm_id, ConsolidationUnlink(disks=disks), steps, shape="finish")


def before_intent(jour: Journal, vm_id: str, params: Params) -> None:
    """The journal's hook (:data:`waymark.engine.journal.BEFORE_INTENT`): unlink first, but
    for consolidation's own intents."""
    if params.kind not in OWN_KINDS:
        unlink(jour, vm_id)


def forget(session: Session, vm_id: str) -> None:
    """The VM's consolidations removed with its rows (a VM deleted or stored): their records
    now, their files by a drop intent in the same transaction."""
    rows = list(session.scalars(select(Consolidation).where(Consolidation.vm_id == vm_id)))
    if not rows:
        return
    session.execute(delete(Consolidation).where(Consolidation.vm_id == vm_id))
    journal.add(session, vm_id, ConsolidationDrop(), [DeleteFile(path=r.path) for r in rows])


def _forget_rows(session: Session, rows: list[Consolidation]) -> None:
    for row in rows:
        session.delete(row)
        journal.add(session, row.vm_id, ConsolidationDrop(), [DeleteFile(path=row.path)])


def merged(session: Session, into: str, child: str) -> None:
    """In a merge's commit (the child's clusters committed into ``into``, its roles moved
    there): a consolidation of ``into``'s old view is no image's view any more (forgotten,
    its file dropped); one of the child's view is now ``into``'s."""
    _forget_rows(session, list(session.scalars(select(Consolidation).where(
        Consolidation.image_id == into))))
    for row in session.scalars(select(Consolidation).where(Consolidation.image_id == child)):
        row.image_id, row.updated_at = into, now()


def removed(session: Session, *image_ids: str) -> None:
    """In a merge's commit (images dropped, or one pulled up into its child): a consolidation
    of their view is forgotten, its file dropped."""
    _forget_rows(session, list(session.scalars(select(Consolidation).where(
        Consolidation.image_id.in_(image_ids)))))


def disable(ctx: Context, vm_id: str) -> None:
    """Turned off for the VM (its lock is held): unlinked, records and files gone."""
    unlink(ctx.journal, vm_id)
    with ctx.catalog.session() as session:
        forget(session, vm_id)
    _drop_files(ctx.journal, vm_id)


def _drop_files(jour: Journal, vm_id: str) -> None:
    """Delete the consolidation files a drop intent names (written by :func:`forget` or a
    build's commit), now."""
    for intent in jour.pending(vm_id):
        if intent.kind == ConsolidationDrop.kind:
            jour.drive(intent.id)


# --- consolidating ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What :func:`consolidate` did to one disk: ``built`` (a new ``S``), ``advanced`` (layers
    committed into ``S``), ``linked`` (only relinked), ``kept`` (already two hops), ``skipped``
    (``reason``: too shallow, no room, turned off)."""

    disk: str
    action: str
    layers: int = 0
    reason: str | None = None

    def view(self) -> dict[str, Any]:
        return {"disk_id": self.disk, "action": self.action, "layers": self.layers,
                "reason": self.reason}


@dataclass(frozen=True)
class _Plan:
    disk: str
    active: Image
    chain: list[Image]  # the active image's real parent first, its base last
    record: Consolidation | None
    # linked in the catalog and in the header, but the running QEMU reads the real chain (a
    # saved VM resumed: the command line names the real chain): linked again, live
    astray: bool = False

    @property
    def parent(self) -> Image:
        return self.chain[0]

    def base_index(self) -> int | None:
        """Where the image ``S`` holds is on the chain (None: not on it, or ``S`` is gone)."""
        if self.record is None or not Path(self.record.path).is_file():
            return None
        ids = [image.id for image in self.chain]
        return ids.index(self.record.image_id) if self.record.image_id in ids else None


def _chain(images: dict[str, Image], image: Image | None) -> list[Image]:
    found = []
    while image is not None:
        found.append(image)
        image = images.get(image.parent_id) if image.parent_id else None
    return found


def _plans(session: Session, vm_id: str, qemu: Live | None = None) -> list[_Plan]:
    """What each disk has; with ``qemu``, whether QEMU reads through the linked ``S``."""
    images = lookup.images(session, vm_id)
    records = {r.disk_id: r for r in session.scalars(
        select(Consolidation).where(Consolidation.vm_id == vm_id))}
    plans = []
    for disk in lookup.disks(session, vm_id).values():
        active = images.get(disk.active_image_id or "")
        if active is None or active.parent_id is None:
            continue
        record = records.get(disk.id)
        astray = qemu is not None and record is not None and record.linked and \
            _reads(qemu, active) != record.path
        plans.append(_Plan(disk.id, active, _chain(images, images[active.parent_id]),
                           record, astray))
    return plans


def _reads(qemu: Live, active: Image) -> str | None:
    """The file QEMU reads under the active image (None: none, or QEMU did not answer)."""
    try:
        files = qmp.run_sync(live_consolidation.backing_files(
            qemu.run, qemu.name, live_consolidation.image_layer(active)[0]))
    except (ToolError, KeyError):
        return None
    return files[0] if files else None


def _room(folder: Path, needed: int) -> bool:
    """Whether ``needed`` more bytes leave :data:`MARGIN` free on ``folder``'s file system."""
    return shutil.disk_usage(folder).free - needed >= MARGIN


def _needed(layers: list[Image]) -> int:
    return sum(allocated(layer.path) if not layer.pinned else layer.virtual_size
               for layer in layers)


def _advance(ctx: Context, vm_id: str, plan: _Plan, record: Consolidation,
             layers: list[Image], qemu: Live | None, progress: Progress = None) -> None:
    """Commit ``layers`` (bottom first) into the disk's ``S``, then link the active image (in
    QEMU's graph too when it runs: the real chain's nodes stay open, unattached, so the unlink
    before the next live checkpoint or merge is a reopen, not one ``blockdev-add`` a layer).
    ``S`` is open in no QEMU meanwhile (an unlinked ``S`` is no node), and the layers are
    frozen: QEMU reads them, never writes them, so they are read without their locks
    (:func:`waymark.images.qemu_img.commit_onto`)."""
    steps: list[Step] = [CommitOnto(into=record.path, top=layer.path) for layer in layers]
    steps.append(_relink(qemu, plan.active, plan.chain, consolidation=(plan.disk, record.path),
                         release=[]))
    ctx.journal.run(vm_id, ConsolidationAdvance(disk=plan.disk, image=plan.parent.id,
                                                active=plan.active.id), steps, progress,
                    shape="finish")


def _build(ctx: Context, vm_id: str, plan: _Plan, progress: Progress = None
           ) -> Consolidation:
    """A new ``S`` holding the view of the active image's parent (the old one's drop is
    journaled at its commit)."""
    path = ctx.disk_folder(vm_id) / f"{plan.disk}.consolidated-{uuid.uuid4().hex[:8]}.qcow2"
    params = ConsolidationBuild(vm=vm_id, disk=plan.disk, path=str(path), image=plan.parent.id,
                                old=plan.record.path if plan.record is not None else None)
    ctx.journal.run(vm_id, params, [Convert(path=str(path), src=plan.parent.path,
                                            src_fmt=plan.parent.format)], progress)
    with ctx.catalog.session() as session:
        return session.get_one(Consolidation, plan.disk)


@dataclass(frozen=True)
class _Decision:
    """What to do to one disk: ``action`` (an :class:`Outcome`'s), the layers to commit into
    the existing ``S`` (bottom first; ``build``: a new ``S`` first), or why not."""

    action: str
    layers: list[Image]
    reason: str | None = None

    @property
    def work(self) -> bool:
        return self.action in ("built", "advanced", "linked")


def _decide(folder: Path, plan: _Plan) -> _Decision:
    record, base = plan.record, plan.base_index()
    if record is not None and record.linked and base == 0 and not plan.astray:
        return _Decision("kept", [])
    if base is None and len(plan.chain) <= DEPTH:
        return _Decision("skipped", [], f"{len(plan.chain)} layer(s) under Now")
    layers = list(reversed(plan.chain[:base])) if base is not None else []
    incremental = base is not None and all(not x.pinned and x.format == "qcow2" for x in layers)
    if not _room(folder, _needed(layers if incremental else plan.chain)):
        return _Decision("skipped", [], f"it would leave less than {MARGIN} bytes free")
    if incremental:
        return _Decision("advanced" if layers else "linked", layers)
    return _Decision("built", [])


def _one(ctx: Context, vm_id: str, plan: _Plan, qemu: Live | None, progress: Progress
         ) -> Outcome:
    decision = _decide(ctx.disk_folder(vm_id), plan)
    if decision.action in ("advanced", "linked") and plan.record is not None:
        _advance(ctx, vm_id, plan, plan.record, decision.layers, qemu, progress)
    elif decision.action == "built":
        _advance(ctx, vm_id, plan, _build(ctx, vm_id, plan, progress), [], qemu)
        _drop_files(ctx.journal, vm_id)  # the old file, once nothing names it
    layers = len(plan.chain) if decision.action == "built" else len(decision.layers)
    return Outcome(plan.disk, decision.action, layers, decision.reason)


def _state(session: Session, vm_id: str, qemu: Live | None) -> str | None:
    """Why the VM is left as it is (None: it may be consolidated): off, or running (or paused)
    in a QEMU whose block layer is active (not left ``postmigrate`` by a checkpoint)."""
    vm_row = session.get(Vm, vm_id)
    if vm_row is None:
        return "the VM is gone"
    if not vm_row.consolidation:
        return "turned off for this VM"
    if vm_row.state in observe.LIVE_STATES and qemu is not None \
            and live_consolidation.usable(qemu.run, qemu.name):
        return None
    # a saved VM resumes without the boot hook's unlink: it is left as it is
    return f"the VM is {vm_row.state}" if vm_row.state != "off" else None


def consolidate(ctx: Context, vm_id: str, progress: Progress = None) -> list[Outcome]:
    """Bring each disk's active image back to two hops (see the module's docstring). The
    caller holds the VM's lock; a saved VM, one whose QEMU's block layer is inactive, or one
    turned off for consolidation, is left.
    ``progress``: each copy's fraction (a job's reporter, which raises
    :class:`~waymark.errors.Cancelled` when the job is cancelled: a build is then rolled
    back, an advance finished by the next command)."""
    with ctx.catalog.session() as session:
        qemu = live(ctx.home, session, vm_id)
        reason = _state(session, vm_id, qemu)
        plans = _plans(session, vm_id, qemu if reason is None else None)
        session.expunge_all()
    if reason is not None:
        return [Outcome(plan.disk, "skipped", reason=reason) for plan in plans]
    outcomes = []
    for plan in plans:
        outcomes.append(_one(ctx, vm_id, plan, qemu, progress))
        log.info("consolidation of disk %s: %s", plan.disk, outcomes[-1])
    return outcomes


def needed(ctx: Context, session: Session, vm_id: str) -> bool:
    """Whether :func:`consolidate` has work on the VM now (the catalog and file sizes; for a
    running VM also what its QEMU reads)."""
    qemu = live(ctx.home, session, vm_id)
    if _state(session, vm_id, qemu) is not None:
        return False
    return any(_decide(ctx.disk_folder(vm_id), plan).work
               for plan in _plans(session, vm_id, qemu))


# --- the background job -----------------------------------------------------------------------

JOB = "consolidate"


def schedule(ctx: Context, vm_id: str) -> None:
    """After a command on the VM (its lock still held): when its chain needs consolidating
    and no ``consolidate`` job is queued or running for it, hand one to a detached worker
    (:func:`waymark.engine.jobs.spawn`). The command itself never waits for it. Off with
    ``WAYMARK_BACKGROUND_CONSOLIDATION=off`` (:attr:`waymark.config.Settings
    .background_consolidation`)."""
    _drop_files(ctx.journal, vm_id)  # the files merges forgot (:func:`merged`, :func:`removed`)
    if not ctx.settings.background_consolidation:
        return
    try:
        with ctx.catalog.session() as session:
            if not needed(ctx, session, vm_id) or session.scalars(select(Job.id).where(
                    Job.vm_id == vm_id, Job.kind == JOB, Job.status.in_(jobs.UNFINISHED))
            ).first():
                return
        job_id = jobs.submit(ctx, vm_id, JOB, {}, run_here=False, user=jobs.host_user())
        jobs.spawn(ctx, job_id)
    except (WaymarkError, OSError, SQLAlchemyError) as err:  # the command itself succeeded
        log.warning("could not start a consolidation of VM %s: %s", vm_id, err)


# --- what it costs ----------------------------------------------------------------------------

def paths(session: Session) -> set[str]:
    """Every consolidation file the catalog knows (``waymark check``: never a stray)."""
    return set(session.scalars(select(Consolidation.path)))



# --- waymark check ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """A consolidation ``waymark check`` reports: ``kind`` (``missing-consolidation``: its file
    is gone; ``stale-consolidation``: the image whose view it holds is gone, or it is linked
    to an active image that is not that image's child), its file, what is wrong."""

    kind: str
    path: str
    detail: str


PROBLEMS = ("missing-consolidation", "stale-consolidation")


def problems(session: Session, vm_id: str) -> list[Problem]:
    """What is wrong with the VM's consolidations (the catalog and the files' existence)."""
    images = lookup.images(session, vm_id)
    disks = lookup.disks(session, vm_id)
    found = []
    for row in session.scalars(select(Consolidation).where(Consolidation.vm_id == vm_id)):
        disk = disks.get(row.disk_id)
        active = images.get(disk.active_image_id or "") if disk is not None else None
        if not Path(row.path).is_file():
            found.append(Problem(PROBLEMS[0], row.path, "the consolidation of a disk is gone"))
        elif row.image_id not in images:
            found.append(Problem(PROBLEMS[1], row.path,
                                 "the image whose view it holds is gone"))
        elif row.linked and (active is None or active.parent_id != row.image_id):
            found.append(Problem(PROBLEMS[1], row.path, "Now reads through it but its "
                                 "parent is not the image whose view it holds"))
    return found


def links(session: Session, vm_id: str) -> dict[str, str]:
    """Active image file -> the consolidation it is linked to (its header's backing file),
    for the links the catalog records as sound (``check``: no broken backing)."""
    images = lookup.images(session, vm_id)
    found = {}
    for row in session.scalars(select(Consolidation).where(Consolidation.vm_id == vm_id,
                                                           Consolidation.linked)):
        disk = session.get(Disk, row.disk_id)
        active = images.get(disk.active_image_id or "") if disk is not None else None
        if active is not None and active.parent_id == row.image_id:
            found[active.path] = row.path
    return found


def repair(jour: Journal, path: str) -> None:
    """Fall back to the real chain: the active image linked to the consolidation ``path`` is
    relinked onto its real parent, the consolidation forgotten and its file deleted. The
    caller holds the VM's lock."""
    with jour.catalog.session() as session:
        row = session.scalars(select(Consolidation).where(Consolidation.path == path)).first()
        if row is None:
            return
        vm_id, disk_id = row.vm_id, row.disk_id
        disk = session.get(Disk, disk_id)
        images = lookup.images(session, vm_id)
        active = images.get(disk.active_image_id or "") if disk is not None else None
        parent = images.get(active.parent_id or "") if active is not None else None
        qemu = live(jour.catalog.home, session, vm_id)
        chain = _chain(images, parent)
    if active is not None and parent is not None and Path(active.path).is_file():
        jour.run(vm_id, ConsolidationUnlink(disks=[disk_id]), [_relink(
            qemu, active, chain,
            release=[live_consolidation.consolidation_nodes(disk_id)[0]])], shape="finish")
    with jour.catalog.session() as session:
        session.execute(delete(Consolidation).where(Consolidation.disk_id == disk_id))
        journal.add(session, vm_id, ConsolidationDrop(), [DeleteFile(path=path)])
    _drop_files(jour, vm_id)
