"""Registered locations: folders an administrator names (``waymark location add``), so that
API users choose a backup repository, an export folder, a library or an ISO folder (``media``)
by name and never name a host path (the issue's rule for non-administrators)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import select

from waymark.catalog.models import Location
from waymark.engine.context import Context
from waymark.engine.journal import now
from waymark.errors import Conflict, InvalidInput, NotFound
from waymark.model import names
from waymark.model.vocabulary import DeleteAnswer, deleted, gone

MEDIA = "media"  # ISOs API users may put in their VMs' CD drives (waymark.usecases.vms.media)
KINDS = ("repository", "export", "library", MEDIA)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _view(row: Location) -> dict[str, Any]:
    return {"name": row.name, "kind": row.kind, "path": row.path}


def add(ctx: Context, name: str, kind: str, path: Path) -> dict[str, Any]:
    name = names.clean(name, what="location name")
    if not NAME.match(name):
        raise InvalidInput(f"{name!r} is not a valid location name.",
                           hint="Use letters, digits and . _ - (up to 64 characters).")
    if kind not in KINDS:
        raise InvalidInput(f"unknown location kind {kind!r}.", hint=f"Use one of: {KINDS}.")
    folder = path.expanduser().absolute()
    if not folder.is_dir():
        raise NotFound(f"{folder} is not a folder.",
                       hint="Create it (and init it: waymark backup repo init, waymark library "
                            "init) first.")
    with ctx.catalog.session() as session:
        if session.get(Location, name) is not None:
            raise Conflict(f"a location named {name!r} already exists.",
                           hint="Choose another name, or remove it first.")
        row = Location(name=name, kind=kind, path=str(folder), created_at=now())
        session.add(row)
        return _view(row)


def remove(ctx: Context, name: str) -> DeleteAnswer:
    with ctx.catalog.session() as session:
        session.delete(get(session, name))
    return deleted(gone("location", name))


def get(session: Any, name: str, kind: str | None = None) -> Location:
    row = session.get(Location, name)
    if row is None or (kind is not None and row.kind != kind):
        raise NotFound(f"no {kind or 'location'} named {name!r} is registered.",
                       hint="List them: waymark location list (an administrator adds them)")
    assert isinstance(row, Location)
    return row


def path(ctx: Context, name: str, kind: str) -> Path:
    with ctx.catalog.session() as session:
        return Path(get(session, name, kind).path)


def folders(ctx: Context, kind: str) -> list[Path]:
    """The folders of every location of ``kind``."""
    with ctx.catalog.session() as session:
        return [Path(p) for p in session.scalars(select(Location.path)
                                                 .where(Location.kind == kind))]


def listing(ctx: Context) -> list[dict[str, Any]]:
    with ctx.catalog.session() as session:
        return [_view(r) for r in session.scalars(select(Location).order_by(Location.name))]
