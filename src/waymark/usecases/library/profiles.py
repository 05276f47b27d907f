"""Hardware profiles: named settings (CPUs, memory, checkpoint type, limit, automatic
checkpoints) that ``vm create`` and templates copy from (:mod:`waymark.model.setting_sources`)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from waymark import filelock
from waymark.catalog import db
from waymark.catalog.models import Profile, Template
from waymark.engine.context import Context
from waymark.engine.journal import now
from waymark.errors import Busy, Conflict
from waymark.model import names
from waymark.model.vocabulary import DeleteAnswer, deleted, gone
from waymark.usecases.vms import definitions as vms

FIELDS = ("cpus", "memory_mib", "checkpoint_type", "max_checkpoints", "automatic_checkpoints")


def locked(ctx: Context, timeout: float | None = None) -> AbstractContextManager[None]:
    """The lock of profiles and templates: held by whatever adds, deletes or uses one (a
    template's creation and deletion, creating a VM from it, deleting a profile)."""
    folder = ctx.home / "templates"
    folder.mkdir(parents=True, exist_ok=True)
    wait = ctx.settings.lock_timeout if timeout is None else timeout
    return filelock.held(folder / "lock", timeout=wait,
                         busy=lambda: Busy("another command is changing templates or profiles.",
                                           hint="Retry when it finishes."))


def checked(settings: dict[str, Any]) -> dict[str, Any]:
    """Validate the given settings (None = not set); ``memory`` in bytes becomes MiB."""
    out = {k: settings.get(k) for k in FIELDS}
    if settings.get("memory") is not None:
        out["memory_mib"] = vms.check_memory(int(settings["memory"]))
    if out["checkpoint_type"] is not None:
        vms.check_type(out["checkpoint_type"])
    if out["max_checkpoints"] is not None:
        vms.check_limit(out["max_checkpoints"])
    return out


def get(session: Session, name: str) -> Profile:
    return db.required(session, Profile, name, f"no hardware profile {name!r}.",
                       hint="List them: waymark profile list")


def view(row: Profile) -> dict[str, Any]:
    return {"name": row.name, **{k: getattr(row, k) for k in FIELDS}}


def create(ctx: Context, name: str, settings: dict[str, Any]) -> dict[str, Any]:
    name = names.clean(name, what="profile name")
    values = checked(settings)
    with ctx.catalog.session() as session:
        if session.get(Profile, name) is not None:
            raise Conflict(f"a hardware profile named {name!r} already exists.",
                           hint=f"Change it with: waymark profile set {name} ...")
        row = Profile(name=name, **values, created_at=now(), updated_at=now())
        session.add(row)
        return view(row)


def update(ctx: Context, name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Change the given settings; VMs created earlier keep theirs."""
    values = {k: v for k, v in checked(settings).items() if v is not None}
    with ctx.catalog.session() as session:
        row = get(session, name)
        for key, value in values.items():
            setattr(row, key, value)
        row.updated_at = now()
        return view(row)


def show(ctx: Context, name: str) -> dict[str, Any]:
    with ctx.catalog.session() as session:
        row = get(session, name)
        used = session.scalars(select(Template.name).where(Template.profile_name == name))
        return {**view(row), "templates": sorted(used)}


def listing(ctx: Context) -> list[dict[str, Any]]:
    with ctx.catalog.session() as session:
        return [view(r) for r in session.scalars(select(Profile).order_by(Profile.name))]


def delete(ctx: Context, name: str) -> DeleteAnswer:
    """Remove a profile no template uses (VMs keep the settings they copied)."""
    with locked(ctx), ctx.catalog.session() as session:
        row = get(session, name)
        used = sorted(session.scalars(select(Template.name)
                                      .where(Template.profile_name == name)))
        if used:
            raise Conflict(f"hardware profile {name!r} is used by template(s) "
                           f"{', '.join(used)}.",
                           hint="Give them another profile (waymark template set T --profile "
                                "P) or delete them first.")
        session.delete(row)
    return deleted(gone("profile", name))
