"""Deleting checkpoints: one, a subtree, or every match of a pattern; then compaction.

The tree changes in one transaction (children move to the deleted checkpoint's parent; if it was
current, Now's parent becomes its parent). The same transaction drops the checkpoint's frozen-image
references, journals the removal of its own files and leaves the ``compact`` marker, so the merges
that follow are finished by the next command if this one is killed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from waymark.catalog.models import Checkpoint, FrozenImage, Vm
from waymark.engine import compaction, jobs, journal, lookup
from waymark.engine.context import Context
from waymark.engine.params import Params
from waymark.engine.running import presence
from waymark.engine.steps import Step, removal
from waymark.errors import ConsentRequired, NotFound
from waymark.model import tree
from waymark.model.vocabulary import deleted, gone

GLOB_CHARS = frozenset("*?[")


class CheckpointFilesDelete(Params, frozen=True, kw_only=True):
    """The intent that removes deleted ``checkpoints``' own files (*commit, then finish*)."""

    kind: ClassVar[str] = "checkpoint_files_delete"
    checkpoints: list[str]


@dataclass(frozen=True)
class Match:
    id: str
    name: str


def is_pattern(text: str) -> bool:
    return bool(GLOB_CHARS & set(text))


def matching(ctx: Context, vm_id: str, pattern: str) -> list[Match]:
    """The checkpoints ``pattern`` names: one name or id prefix, else a glob over names. An
    exact name wins over the glob, so ``Patch [KB5001]*`` deletes the checkpoint so named
    (several so named are ambiguous, as any name), never the ones the glob would match."""
    with ctx.catalog.session() as session:
        vm_row = lookup.vm_by_id(session, vm_id)
        nodes = lookup.nodes(lookup.checkpoints(session, vm_row.id))
        if not is_pattern(pattern) or any(n.name == pattern for n in nodes):
            node = tree.resolve(nodes, pattern, owner=vm_row.name)
            return [Match(node.id, node.name)]
        found = [Match(n.id, n.name) for n in nodes if fnmatch.fnmatchcase(n.name, pattern)]
        if not found:
            raise NotFound(f"no checkpoint of {vm_row.name!r} matches {pattern!r}.",
                           hint=f"List them with: waymark checkpoint list {vm_row.name}")
        return found


@dataclass
class Deleted:
    checkpoints: list[Match]
    job: str

    def answer(self) -> dict[str, Any]:
        """What the faces answer: the one delete shape, with the merge job's id."""
        return {**deleted(*(gone("checkpoint", m.name, m.id) for m in self.checkpoints)),
                "job_id": self.job}


def delete_checkpoints(ctx: Context, vm_id: str, pattern: str, *, subtree: bool, yes: bool,
                       user: str, report: compaction.Reporter | None = None,
                       wait: bool = True) -> Deleted:
    """Delete what ``pattern`` matches (with their descendants if ``subtree``), then compact,
    as a merge job (``Deleted.job``) that this call runs, or, without ``wait``, leaves to a
    worker the caller starts (:func:`waymark.engine.jobs.spawn`).

    The path: :func:`remove_from_tree` (one transaction: the tree change, the journal intent
    that removes the checkpoints' own files, the ``compact`` marker), then those files go, then
    :func:`waymark.engine.compaction.compact_if_marked` plans the merges
    (:mod:`waymark.model.planner`) and runs each as journal steps
    (:mod:`waymark.engine.executor`).

    Several matches need ``yes``: the caller shows them and asks first. ``user``: who asked
    (the merge job records it, :func:`waymark.engine.jobs.submit`).
    """
    targets = matching(ctx, vm_id, pattern)
    if len(targets) > 1 and not yes:
        listing = "\n".join(f"  {m.id[:12]}  {m.name}" for m in targets)
        raise ConsentRequired(f"{pattern!r} matches {len(targets)} checkpoints:\n{listing}",
                              hint="Add --yes to delete them all.")
    with ctx.locked(vm_id):
        presence.reconcile(ctx, vm_id)  # a running VM merges live, through its QEMU
        with ctx.catalog.session() as session:
            before = compaction.held(session, vm_id)
            removed = remove_from_tree(session, session.get_one(Vm, vm_id),
                                        [m.id for m in targets], subtree=subtree)
        job = jobs.submit(ctx, vm_id, "merge", {"checkpoints": [m.id for m in removed.matches],
                                                "layers": removed.layers, "held_bytes": before},
                          run_here=wait, user=user)
        ctx.journal.finish_pending(vm_id, skip=compaction.MARKER)  # their own files go
        if wait:
            compaction.compact_if_marked(ctx, vm_id, report)
    return Deleted(removed.matches, job)


@dataclass(frozen=True)
class Removed:
    """The checkpoints a tree change removed, and the images they froze -> their names (the
    merge job's ``layers``: its steps name the deleted checkpoint, not an image file)."""

    matches: list[Match]
    layers: dict[str, str]


def remove_from_tree(session: Session, vm_row: Vm, ids: list[str], *, subtree: bool
                     ) -> Removed:
    """The tree change of a delete, in the caller's transaction (files and merges follow as
    journal intents)."""
    rows = lookup.checkpoints(session, vm_row.id)
    nodes = lookup.nodes(rows)
    doomed: list[str] = []
    for checkpoint_id in ids:
        below = tree.descendants(nodes, checkpoint_id) if subtree else [checkpoint_id]
        doomed += [c for c in below if c not in doomed]
    by_id = {c.id: c for c in rows}
    for checkpoint_id in doomed:
        _unlink(session, vm_row, by_id, checkpoint_id, set(doomed))
    targets: list[str] = []
    for checkpoint_id in doomed:
        row = by_id[checkpoint_id]
        targets.append(str(Path(vm_row.checkpoint_dir) / f"{row.id}.json"))
        if row.memory_path:
            targets.append(row.memory_path)
    files: list[Step] = [removal(targets)]  # one journal point, not one a file
    layers = {f.image_id: by_id[f.checkpoint_id].name for f in session.scalars(
        select(FrozenImage).where(FrozenImage.checkpoint_id.in_(doomed)))}
    session.execute(delete(FrozenImage).where(FrozenImage.checkpoint_id.in_(doomed)))
    session.execute(update(Checkpoint).where(Checkpoint.id.in_(doomed)).values(parent_id=None))
    session.execute(delete(Checkpoint).where(Checkpoint.id.in_(doomed)))
    journal.add(session, vm_row.id, CheckpointFilesDelete(checkpoints=doomed), files)
    compaction.mark(session, vm_row.id)
    return Removed([Match(c, by_id[c].name) for c in doomed], layers)


def _unlink(session: Session, vm_row: Vm, by_id: dict[str, Checkpoint], checkpoint_id: str,
            doomed: set[str]) -> None:
    """Re-parent the children of a deleted checkpoint, and Now, to its nearest surviving
    ancestor."""
    survivor = by_id[checkpoint_id].parent_id
    while survivor is not None and survivor in doomed:
        survivor = by_id[survivor].parent_id
    for child in by_id.values():
        if child.parent_id == checkpoint_id and child.id not in doomed:
            child.parent_id = survivor
    if vm_row.current_checkpoint_id == checkpoint_id:
        vm_row.current_checkpoint_id = survivor
