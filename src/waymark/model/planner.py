"""Compaction planner: the next file step that makes the image graph match the tree.

Pure code. The graph is given as :class:`ImageNode` values; the planner returns one step at a
time (the executor journals and runs it, then asks again), so a crash between steps leaves a
graph the planner simply continues from.

An image U is *loose* when no checkpoint freezes it, it is not active and not pinned. A *run*
is a line of loose images U1 <- U2 <- ... <- Un each of which has exactly one child, the next
one, and Un's only child K (which is not such an image: referenced, or with no or several
children). A step takes a whole run at once, so a delete of 200 checkpoints in a line is one
merge and one removal, not 200 of each:

- a loose image with no child: :class:`Drop` it, with its loose ancestors that had only it
  below them (the dead branch it ends), child first;
- a run: everything moves into its largest file by allocated bytes (the fewest bytes copied;
  a tie goes to the lowest): :class:`CommitDown` into U1 (K's and the run's clusters into U1,
  in one ``qemu-img commit -b`` or ``block-commit``; K's role moves to U1's file) when U1 is
  the largest, else :class:`PullUp` of U1..Ui-1 into the largest, Ui or K (one safe rebase or
  ``block-stream`` from the base below U1; Ui's backing becomes U1's). A run whose largest
  file is in its middle takes a pull-up, a drop, then a commit;
- an image with two or more children: keep it as shared space.

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
    """Delete unreferenced, childless ``image``, then ``then``: its unreferenced ancestors that
    had only it (and each other) below them, each child before its parent."""

    image: str
    then: tuple[str, ...] = ()

    @property
    def images(self) -> tuple[str, ...]:
        """Every image the step removes, child first."""
        return (self.image, *self.then)


@dataclass(frozen=True)
class CommitDown:
    """Commit ``child`` and ``between`` (the run above ``image``, bottom first) into their
    unreferenced base ``image``; the child's role moves to it (``between`` and the child are
    dropped next)."""

    image: str
    child: str
    between: tuple[str, ...] = ()


@dataclass(frozen=True)
class PullUp:
    """Pull unreferenced ``image`` and ``between`` (the run above it, bottom first) into their
    only ``child``; the child skips over them, onto ``image``'s backing."""

    image: str
    child: str
    between: tuple[str, ...] = ()


Step = Drop | CommitDown | PullUp


def children_of(nodes: Sequence[ImageNode]) -> dict[str, list[ImageNode]]:
    kids: dict[str, list[ImageNode]] = {n.id: [] for n in nodes}
    for node in nodes:
        if node.parent_id is not None and node.parent_id in kids:
            kids[node.parent_id].append(node)
    return kids


def _loose(node: ImageNode) -> bool:
    return not node.referenced and not node.pinned


def _dead_branch(node: ImageNode, by_id: dict[str, ImageNode],
                 kids: dict[str, list[ImageNode]]) -> Drop:
    """Childless ``node`` and its loose ancestors that have only the branch below them."""
    then: list[str] = []
    parent = by_id.get(node.parent_id) if node.parent_id else None
    while parent is not None and _loose(parent) and len(kids[parent.id]) == 1:
        then.append(parent.id)
        parent = by_id.get(parent.parent_id) if parent.parent_id else None
    return Drop(node.id, tuple(then))


def _run(first: ImageNode, kids: dict[str, list[ImageNode]]) -> tuple[list[ImageNode],
                                                                     ImageNode]:
    """The run that starts at ``first`` (bottom first) and the child K below its top."""
    run = [first]
    below = kids[first.id][0]
    while _loose(below) and len(kids[below.id]) == 1:
        run.append(below)
        below = kids[below.id][0]
    return run, below


def _merge(run: list[ImageNode], child: ImageNode) -> Step:
    """Everything into the run's largest file (a tie: the lowest), in one step or the first of
    a pull-up and a commit."""
    line = [*run, child]
    into = max(range(len(line)), key=lambda i: (line[i].allocated, -i))
    if into == 0:
        return CommitDown(run[0].id, child.id, tuple(n.id for n in run[1:]))
    return PullUp(run[0].id, line[into].id, tuple(n.id for n in run[1:into]))


def next_step(nodes: Sequence[ImageNode]) -> Step | None:
    """The next compaction step, or None when the graph is compact. Deterministic.

    Drops come before merges: an unreferenced only child is dropped, never merged (merging it
    would leave the same shape behind).
    """
    kids = children_of(nodes)
    by_id = {n.id: n for n in nodes}
    loose = sorted((n for n in nodes if _loose(n)), key=lambda n: n.id)
    for node in loose:
        if not kids[node.id]:
            return _dead_branch(node, by_id, kids)
    for node in loose:
        parent = by_id.get(node.parent_id) if node.parent_id else None
        starts = parent is None or not _loose(parent) or len(kids[parent.id]) != 1
        if len(kids[node.id]) == 1 and starts:
            return _merge(*_run(node, kids))
    return None


def shared(nodes: Sequence[ImageNode]) -> set[str]:
    """Unreferenced images kept because two or more children share them."""
    kids = children_of(nodes)
    return {n.id for n in nodes if not n.referenced and not n.pinned and len(kids[n.id]) > 1}


def moved(nodes: Sequence[ImageNode], step: Step) -> int:
    """The bytes a step copies: the allocated bytes of the files whose clusters move (a drop
    copies none)."""
    if isinstance(step, Drop):
        return 0
    by_id = {n.id: n for n in nodes}
    moving = [step.child, *step.between] if isinstance(step, CommitDown) \
        else [step.image, *step.between]
    return sum(by_id[i].allocated for i in moving if i in by_id)


def after(nodes: Sequence[ImageNode], step: Step) -> list[ImageNode]:
    """The graph as it will be once ``step`` is done (sizes estimated: a merge adds up)."""
    by_id = {n.id: n for n in nodes}
    if isinstance(step, Drop):
        return [n for n in nodes if n.id not in step.images]
    image, child = by_id[step.image], by_id[step.child]
    merged = child.allocated + moved(nodes, step) if isinstance(step, PullUp) \
        else image.allocated + moved(nodes, step)

    def changed(node: ImageNode) -> ImageNode:
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

    return [changed(n) for n in nodes]


def plan(nodes: Sequence[ImageNode]) -> list[Step]:
    """Every step compaction will take, in order (for progress: the executor re-plans)."""
    steps: list[Step] = []
    current = list(nodes)
    while (step := next_step(current)) is not None:
        steps.append(step)
        current = after(current, step)
    return steps
