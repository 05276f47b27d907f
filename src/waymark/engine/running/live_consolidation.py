"""Consolidation of a running VM (:mod:`waymark.engine.consolidation`): the active image ``A``
relinked in QEMU's block graph and in its header at once, never a header write under QEMU.

One step, :class:`~waymark.engine.steps.QmpLink`, does both directions:

- **link** (``A`` onto its consolidation ``S``): ``blockdev-add`` of ``S`` (read-only, no
  backing, handed over open like every image: :func:`waymark.qemu.confine.open_image`),
  ``blockdev-reopen`` of ``A``'s format node with ``backing`` = ``S``'s node, QEMU's own
  ``change-backing-file`` so ``A``'s header names ``S`` as QEMU reads it; the real chain's
  nodes stay open, unattached (:mod:`waymark.engine.consolidation` releases none), so the
  unlink is a reopen, not one ``blockdev-add`` a layer;
- **unlink** (``A`` back onto its real parent ``F``): the real chain's nodes added again
  bottom up under the names the command line gives them (:func:`waymark.qemu.cmdline
  .node_name`) where missing, so live checkpoints and merges find the graph a boot makes;
  then the same reopen, ``change-backing-file``, ``blockdev-del`` of ``S``'s node and
  ``remove-fd`` of its fd set (else QEMU would keep a dropped ``S`` open, its space never
  freed).

Verified on this machine's QEMU 7.2: ``blockdev-reopen {"options": [{"driver": "qcow2",
"node-name": A, "read-only": false, "file": A's file node, "backing": NODE}]}`` (every option
the node was made with, the file by its node name) swaps the backing of the active node under a
running guest; ``change-backing-file {"device": A, "image-node-name": A, "backing-file":
PATH}`` rewrites ``A``'s header (the format it writes is ``A``'s own driver: qcow2, as ``S``
and every frozen layer are); a node ``blockdev-add``-ed or given by ``-blockdev`` with an
inline file node goes with it at ``blockdev-del``.

Each part is idempotent (a node already there is kept, a node gone is not deleted again, a
reopen onto the node it already reads changes nothing), so the journal redoes the whole step
after a crash. When QEMU is gone (it died, or the VM was stopped before recovery ran) the step
is the header write alone (``qemu-img rebase -u``): the next boot reads the header.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from waymark import durable
from waymark.engine import executor, steps
from waymark.engine.running import live_merge, presence
from waymark.errors import ToolError
from waymark.images import qemu_img
from waymark.qemu import cmdline, confine, qmp

log = logging.getLogger(__name__)

Layer = tuple[str, str, str, str, bool]  # node, file node, file, format, pinned


class Image(Protocol):
    """What a link needs of an image (a catalog row)."""

    @property
    def id(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def pinned(self) -> bool: ...


def consolidation_nodes(disk_id: str) -> tuple[str, str]:
    """The node names of a disk's consolidation in QEMU (format, file; at most 31 characters,
    apart from the images' ``n``/``f`` names)."""
    return f"c{disk_id[:24]}", f"g{disk_id[:24]}"


def image_layer(image: Image) -> Layer:
    return (cmdline.node_name(image.id), cmdline.file_node_name(image.id), image.path,
            image.format, image.pinned)


def consolidation_layer(disk_id: str, path: str) -> Layer:
    return (*consolidation_nodes(disk_id), path, "qcow2", False)


def link_step(run: cmdline.RunFiles, name: str, active: Image, layers: Sequence[Layer],
              release: Sequence[str]) -> steps.QmpLink:
    """``active`` now backed by ``layers`` (top first: the file its header will name first),
    ``release``: the nodes QEMU reads no more after it (top first)."""
    top = layers[0]
    return steps.QmpLink(run=str(run.folder), name=name, path=active.path,
                         node=cmdline.node_name(active.id),
                         file_node=cmdline.file_node_name(active.id), backing=top[2],
                         backing_fmt=top[3], layers=list(layers), release=list(release))


def usable(run: cmdline.RunFiles, name: str) -> bool:
    """QEMU runs the VM with its block layer active (its graph can change now)."""
    return live_merge.usable(run, name)


# --- the step ---------------------------------------------------------------------------------

def _link(step: steps.QmpLink, on_progress: qemu_img.Progress) -> None:
    run = cmdline.RunFiles(Path(step.run))
    if presence.find(run) is not None:
        try:
            qmp.run_sync(_link_live(run, step))
            return
        except ToolError:
            if presence.find(run) is not None:
                raise
            log.warning("QEMU of %s died during a relink: its header is written instead",
                        step.name)
    qemu_img.rebase(Path(step.path), Path(step.backing), step.backing_fmt, unsafe=True)
    durable.fsync_file(Path(step.path))


async def _nodes(machine: qmp.Qmp) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = await machine.command("query-named-block-nodes", flat=True)
    return found


async def _add(machine: qmp.Qmp, layers: Sequence[Layer]) -> str:
    """The layers' nodes, bottom up, where QEMU has none of that name; the top node's name."""
    present = {node["node-name"] for node in await _nodes(machine)}
    below: str | None = None
    for node, file_node, path, fmt, pinned in reversed(layers):
        if node not in present:
            opened = await confine.open_image(machine, path, writable=not pinned)
            spec: dict[str, Any] = {"driver": fmt, "node-name": node, "read-only": True,
                                    "file": cmdline.file_node(opened, pinned,
                                                              **{"node-name": file_node})}
            if below is not None:
                spec["backing"] = below
            elif fmt == "qcow2" and not pinned:
                spec["backing"] = None  # as the command line: no backing file to look for
            await machine.command("blockdev-add", **spec)
        below = node
    if below is None:
        raise ValueError("a relink needs the backing's layers")
    return below


async def _release(machine: qmp.Qmp, names: Sequence[str]) -> None:
    """``blockdev-del`` the nodes QEMU still has (top first), then ``remove-fd`` the fd sets
    of the files no node reads any more."""
    before = await _nodes(machine)
    present = {node["node-name"] for node in before}
    for name in names:
        if name in present:
            await machine.command("blockdev-del", **{"node-name": name})
    after = {node["file"] for node in await _nodes(machine) if node["drv"] == "file"}
    for filename in {node["file"] for node in before if node["drv"] == "file"} - after:
        if filename.startswith(confine.FDSET):
            await machine.command("remove-fd", **{"fdset-id": int(filename[len(
                confine.FDSET):])})


async def _link_live(run: cmdline.RunFiles, step: steps.QmpLink) -> None:
    async with qmp.connect(run.qmp, step.name) as machine:
        top = await _add(machine, step.layers)
        await machine.command("blockdev-reopen", options=[{
            "driver": "qcow2", "node-name": step.node, "read-only": False,
            "file": step.file_node, "backing": top}])
        await machine.command("change-backing-file", device=step.node, **{
            "image-node-name": step.node, "backing-file": step.backing})
        await _release(machine, step.release)


async def backing_files(run: cmdline.RunFiles, name: str, node: str) -> list[str]:
    """The files QEMU reads under node ``node``, top first (by path, not by fd set): its
    backing chain as QEMU's graph has it (``query-named-block-nodes``)."""
    async with qmp.connect(run.qmp, name) as machine:
        real = await confine.real_paths(machine)
        nodes = {found["node-name"]: found
                 for found in await machine.command("query-named-block-nodes")}
    chain, image = [], nodes[node]["image"].get("backing-image")
    while image is not None:
        chain.append(confine.path_of(image["filename"], real))
        image = image.get("backing-image")
    return chain


# The step done through a running QEMU; the composition root (:mod:`waymark.wiring`) hands it
# to :func:`waymark.engine.executor.register_steps`.
STEPS: dict[type[steps.StepBase], executor.StepFn] = {steps.QmpLink: _link}
