"""Compaction planner: the next file step that makes the image graph match the tree.

Pure code. The graph is given as :class:`ImageNode` values; the planner returns one step at a
time (the executor journals and runs it, then asks again), so a crash between steps leaves a
graph the planner simply continues from.

For every image U that no checkpoint freezes, that is not active and not pinned:

- no child: :class:`Drop` U;
- one child K: merge in the cheaper direction by allocated bytes: :class:`CommitDown` (K's
  clusters into U, K's role moves to U's file, K is then dropped) when K holds fewer bytes,
  else :class:`PullUp` (U's clusters into K, K's backing becomes U's backing, U is dropped);
- two or more children: keep U as shared space.

Every step keeps the content of each referenced image's whole chain unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ImageNode:
    id: str
    parent_id: str | None
    referenced: bool  # active, frozen by a checkpoint, or pinned
    pinned: bool
    allocated: int  # bytes allocated in this file alone


@dataclass(frozen=True)
class Drop:
    """Delete unreferenced, childless ``image``."""

    image: str


@dataclass(frozen=True)
class CommitDown:
    """Commit ``child`` into its unreferenced parent ``image``; the child's role moves to it."""

    image: str
    child: str


@dataclass(frozen=True)
class PullUp:
    """Pull unreferenced ``image`` into its only ``child``; the child skips over it."""

    image: str
    child: str


Step = Drop | CommitDown | PullUp


def children_of(nodes: Sequence[ImageNode]) -> dict[str, list[ImageNode]]:
    kids: dict[str, list[ImageNode]] = {n.id: [] for n in nodes}
    for node in nodes:
        if node.parent_id is not None and node.parent_id in kids:
            kids[node.parent_id].append(node)
    return kids


def next_step(nodes: Sequence[ImageNode]) -> Step | None:
    """The next compaction step, or None when the graph is compact. Deterministic.

    Drops come before merges: an unreferenced only child is dropped, never merged (merging it
    would leave the same shape behind).
    """
    kids = children_of(nodes)
    loose = sorted((n for n in nodes if not n.referenced and not n.pinned), key=lambda n: n.id)
    for node in loose:
        if not kids[node.id]:
            return Drop(node.id)
    for node in loose:
        below = kids[node.id]
        if len(below) == 1:
            child = below[0]
            if child.allocated <= node.allocated:
                return CommitDown(node.id, child.id)
            return PullUp(node.id, child.id)
    return None


def shared(nodes: Sequence[ImageNode]) -> set[str]:
    """Unreferenced images kept because two or more children share them."""
    kids = children_of(nodes)
    return {n.id for n in nodes if not n.referenced and not n.pinned and len(kids[n.id]) > 1}


def after(nodes: Sequence[ImageNode], step: Step) -> list[ImageNode]:
    """The graph as it will be once ``step`` is done (sizes estimated: a merge adds up)."""
    by_id = {n.id: n for n in nodes}
    image = by_id[step.image]
    if isinstance(step, Drop):
        return [n for n in nodes if n.id != step.image]
    child = by_id[step.child]
    merged = image.allocated + child.allocated

    def moved(node: ImageNode) -> ImageNode:
        if isinstance(step, PullUp):
            if node.id == child.id:
                return replace(node, parent_id=image.parent_id, allocated=merged)
            return node
        if node.id == image.id:  # CommitDown: the merged file takes the child's role
            return replace(node, referenced=child.referenced, allocated=merged)
        if node.id == child.id:
            return replace(node, referenced=False)
        if node.parent_id == child.id:
            return replace(node, parent_id=image.id)
        return node

    return [moved(n) for n in nodes]


def plan(nodes: Sequence[ImageNode]) -> list[Step]:
    """Every step compaction will take, in order (for progress: the executor re-plans)."""
    steps: list[Step] = []
    current = list(nodes)
    while (step := next_step(current)) is not None:
        steps.append(step)
        current = after(current, step)
    return steps
