"""VM templates, and creating VMs from them (VMM's ``New-SCVMTemplate`` and ``New-SCVirtualMachine
-VMTemplate``).

A template is a hardware profile, boot files, an optional checkpoint type and disk images. Its
images are copies Waymark makes at ``template create`` (``qemu-img convert`` into
``templates/<id>/disk<N>.qcow2``, checksummed, then made read-only), so the files the user gave
may change or go and no VM ever writes a template: a VM's disk is a linked clone (its own overlay
on the template image, which it pins like any file it did not create) or, with ``--full-copy``, a
standalone copy. A template is written in a ``.partial`` folder renamed into place before its
row is committed, so a killed ``template create`` leaves at most a folder that the next one
removes; a template some VM still links to cannot be deleted.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import delete as sql_delete
from sqlalchemy import select
from sqlalchemy.orm import Session

from waymark import durable
from waymark.catalog import db
from waymark.catalog.models import Grant, Image, Profile, Template
from waymark.engine import lookup
from waymark.engine.context import Context
from waymark.engine.journal import now
from waymark.errors import Conflict
from waymark.external import vm_files
from waymark.failpoints import failpoint
from waymark.images import qemu_img
from waymark.model import names, setting_sources
from waymark.model.hardware import Nic, check_firmware
from waymark.model.vocabulary import DeleteAnswer, deleted, gone
from waymark.usecases.library import profiles
from waymark.usecases.vms import definitions as vms

Report = Callable[[str, float], None] | None


def _folder(ctx: Context) -> Path:
    return ctx.home / "templates"


def get(session: Session, name: str) -> Template:
    return db.required(session, Template, name, f"no template {name!r}.",
                       hint="List them: waymark template list")


def view(row: Template, users: list[str] | None = None) -> dict[str, Any]:
    data = {"name": row.name, "profile": row.profile_name, "checkpoint_type": row.checkpoint_type,
            "kernel": row.kernel, "initrd": row.initrd, "append": row.append,
            "folder": row.folder, "disks": row.disks, "firmware": row.firmware or "bios",
            "tpm": bool(row.tpm)}
    return data if users is None else {**data, "vm_names": users}


def _users(session: Any, row: Template) -> list[str]:
    """The VMs whose disks link to the template's images."""
    files = [str(Path(row.folder) / d["file"]) for d in row.disks]
    vm_ids = set(session.scalars(select(Image.vm_id).where(Image.path.in_(files))))
    return sorted(lookup.vm_name(session, v) for v in vm_ids)


def _clean_leftovers(ctx: Context, session: Any) -> None:
    """Folders a killed ``template create`` left (no template names them); under the lock."""
    named = {Path(f).name for f in session.scalars(select(Template.folder))}
    for folder in _folder(ctx).iterdir():
        if folder.is_dir() and folder.name not in named:
            shutil.rmtree(folder)


def create(ctx: Context, name: str, *, profile: str | None, disks: list[Path],
           kernel: str | None = None, initrd: str | None = None, append: str | None = None,
           checkpoint_type: str | None = None, report: Report = None,
           platform: vms.Platform = vms.GENERATION_1) -> dict[str, Any]:
    """A new template (``platform``: the firmware and TPM of the VMs made from it)."""
    name = names.clean(name, what="template name")
    check_firmware(platform.firmware)
    if checkpoint_type is not None:
        vms.check_type(checkpoint_type)
    kernel = vms.check_boot_file(kernel, "--kernel")
    initrd = vms.check_boot_file(initrd, "--initrd")
    formats = [qemu_img.probe_format(path) for path in disks]
    with profiles.locked(ctx):  # the whole time: its folder is a leftover until its row
        with ctx.catalog.session() as session:
            if session.get(Template, name) is not None:
                raise Conflict(f"a template named {name!r} already exists.",
                               hint=f"Change it with: waymark template set {name} ...")
            if profile is not None:
                profiles.get(session, profile)
            _clean_leftovers(ctx, session)
        folder = _folder(ctx) / vms.new_id()
        files, boot = _copy(folder, disks, formats, {"kernel": kernel, "initrd": initrd},
                            report)
        failpoint("template-copied")
        with ctx.catalog.session() as session:
            row = Template(name=name, profile_name=profile, checkpoint_type=checkpoint_type,
                           append=append, folder=str(folder), disks=files, created_at=now(),
                           firmware=platform.firmware, tpm=platform.tpm, **boot)
            session.add(row)
            return view(row, [])


def _copy(folder: Path, disks: list[Path], formats: list[str], boot: dict[str, str | None],
          report: Report) -> tuple[list[dict[str, Any]], dict[str, str | None]]:
    """The images and boot files, copied read-only into ``folder`` (made whole, then renamed
    into place); the disks' records and the boot files' new paths."""
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True)
    files = _copy_disks(partial, disks, formats, report)
    copied = _copy_boot(partial, boot)
    os.replace(partial, folder)
    durable.fsync_dir(folder.parent)
    return files, {k: None if v is None else str(folder / Path(v).name)
                   for k, v in copied.items()}


def _copy_disks(partial: Path, disks: list[Path], formats: list[str], report: Report
                ) -> list[dict[str, Any]]:
    files = []
    for number, (path, fmt) in enumerate(zip(disks, formats, strict=True)):
        target = partial / f"disk{number}.qcow2"
        progress = None if report is None else (lambda f, n=number: report(f"disk {n}", f))
        qemu_img.convert(path, fmt, target, on_progress=progress)
        durable.fsync_file(target)
        os.chmod(target, stat.S_IRUSR)
        files.append({"file": target.name, "format": "qcow2", "source": str(path),
                      "virtual_size": qemu_img.info(target, "qcow2").virtual_size,
                      "sha256": durable.sha256(target)})
    return files


def _copy_boot(folder: Path, files: dict[str, str | None]) -> dict[str, str | None]:
    """The kernel and initrd, copied read-only next to the disks (a template never depends on
    a file the user may change or remove)."""
    copied: dict[str, str | None] = {}
    for key, source in files.items():
        if source is None:
            copied[key] = None
            continue
        copied[key] = str(vm_files.store(Path(source), folder, key).path)
    return copied


def update(ctx: Context, name: str, *, profile: str | None = None,
           checkpoint_type: str | None = None, append: str | None = None) -> dict[str, Any]:
    """Change a template's settings (its images never change); existing VMs keep theirs."""
    with ctx.catalog.session() as session:
        row = get(session, name)
        if profile is not None:
            row.profile_name = profiles.get(session, profile).name
        if checkpoint_type is not None:
            row.checkpoint_type = vms.check_type(checkpoint_type)
        if append is not None:
            row.append = append
        return view(row, _users(session, row))


def show(ctx: Context, name: str) -> dict[str, Any]:
    with ctx.catalog.session() as session:
        row = get(session, name)
        return view(row, _users(session, row))


def listing(ctx: Context) -> list[dict[str, Any]]:
    with ctx.catalog.session() as session:
        rows = session.scalars(select(Template).order_by(Template.name))
        return [view(r, _users(session, r)) for r in rows]


def delete(ctx: Context, name: str) -> DeleteAnswer:
    """Remove a template no VM links to: its row, then its folder."""
    with profiles.locked(ctx):
        with ctx.catalog.session() as session:
            row = get(session, name)
            users = _users(session, row)
            if users:
                raise Conflict(f"template {name!r} is the base of VM(s) {', '.join(users)}.",
                               hint="Delete them first (VMs made with --full-copy do not "
                                    "count).")
            folder = Path(row.folder)
            session.execute(sql_delete(Grant).where(Grant.object_kind == "template",
                                                    Grant.object_id == name))
            session.delete(row)
        shutil.rmtree(folder, ignore_errors=True)
    return deleted(gone("template", name))


# --- VMs from templates -----------------------------------------------------------------------

def new_vm(ctx: Context, name: str, *, explicit: dict[str, Any], template: str | None = None,
           profile: str | None = None, disks: list[vms.DiskSpec] | None = None,
           full_copy: bool = False, kernel: str | None = None, initrd: str | None = None,
           append: str | None = None, checkpoint_dir: str | None = None,
           nics: list[Nic] | None = None, owner_id: str | None = None,
           visible: lookup.Visible = lookup.everything,
           platform: vms.Platform | None = None, cpu_model: str | None = None,
           accel: str = "auto", boot_order: list[str] | None = None) -> str:
    """Create a VM: its settings resolved VM > profile > template > default (their sources
    recorded), the template's disks first as linked clones (or copies), then ``disks``. Holds
    the lock of templates throughout: a template is not deleted under a VM being made.
    ``owner_id``, ``visible``: whose it is, and which VMs they see (:func:`vms.create`);
    ``platform``: its firmware and TPM (None: the template's, else BIOS without a TPM)."""
    with profiles.locked(ctx):
        return _new_vm(ctx, name, explicit, template, profile, disks or [], full_copy,
                       {"kernel": kernel, "initrd": initrd, "append": append,
                        "cpu_model": cpu_model, "accel": accel, "boot_order": boot_order},
                       checkpoint_dir, nics, (owner_id, visible), platform)


def _new_vm(ctx: Context, name: str, explicit: dict[str, Any], template: str | None,
            profile: str | None, disks: list[vms.DiskSpec], full_copy: bool,
            given: dict[str, Any], checkpoint_dir: str | None, nics: list[Nic] | None,
            owner: tuple[str | None, lookup.Visible], platform: vms.Platform | None) -> str:
    explicit = profiles.checked(explicit)
    with ctx.catalog.session() as session:
        chosen = get(session, template) if template is not None else None
        profile = profile or (chosen.profile_name if chosen else None)
        layers = _layers(session, profile, chosen)
        boot = {"kernel": chosen.kernel, "initrd": chosen.initrd, "append": chosen.append} \
            if chosen else {}
        template_disks = [vms.DiskSpec(path=Path(chosen.folder) / d["file"], copy=full_copy)
                          for d in chosen.disks] if chosen else []
        if platform is None:
            platform = vms.Platform(firmware=chosen.firmware or "bios", tpm=bool(chosen.tpm)) \
                if chosen else vms.GENERATION_1
    values, sources = setting_sources.resolve(explicit, *layers)
    origin = {"template": template, "profile": profile, "sources": sources}
    boot = {key: given[key] or boot.get(key) for key in ("kernel", "initrd", "append")}
    return vms.create(ctx, name, memory=values["memory_mib"] << 20, cpus=values["cpus"],
                      disks=template_disks + disks, **boot,
                      checkpoint_type=values["checkpoint_type"],
                      checkpoint_dir=checkpoint_dir, max_checkpoints=values["max_checkpoints"],
                      automatic_checkpoints=values["automatic_checkpoints"], nics=nics,
                      origin=origin, owner_id=owner[0], visible=owner[1], platform=platform,
                      cpu_model=given["cpu_model"], accel=given["accel"] or "auto",
                      boot_order=given["boot_order"])


def _layers(session: Any, profile: str | None, template: Template | None
            ) -> tuple[setting_sources.Layer | None, setting_sources.Layer | None]:
    found: Profile | None = profiles.get(session, profile) if profile else None
    return ((f"profile {found.name}", profiles.view(found)) if found else None,
            (f"template {template.name}", {"checkpoint_type": template.checkpoint_type})
            if template else None)
