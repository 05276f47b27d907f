"""Catalog lookups shared by the use cases: resolve references, load a VM's pieces."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from waymark.catalog import db
from waymark.catalog.models import Checkpoint, Disk, FrozenImage, Image, Vm
from waymark.catalog.reads import Reader
from waymark.engine import reading
from waymark.errors import Ambiguous, NotFound
from waymark.model import tree
from waymark.model.hardware import HardwareConfig

Visible = reading.Visible
everything = reading.everything


def vm(session: Session, ref: str, visible: Visible = everything) -> Vm:
    """:func:`waymark.engine.reading.vm` (the one resolution of what a person typed) in this
    session's transaction, as the ORM's row."""
    return session.get_one(Vm, reading.vm(reader_of(session), ref, visible).id)


def visible_names(session: Session, visible: Visible = everything) -> list[str]:
    """The names of the VMs ``visible`` accepts (what a "did you mean" may offer)."""
    return reading.visible_names(reader_of(session), visible)


def reader_of(session: Session) -> Reader:
    """The read path's reader on this session's own connection (and transaction)."""
    session.flush()  # what the session changed is visible to its own reads, as to its queries
    bind = session.connection()
    return Reader(bind.connection.driver_connection, bind.dialect.paramstyle)


def vm_by_id(session: Session, vm_id: str) -> Vm:
    """The VM with this id (a face resolved the reference once, :func:`vm`); never a name."""
    return db.required(session, Vm, vm_id, f"no VM has the id {vm_id!r} (it was deleted "
                       "meanwhile).", hint="List them with: waymark vm list")


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
