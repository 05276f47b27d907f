"""VMs: list, create from a template, show, change, power, delete."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from waymark.api import schemas
from waymark.engine.running import power
from waymark.errors import Forbidden, InvalidInput, NotFound
from waymark.http.security import (
    CallerDep,
    ContextDep,
    OutOfScope,
    in_scope,
    redact,
    require,
    vm_for,
)
from waymark.model import policy
from waymark.model.hardware import CPU_MODEL_NAME, MAX_APPEND
from waymark.model.policy import Decision
from waymark.model.units import parse_size
from waymark.model.vocabulary import DeleteAnswer
from waymark.usecases import views
from waymark.usecases.library import templates
from waymark.usecases.vms import definitions as vm_ops
from waymark.usecases.vms import media as media_ops

router = APIRouter(tags=["vms"], route_class=schemas.Route)
CheckpointType = Literal["disabled", "production", "productiononly", "standard"]
Accelerator = Literal["auto", "kvm", "tcg"]
CPU_MODEL = Field(default=None, max_length=64, pattern=CPU_MODEL_NAME.pattern,
                  description="A CPU model this host's QEMU offers (qemu-system-x86_64 -cpu "
                              "help); pinned: a memory state restores only on it")
BootDevice = Literal["disk", "cdrom", "network"]


@router.get("/vms", response_model=list[schemas.VmRow])
def vm_list(request: Request, caller: CallerDep, ctx: ContextDep) -> Response:
    """The VMs the caller may see."""
    # the server's catalog rows, kept until a commit (none without the app's lifespan: a
    # test's client that never started it)
    entries = getattr(request.app.state, "vm_entries", None)
    return schemas.listing(views.vm_list(ctx, in_scope(caller.who), entries))


class NewVm(BaseModel):
    name: str = Field(min_length=1, max_length=99)
    template: str = Field(min_length=1, max_length=99)
    profile: str | None = Field(default=None, max_length=99)
    full_copy: bool = False
    memory: str | None = Field(default=None, max_length=16, examples=["512M"])
    cpus: int | None = Field(default=None, ge=1, le=64)
    checkpoint_type: CheckpointType | None = None
    max_checkpoints: int | None = Field(default=None, ge=1, le=1000)
    automatic_checkpoints: bool | None = None
    cpu_model: str | None = CPU_MODEL
    accel: Accelerator = "auto"
    boot_order: list[BootDevice] | None = Field(
        default=None, max_length=3, description="The devices to boot from, in order, each "
                                                "once (default: disk, cdrom)")


@router.post("/vms", status_code=201, response_model=schemas.Vm)
def vm_create(body: NewVm, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """A VM from a template (self-service users: a template granted to them); the caller owns
    it, and it counts against their quota (409 quota_exceeded beyond it: nothing is made). Its
    name may not be one a VM the caller owns or may see has (409); a VM they may not see never
    clashes (names are unique per owner), so the answer tells nothing about it."""
    require(caller.who, "vm.create")
    if policy.may_use_template(caller.who, body.template) is not Decision.ALLOW:
        exists = any(t["name"] == body.template for t in templates.listing(ctx))
        raise (OutOfScope if exists else NotFound)(  # the same answer either way
            f"no template {body.template!r}.",
            hint="List the templates you may use: GET /api/templates")
    if body.profile is not None and not caller.who.admin:
        raise Forbidden("only administrators choose a hardware profile; the template's is used.")
    explicit = {"memory": parse_size(body.memory, what="memory") if body.memory else None,
                "cpus": body.cpus, "checkpoint_type": body.checkpoint_type,
                "max_checkpoints": body.max_checkpoints,
                "automatic_checkpoints": body.automatic_checkpoints}
    vm_id = templates.new_vm(ctx, body.name, explicit=explicit, template=body.template,
                             profile=body.profile, disks=[], full_copy=body.full_copy,
                             owner_id=caller.who.user_id, visible=in_scope(caller.who),
                             cpu_model=body.cpu_model, accel=body.accel,
                             boot_order=_order(body.boot_order))
    return redact(caller.who, views.vm_show(ctx, vm_id))


@router.get("/vms/{vm}", response_model=schemas.Vm)
def vm_show(vm: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    row = vm_for(ctx, caller.who, "vm.view", vm)
    return redact(caller.who, views.vm_show(ctx, row.id))


@router.get("/vms/{vm}/summary", response_model=schemas.VmSummary)
def vm_summary(vm: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """Hyper-V Manager's Summary: memory, CPUs, firmware and TPM, CPU model and accelerator,
    the checkpoint type and where it comes from, disks (size, space used, chain depth), the CD
    drive, and for a running VM its uptime and its QEMU's CPU and memory use (CPU measured
    over a quarter second: the answer takes that long)."""
    row = vm_for(ctx, caller.who, "vm.view", vm)
    return redact(caller.who, views.vm_summary(ctx, row.id))


def _order(devices: list[BootDevice] | None) -> list[str] | None:
    return None if devices is None else list(devices)


class VmSettings(BaseModel):
    memory: str | None = Field(default=None, max_length=16)
    cpus: int | None = Field(default=None, ge=1, le=64)
    checkpoint_type: CheckpointType | None = None
    max_checkpoints: int | None = Field(default=None, ge=1, le=1000)
    automatic_checkpoints: bool | None = None
    checkpoint_dir: str | None = Field(default=None, max_length=4096,
                                       description="Administrators only: a host folder.")
    cpu_model: str | None = CPU_MODEL
    accel: Accelerator | None = None
    kernel: str | None = Field(default=None, max_length=4096,
                               description="Administrators only: a host file to boot directly.")
    initrd: str | None = Field(default=None, max_length=4096,
                               description="Administrators only: a host file ('' drops it).")
    append: str | None = Field(default=None, max_length=MAX_APPEND,
                               description="The kernel command line ('' drops it).")
    no_kernel: bool = Field(default=False, description="Drop the kernel, initrd and command "
                                                       "line: the VM boots from its disk.")
    boot_order: list[BootDevice] | None = Field(
        default=None, max_length=3, description="The devices to boot from, in order, each "
                                                "once; takes effect at the next boot")
    discard_saved_state: bool = False


@router.patch("/vms/{vm}", response_model=schemas.Vm)
def vm_set(vm: str, body: VmSettings, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    row = vm_for(ctx, caller.who, "vm.set", vm)
    if body.checkpoint_dir is not None and not caller.who.admin:
        raise Forbidden("only administrators choose host folders.")
    if (body.kernel or body.initrd) and not caller.who.admin:
        raise Forbidden("only administrators choose the host files a VM boots.",
                        hint="Ask an administrator, or boot the VM from its disk (no_kernel).")
    boot = vm_ops.BootChange(body.kernel, body.initrd, body.append, body.no_kernel)
    vm_ops.set_settings(ctx, row.id, memory=parse_size(body.memory, what="memory")
                        if body.memory else None, cpus=body.cpus,
                        checkpoint_type=body.checkpoint_type,
                        checkpoint_dir=body.checkpoint_dir,
                        max_checkpoints=body.max_checkpoints,
                        discard_saved=body.discard_saved_state,
                        automatic_checkpoints=body.automatic_checkpoints,
                        cpu_model=body.cpu_model, accel=body.accel,
                        boot=boot if boot.asked() else None,
                        boot_order=_order(body.boot_order))
    return redact(caller.who, views.vm_show(ctx, row.id))


class Media(BaseModel):
    """An ISO for the CD drive: a file of a ``media`` location (``location`` and ``file``), or
    for administrators any ISO on the host (``path``)."""

    location: str | None = Field(default=None, max_length=64, examples=["isos"])
    file: str | None = Field(default=None, max_length=255, examples=["debian-12.iso"])
    path: str | None = Field(default=None, max_length=4096,
                             description="Administrators only: an ISO on the host.")


def _media_path(ctx: ContextDep, caller: CallerDep, body: Media) -> str:
    if body.path is not None:
        if not caller.who.admin:
            raise Forbidden("only administrators name host files; name an ISO of a media "
                            "location (location and file).")
        if body.location is not None or body.file is not None:
            raise InvalidInput("give either path or location and file.")
        return body.path
    if body.location is None or body.file is None:
        raise InvalidInput("name the ISO: location and file (administrators: or path).",
                           hint="List the media locations: GET /api/locations")
    return media_ops.in_location(ctx, body.location, body.file)


@router.post("/vms/{vm}/media", response_model=schemas.Vm)
def media_insert(vm: str, body: Media, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """Put an ISO in the VM's CD drive (replacing what is in), whether it is off, running or
    paused (a saved VM: 409). A change of the VM's settings: its owner's and administrators'.
    A file that is not there is 404, one that is no ISO 422: nothing changes."""
    row = vm_for(ctx, caller.who, "vm.set", vm)
    media_ops.insert(ctx, row.id, _media_path(ctx, caller, body))
    return redact(caller.who, views.vm_show(ctx, row.id))


@router.delete("/vms/{vm}/media", response_model=schemas.Vm)
def media_eject(vm: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """Empty the VM's CD drive (a running guest's locked tray is opened by force)."""
    row = vm_for(ctx, caller.who, "vm.set", vm)
    media_ops.eject(ctx, row.id)
    return redact(caller.who, views.vm_show(ctx, row.id))


@router.get("/vms/{vm}/status", response_model=schemas.VmStatus)
def vm_status(vm: str, caller: CallerDep, ctx: ContextDep) -> dict[str, Any]:
    """State, process, accelerator in use (and why), uptime, whether the guest agent answers,
    and ``silence`` when a running guest shows no sign of life."""
    row = vm_for(ctx, caller.who, "vm.view", vm)
    return redact(caller.who, asyncio.run(power.status(ctx, row.id)))


@router.delete("/vms/{vm}", response_model=schemas.Deleted)
def vm_delete(vm: str, caller: CallerDep, ctx: ContextDep, yes: bool = False
              ) -> DeleteAnswer:
    """Delete the VM with its checkpoints and the files Waymark made (``yes`` confirms)."""
    row = vm_for(ctx, caller.who, "vm.delete", vm)
    return vm_ops.delete(ctx, row.id, yes=yes)


class PowerOptions(BaseModel):
    force: bool = Field(default=False, description="stop: power off instead of shutting down")
    timeout: float = Field(default=60.0, gt=0, le=3600, description="stop: seconds to wait")
    fresh: bool = Field(default=False, description="start: boot fresh, discarding a saved "
                                                   "state")


def _power_route(action: str, summary: str, answer: type[schemas.Body]) -> None:
    def handler(vm: str, caller: CallerDep, ctx: ContextDep,
                body: PowerOptions | None = None) -> dict[str, Any]:
        row = vm_for(ctx, caller.who, "vm.power", vm)
        options = body or PowerOptions()
        chosen: dict[str, Any] = {}
        if action == "start":
            chosen = {"fresh": options.fresh}
        elif action == "stop":
            chosen = {"force": options.force, "timeout": options.timeout}
        return redact(caller.who, asyncio.run(power.act(ctx, row.id, action, **chosen)))

    router.add_api_route(f"/vms/{{vm}}/{action}", handler, methods=["POST"], summary=summary,
                         name=f"vm_{action}", response_model=answer)


for _action, _summary, _answer in (
        ("start", "Start (a saved VM resumes where it was saved)", schemas.VmStatus),
        ("stop", "Shut down (force: power off)", schemas.VmStopped),
        ("save", "Save", schemas.VmSaved), ("pause", "Pause", schemas.VmState),
        ("resume", "Resume", schemas.VmState)):
    _power_route(_action, _summary, _answer)
