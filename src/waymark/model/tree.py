"""The checkpoint tree: names, references, descendants, drawing. Pure code over plain values."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from waymark.errors import Ambiguous, NotFound
from waymark.model import notes as notes_text
from waymark.model.names import MAX_NAME, did_you_mean


@dataclass(frozen=True)
class Node:
    id: str
    name: str
    parent_id: str | None
    created_at: datetime
    has_memory: bool = False
    notes: str | None = None


def default_name(vm_name: str, when: datetime) -> str:
    """Hyper-V's default: ``VMNAME - (YYYY-MM-DD - HH:MM:SS)`` (local time), cut to fit."""
    stamp = when.astimezone().strftime("%Y-%m-%d - %H:%M:%S")
    suffix = f" - ({stamp})"
    return vm_name[: MAX_NAME - len(suffix)] + suffix


def resolve(nodes: Sequence[Node], ref: str, *, what: str = "checkpoint",
            owner: str = "") -> Node:
    """The one node whose name is ``ref``, or whose id starts with ``ref``.

    An exact name wins over an id prefix; several matches list the candidates.
    """
    by_name = [n for n in nodes if n.name == ref]
    matches = by_name or [n for n in nodes if ref and n.id.startswith(ref.lower())]
    where = f" of {owner}" if owner else ""
    if not matches:
        raise NotFound(f"no {what}{where} is named {ref!r} or has an id starting with it.",
                       hint=did_you_mean(ref, (n.name for n in nodes),
                                         f"List them with: waymark {what} list {owner}".rstrip()))
    if len(matches) > 1:
        listing = "\n".join(f"  {n.id[:12]}  {n.name}" for n in matches)
        raise Ambiguous(f"{len(matches)} {what}s{where} match {ref!r}:\n{listing}",
                        hint="Name one by a longer id prefix.")
    return matches[0]


def children(nodes: Iterable[Node]) -> dict[str | None, list[Node]]:
    """Children of each node (None: the roots), oldest first."""
    kids: dict[str | None, list[Node]] = {}
    for node in sorted(nodes, key=lambda n: (n.created_at, n.id)):
        kids.setdefault(node.parent_id, []).append(node)
    return kids


def descendants(nodes: Sequence[Node], root_id: str) -> list[str]:
    """Ids of ``root_id`` and everything below it."""
    kids = children(nodes)
    out, todo = [], [root_id]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(n.id for n in kids.get(current, []))
    return out


def depth(nodes: Sequence[Node], node_id: str | None) -> int:
    by_id = {n.id: n for n in nodes}
    count = 0
    while node_id is not None:
        count += 1
        node_id = by_id[node_id].parent_id
    return count


MEMORY, DISK_ONLY = "▶", "■"
LEGEND = f"{MEMORY} holds memory (resumes running)   {DISK_ONLY} disks only (starts off)"


NOTES_GAP, NOTES_ROOM = "  — ", 8  # before a checkpoint's notes; the fewest columns shown


def draw(nodes: Sequence[Node], current_id: str | None, columns: int = 100) -> list[str]:
    """The tree as text lines, ``Now`` drawn as the last child of the current checkpoint; a
    checkpoint's notes follow it as their first line, cut to end within ``columns`` (left out
    when fewer than ``NOTES_ROOM`` columns are left)."""
    kids = children(nodes)
    lines: list[str] = []

    def walk(parent: str | None, prefix: str) -> None:
        entries: list[Node | None] = list(kids.get(parent, []))
        if parent == current_id:
            entries.append(None)  # Now
        for i, entry in enumerate(entries):
            last = i == len(entries) - 1
            branch = "" if parent is None and not prefix else ("└─ " if last else "├─ ")
            if entry is None:
                lines.append(f"{prefix}{branch}Now")
                continue
            mark = MEMORY if entry.has_memory else DISK_ONLY
            stamp = entry.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
            line = f"{prefix}{branch}{mark} {entry.name}  [{entry.id[:8]}  {stamp}]"
            lines.append(line + _notes(entry.notes, columns - notes_text.width(line)))
            child_prefix = prefix + ("   " if last else "│  ") if branch else prefix
            walk(entry.id, child_prefix)

    walk(None, "")
    return lines


def _notes(notes: str | None, room: int) -> str:
    """A checkpoint's notes as its tree line ends them: their first line in ``room`` columns."""
    room -= notes_text.width(NOTES_GAP)
    if not notes or room < NOTES_ROOM:
        return ""
    return NOTES_GAP + notes_text.first_line(notes, room)
