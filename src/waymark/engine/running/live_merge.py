"""Live merges: compaction steps on the images a running QEMU has open, done by QEMU's own block
jobs (never qemu-img on an image QEMU holds, never reading those files directly).

:mod:`waymark.engine.compaction` plans exactly as offline (the cheaper direction by allocated
bytes);
for a running or paused VM a step on an image of a disk's *live chain* (its active image and
everything below it) becomes:

- ``CommitDown(U, K)``, K the active image: an active ``block-commit`` (top K, base U), then
  ``job-complete`` once it is READY: QEMU pivots the disk onto U. Just before, U's backup
  change-tracking bitmaps become copies of K's (:mod:`waymark.qemu.bitmaps`).
- ``CommitDown(U, K)``, K below the active image: an intermediate ``block-commit`` (``top-node`` K,
  ``base-node`` U); QEMU rewrites the backing link of K's child.
- ``PullUp(U, K)``: ``block-stream`` into K with U's parent as base; QEMU rewrites K's backing
  link.
- ``Drop(U)``: ``blockdev-del`` of U's node if QEMU still holds it, then the file.

A step on a run of layers (``between``: U1 <- ... <- Un above U, each the only child of the one
below) is the same one job: ``block-commit`` with base U and top K takes every layer between
them, ``block-stream`` with U's parent as base every layer above it; QEMU drops the whole run
from the chain at once (the files go in the drop that follows, one node released each).

Images outside every live chain (other branches) are merged with qemu-img as offline: QEMU does
not have them open.

Each live step also knows its offline equivalent. When QEMU is gone (it crashed mid-merge, or the
VM was stopped before the next command resumed the merge) the step is redone with qemu-img. That
is correct because a half-done job never changes what any referenced chain reads: a partial
commit has copied some of K's clusters into U, which only K's chain reads, through K; a partial
stream has copied U's clusters into K unchanged. When QEMU still runs after Waymark died, its job
may still be running (waited for), READY (completed), concluded (dismissed) or gone: the step is
done once the image it takes out of the chain is no longer in any disk's chain.

Every job yields to the guest's writes (:class:`waymark.qemu.blockjobs.GuestShare`): held to
a share of the host's I/O while the guest writes, at full speed while it does not.

Progress is the job's ``current-progress / total-progress``. A progress callback that raises
(a cancelled Waymark job) cancels QEMU's job first, which leaves every image as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from waymark import durable
from waymark.engine import executor, steps
from waymark.engine.running import presence
from waymark.errors import Cancelled, ToolError
from waymark.images import qemu_img
from waymark.qemu import bitmaps, blockjobs, cmdline, confine, qmp

log = logging.getLogger(__name__)
Progress = Callable[[float], None] | None


def usable(run: cmdline.RunFiles, name: str) -> bool:
    """QEMU runs this VM and its block layer is active (not left ``postmigrate`` by a
    checkpoint of a paused VM, where block jobs cannot write)."""
    if presence.find(run) is None:
        return False

    async def status() -> str:
        async with qmp.connect(run.qmp, name) as machine:
            return str((await machine.command("query-status"))["status"])

    try:
        return qmp.run_sync(status()) in ("running", "paused")
    except ToolError:
        return False


# --- steps ------------------------------------------------------------------------------------

def commit_step(run: cmdline.RunFiles, name: str, *, root: str, top: Any, base: Any,
                active: bool, abandonable: bool = False) -> steps.QmpCommit:
    """K (``top``) into U (``base``) by QEMU; ``root`` is the disk's active node."""
    return steps.QmpCommit(run=str(run.folder), name=name, root=root, top=top.path,
                           base=base.path, top_node=cmdline.node_name(top.id),
                           base_node=cmdline.node_name(base.id), active=active,
                           job=f"wm-commit-{top.id[:12]}", abandonable=abandonable)


def stream_step(run: cmdline.RunFiles, name: str, *, into: Any, gone: Any,
                base: Any | None, abandonable: bool = False) -> steps.QmpStream:
    """``gone``'s clusters into ``into``, whose backing becomes ``base``."""
    return steps.QmpStream(run=str(run.folder), name=name, path=into.path,
                           node=cmdline.node_name(into.id), gone=gone.path,
                           base_node=cmdline.node_name(base.id) if base else None,
                           backing=base.path if base else None,
                           backing_fmt=base.format if base else None,
                           job=f"wm-stream-{into.id[:12]}", abandonable=abandonable)


def relink_step(run: cmdline.RunFiles, name: str, child: Any, base: Any) -> steps.QmpRelink:
    """``child`` (in a live chain) now backed by ``base`` (see :class:`steps.QmpRelink`)."""
    return steps.QmpRelink(run=str(run.folder), name=name, path=child.path, backing=base.path,
                           backing_fmt=base.format)


def release_step(run: cmdline.RunFiles, name: str, image_id: str) -> steps.QmpRelease:
    return steps.QmpRelease(run=str(run.folder), name=name, node=cmdline.node_name(image_id))


def _qemu(step: steps.LiveStep) -> tuple[cmdline.RunFiles, str] | None:
    run = cmdline.RunFiles(Path(step.run))
    return (run, step.name) if presence.find(run) is not None else None


def _live_or_offline(step: steps.LiveStep, live: Callable[[cmdline.RunFiles, str], None],
                     offline: Callable[[], None]) -> None:
    """The step through QEMU; with qemu-img when QEMU is gone, also when it dies midway (a
    half-done job changed nothing any chain reads)."""
    found = _qemu(step)
    if found is not None:
        try:
            live(*found)
            return
        except ToolError:
            if _qemu(step) is not None:
                raise
            log.warning("QEMU of %s died during a merge: finishing it with qemu-img", found[1])
    offline()


def _commit(step: steps.QmpCommit, on_progress: Progress) -> None:
    arguments: dict[str, Any] = {"device": step.root, "base-node": step.base_node,
                                 "auto-dismiss": False}
    if not step.active:  # the link QEMU writes names the file, not its /dev/fdset
        arguments.update({"top-node": step.top_node, "backing-file": step.base})
    top, base = Path(step.top), Path(step.base)

    def offline() -> None:
        qemu_img.commit(top, base, on_progress)
        durable.fsync_file(base)
        if step.active:  # the base becomes the disk's active image
            bitmaps.carry_files(top, base)

    async def carry(machine: qmp.Qmp) -> None:
        await bitmaps.replace_live(machine, step.top_node, step.base_node)

    _live_or_offline(step, lambda run, name: qmp.run_sync(_job(
        run, name, step.job, "block-commit", arguments, step.top, on_progress,
        carry if step.active else None)), offline)


def _stream(step: steps.QmpStream, on_progress: Progress) -> None:
    arguments: dict[str, Any] = {"device": step.node, "auto-dismiss": False}
    if step.base_node:  # the link QEMU writes names the file, not its /dev/fdset
        arguments.update({"base-node": step.base_node, "backing-file": step.backing})

    def offline() -> None:
        backing = Path(step.backing) if step.backing else None
        qemu_img.rebase(Path(step.path), backing, step.backing_fmt, unsafe=False,
                        on_progress=on_progress)
        durable.fsync_file(Path(step.path))

    _live_or_offline(step, lambda run, name: qmp.run_sync(_job(
        run, name, step.job, "block-stream", arguments, step.gone, on_progress)), offline)


def _relink(step: steps.QmpRelink, on_progress: Progress) -> None:
    def offline() -> None:
        qemu_img.rebase(Path(step.path), Path(step.backing), step.backing_fmt, unsafe=True)
        durable.fsync_file(Path(step.path))

    _live_or_offline(step, lambda run, name: None, offline)


def _release(step: steps.QmpRelease, on_progress: Progress) -> None:
    found = _qemu(step)
    if found is not None:
        qmp.run_sync(_blockdev_del(*found, step.node))


async def _blockdev_del(run: cmdline.RunFiles, name: str, node: str) -> None:
    async with qmp.connect(run.qmp, name) as machine:
        await blockjobs.delete_nodes(machine, [node])


# The journal steps done through a running QEMU, by step class; the composition root
# (:mod:`waymark.wiring`) hands them to :func:`waymark.engine.executor.register_steps`.
STEPS: dict[type[steps.StepBase], executor.StepFn] = {
    steps.QmpCommit: _commit, steps.QmpStream: _stream, steps.QmpRelink: _relink,
    steps.QmpRelease: _release}


# --- QEMU's block jobs ------------------------------------------------------------------------

async def _chains(machine: qmp.Qmp) -> set[str]:
    """Every file in any disk's chain, as QEMU sees it now (by path, not by fd set)."""
    real = await confine.real_paths(machine)
    files: set[str] = set()
    for device in await machine.command("query-block"):
        image = device.get("inserted", {}).get("image")
        while image:
            files.add(confine.path_of(image["filename"], real))
            image = image.get("backing-image")
    return files


async def _job(run: cmdline.RunFiles, name: str, job: str, command: str,
               arguments: dict[str, Any], leaves: str, on_progress: Progress,
               before_complete: Callable[[qmp.Qmp], Awaitable[None]] | None = None) -> None:
    """Run (or resume) QEMU job ``job`` until ``leaves`` is out of every chain;
    ``before_complete`` runs before QEMU pivots an active commit."""
    async with qmp.connect(run.qmp, name) as machine:
        speed: int | None = None  # a job found running: its speed is whatever it was left at
        if await blockjobs.find(machine, job) is None:
            if leaves not in await _chains(machine):
                return  # QEMU finished it before Waymark died
            await machine.command(command, **{"job-id": job, **arguments})
            speed = 0
        hook = None if before_complete is None else (lambda: before_complete(machine))
        try:
            await blockjobs.follow(machine, job, on_progress, hook,
                                   share=blockjobs.GuestShare(), speed=speed)
        except Cancelled:
            if leaves in await _chains(machine):
                raise  # QEMU's job was cancelled: every image is as it was
            log.info("%s: QEMU finished %s before the cancel reached it; the step is done",
                     name, job)
