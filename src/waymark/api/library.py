"""Hardware profiles, templates, registered locations and library shares. Templates are
visible to everyone in scope (self-service users: the ones granted to them); the rest is
administrators' (read-only users may read profiles)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from waymark.api import schemas
from waymark.errors import NotFound
from waymark.http.security import CallerDep, ContextDep, OutOfScope, require, vm_for
from waymark.model import policy
from waymark.model.policy import Decision
from waymark.model.units import parse_size
from waymark.model.vocabulary import DeleteAnswer
from waymark.usecases.access import locations
from waymark.usecases.library import profiles, templates
from waymark.usecases.library import store_deploy as library
from waymark.usecases.vms import definitions as vms

router = APIRouter(tags=["library"], route_class=schemas.Route)
CheckpointType = Literal["disabled", "production", "productiononly", "standard"]


class ProfileSettings(BaseModel):
    cpus: int | None = Field(default=None, ge=1, le=64)
    memory: str | None = Field(default=None, max_length=16, examples=["1G"])
    checkpoint_type: CheckpointType | None = None
    max_checkpoints: int | None = Field(default=None, ge=1, le=1000)
    automatic_checkpoints: bool | None = None

    def settings(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "checkpoint_type": self.checkpoint_type,
                "max_checkpoints": self.max_checkpoints,
                "automatic_checkpoints": self.automatic_checkpoints,
                "memory": parse_size(self.memory, what="memory") if self.memory else None}


class NewProfile(ProfileSettings):
    name: str = Field(min_length=1, max_length=99)


@router.get("/profiles", response_model=list[schemas.Profile])
def profile_list(caller: CallerDep, ctx: ContextDep) -> list[dict[str, Any]]:
    require(caller.who, "profile.view")
    return profiles.listing(ctx)


@router.post("/profiles", status_code=201, response_model=schemas.Profile)
def profile_create(body: NewProfile, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    require(caller.who, "profile.manage")
    return profiles.create(ctx, body.name, body.settings())


@router.patch("/profiles/{name}", response_model=schemas.Profile)
def profile_set(name: str, body: ProfileSettings, caller: CallerDep, ctx: ContextDep
                ) -> dict[str, Any]:
    require(caller.who, "profile.manage")
    return profiles.update(ctx, name, body.settings())


@router.delete("/profiles/{name}", response_model=schemas.Deleted)
def profile_delete(name: str, caller: CallerDep, ctx: ContextDep) -> DeleteAnswer:
    require(caller.who, "profile.manage")
    return profiles.delete(ctx, name)


def _template_view(t: dict[str, Any], admin: bool) -> dict[str, Any]:
    """Non-administrators see a template's settings, not its host paths or users."""
    if admin:
        return t
    return {k: t[k] for k in ("name", "profile", "checkpoint_type", "firmware", "tpm")} | {
        "disks": [{"virtual_size": d.get("virtual_size")} for d in t["disks"]]}


@router.get("/templates", response_model=list[schemas.Template])
def template_list(caller: CallerDep, ctx: ContextDep) -> list[dict[str, Any]]:
    """The templates the caller may create VMs from (administrators: all)."""
    who = caller.who
    return [_template_view(t, who.admin) for t in templates.listing(ctx)
            if policy.may_use_template(who, t["name"]) is Decision.ALLOW
            or who.role == "read-only"]


@router.get("/templates/{name}", response_model=schemas.Template)
def template_show(name: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    who = caller.who
    if policy.may_use_template(who, name) is not Decision.ALLOW and who.role != "read-only":
        exists = any(t["name"] == name for t in templates.listing(ctx))
        raise (OutOfScope if exists else NotFound)(f"no template {name!r}.",
                                                   hint="List them: GET /api/templates")
    return _template_view(templates.show(ctx, name), who.admin)


class NewTemplate(BaseModel):
    name: str = Field(min_length=1, max_length=99)
    profile: str | None = Field(default=None, max_length=99)
    disks: list[str] = Field(min_length=1, max_length=16, description="Host paths of images.")
    kernel: str | None = Field(default=None, max_length=4096)
    initrd: str | None = Field(default=None, max_length=4096)
    append: str | None = Field(default=None, max_length=4096)
    checkpoint_type: CheckpointType | None = None
    firmware: Literal["bios", "uefi", "uefi-secure"] = "bios"
    tpm: bool = False


@router.post("/templates", status_code=201, response_model=schemas.Template)
def template_create(body: NewTemplate, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    require(caller.who, "template.manage")
    return templates.create(ctx, body.name, profile=body.profile,
                            disks=[Path(d) for d in body.disks], kernel=body.kernel,
                            initrd=body.initrd, append=body.append,
                            checkpoint_type=body.checkpoint_type,
                            platform=vms.Platform(firmware=body.firmware, tpm=body.tpm))


class TemplateSettings(BaseModel):
    profile: str | None = Field(default=None, max_length=99)
    checkpoint_type: CheckpointType | None = None
    append: str | None = Field(default=None, max_length=4096)


@router.patch("/templates/{name}", response_model=schemas.Template)
def template_set(name: str, body: TemplateSettings, caller: CallerDep, ctx: ContextDep
                 ) -> dict[str, Any]:
    require(caller.who, "template.manage")
    return templates.update(ctx, name, profile=body.profile,
                            checkpoint_type=body.checkpoint_type, append=body.append)


@router.delete("/templates/{name}", response_model=schemas.Deleted)
def template_delete(name: str, caller: CallerDep, ctx: ContextDep) -> DeleteAnswer:
    require(caller.who, "template.manage")
    return templates.delete(ctx, name)


@router.get("/locations", response_model=list[schemas.Location])
def location_list(caller: CallerDep, ctx: ContextDep) -> list[dict[str, Any]]:
    """Named folders; non-administrators see names and kinds, never paths."""
    rows = locations.listing(ctx)
    return rows if caller.who.admin else [{"name": r["name"], "kind": r["kind"]} for r in rows]


class NewLocation(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    kind: Literal["repository", "export", "library", "media"]
    path: str = Field(min_length=1, max_length=4096)


@router.post("/locations", status_code=201, response_model=schemas.Location)
def location_add(body: NewLocation, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    require(caller.who, "location.manage")
    return locations.add(ctx, body.name, body.kind, Path(body.path))


@router.delete("/locations/{name}", response_model=schemas.Deleted)
def location_remove(name: str, caller: CallerDep, ctx: ContextDep) -> DeleteAnswer:
    require(caller.who, "location.manage")
    return locations.remove(ctx, name)


@router.get("/library/{name}", response_model=schemas.Library)
def library_list(name: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """What the registered library ``name`` holds, each VM with its checkpoint tree."""
    require(caller.who, "library.manage")
    return library.listing(ctx, locations.path(ctx, name, "library"))


class Store(BaseModel):
    library: str = Field(min_length=1, max_length=64)


@router.post("/vms/{vm}/store", response_model=schemas.Stored)
def vm_store(vm: str, body: Store, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """Move the VM (off or saved) with its checkpoints into a library."""
    require(caller.who, "library.manage")
    row = vm_for(ctx, caller.who, "vm.view", vm)
    return library.store(ctx, row.id, locations.path(ctx, body.library, "library"))


class Deploy(BaseModel):
    vm: str = Field(min_length=1, max_length=99, description="The stored VM's name or id.")


@router.post("/library/{name}/deploy", status_code=201, response_model=schemas.Deployed)
def vm_deploy(name: str, body: Deploy, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """Bring a stored VM back onto this host, checkpoints intact."""
    require(caller.who, "library.manage")
    return library.deploy(ctx, body.vm, locations.path(ctx, name, "library"))
