"""Catalog lookups shared by the use cases: resolve references, load a VM's pieces."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from waymark.catalog import db
from waymark.catalog.models import Checkpoint, Disk, FrozenImage, Image, StoredVm, Vm
from waymark.errors import Ambiguous, NotFound
from waymark.model import names, tree
from waymark.model.hardware import HardwareConfig

ID_LENGTH = 32  # a VM's id: uuid4().hex

Visible = Callable[[Vm], bool]


def everything(_row: Vm) -> bool:
    return True


def vm(session: Session, ref: str, visible: Visible = everything) -> Vm:
    """Resolve a reference a person typed (for a face: the CLI as root, the API with the
    caller's scope as ``visible``), in this order, only among the VMs ``visible`` accepts:

    1. an exact full id: always that VM, whatever any VM is named;
    2. a name (names are unique per owner: several matches are ambiguous);
    3. an id prefix matching one VM.

    Use cases never resolve again: they take the id this returns (:func:`vm_by_id`)."""
    exact = session.get(Vm, ref.lower()) if len(ref) == ID_LENGTH else None
    if exact is not None and visible(exact):
        return exact
    named = [v for v in session.scalars(select(Vm).where(Vm.name == ref)) if visible(v)]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise _ambiguous(ref, named, "Name one by its id.")
    matches = [v for v in session.scalars(select(Vm).where(Vm.id.startswith(ref.lower())))
               if visible(v)] if ref else []
    if not matches:
        raise _stored(session, ref) or NotFound(
            f"no VM is named {ref!r} or has an id starting with it.",
            hint=names.did_you_mean(ref, visible_names(session, visible),
                                    "List them with: waymark vm list"))
    if len(matches) > 1:
        raise _ambiguous(ref, matches, "Name one by its name or a longer id prefix.")
    return matches[0]


def visible_names(session: Session, visible: Visible = everything) -> list[str]:
    """The names of the VMs ``visible`` accepts (what a "did you mean" may offer)."""
    return [v.name for v in session.scalars(select(Vm)) if visible(v)]


def _ambiguous(ref: str, rows: Sequence[Vm], hint: str) -> Ambiguous:
    listing = "\n".join(f"  {m.id[:12]}  {m.name}" for m in rows)
    return Ambiguous(f"{len(rows)} VMs match {ref!r}:\n{listing}", hint=hint)


def vm_by_id(session: Session, vm_id: str) -> Vm:
    """The VM with this id (a face resolved the reference once, :func:`vm`); never a name."""
    return db.required(session, Vm, vm_id, f"no VM has the id {vm_id!r} (it was deleted "
                       "meanwhile).", hint="List them with: waymark vm list")


def _stored(session: Session, ref: str) -> NotFound | None:
    """The error for a VM this host stored in a library: it cannot be used until deployed."""
    row = session.scalars(select(StoredVm).where(
        (StoredVm.name == ref) | StoredVm.vm_id.startswith(ref.lower() or "-"))).first()
    if row is None:
        return None
    return NotFound(f"VM {row.name!r} is stored in the library {row.library}: it cannot be "
                    "started, changed or checkpointed until it is deployed.",
                    hint=f"Deploy it: waymark vm deploy {row.name} --library {row.library}")


def vm_name(session: Session, vm_id: str) -> str:
    """A VM's name, or its id when it no longer exists."""
    row = session.get(Vm, vm_id)
    return row.name if row is not None else vm_id


def checkpoints(session: Session, vm_id: str) -> list[Checkpoint]:
    query = select(Checkpoint).where(Checkpoint.vm_id == vm_id)
    return list(session.scalars(query.order_by(Checkpoint.created_at, Checkpoint.id)))


def nodes(rows: Sequence[Checkpoint]) -> list[tree.Node]:
    return [tree.Node(c.id, c.name, c.parent_id, c.created_at, c.memory_path is not None)
            for c in rows]


def checkpoint(session: Session, vm_row: Vm, ref: str) -> Checkpoint:
    rows = checkpoints(session, vm_row.id)
    node = tree.resolve(nodes(rows), ref, owner=vm_row.name)
    return next(c for c in rows if c.id == node.id)


def checkpoint_count(session: Session, vm_id: str) -> int:
    query = select(func.count()).select_from(Checkpoint).where(Checkpoint.vm_id == vm_id)
    return int(session.scalar(query) or 0)


def disks(session: Session, vm_id: str) -> dict[str, Disk]:
    return {d.id: d for d in session.scalars(select(Disk).where(Disk.vm_id == vm_id))}


def images(session: Session, vm_id: str) -> dict[str, Image]:
    return {i.id: i for i in session.scalars(select(Image).where(Image.vm_id == vm_id))}


def frozen(session: Session, checkpoint_id: str) -> dict[str, str]:
    """disk id -> frozen image id of one checkpoint."""
    query = select(FrozenImage).where(FrozenImage.checkpoint_id == checkpoint_id)
    return {f.disk_id: f.image_id for f in session.scalars(query)}


def frozen_by_checkpoint(session: Session, vm_id: str) -> dict[str, dict[str, str]]:
    """checkpoint id -> (disk id -> frozen image id) of every checkpoint of a VM, in one query
    (a listing of many checkpoints: not one query each)."""
    query = select(FrozenImage).join(Checkpoint, FrozenImage.checkpoint_id == Checkpoint.id) \
        .where(Checkpoint.vm_id == vm_id)
    found: dict[str, dict[str, str]] = {}
    for row in session.scalars(query):
        found.setdefault(row.checkpoint_id, {})[row.disk_id] = row.image_id
    return found


def hardware(vm_row: Vm) -> HardwareConfig:
    return HardwareConfig.load(vm_row.config)


def disk(session: Session, vm_row: Vm, ref: str) -> Disk:
    found = [d for d in disks(session, vm_row.id).values() if ref and d.id.startswith(ref.lower())]
    if not found:
        raise NotFound(f"VM {vm_row.name!r} has no disk whose id starts with {ref!r}.",
                       hint=f"See its disks with: waymark vm show {vm_row.name}")
    if len(found) > 1:
        raise Ambiguous(f"several disks of {vm_row.name!r} match {ref!r}.",
                        hint="Give a longer id prefix.")
    return found[0]


def vm_matches(session: Session, ref: str) -> bool:
    """Whether any VM (in anyone's scope) has the name ``ref`` or an id starting with it: a
    scoped lookup's 404 for one the caller may not see is then recorded as a refusal."""
    return session.scalars(select(Vm.id).where(
        (Vm.name == ref) | Vm.id.startswith(ref.lower() or "-"))).first() is not None
