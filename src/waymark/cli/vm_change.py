"""``waymark vm``'s commands that change VMs: define, set, rename, delete, disks, the CD drive,
import, store and deploy. :mod:`waymark.cli.vm` lists them in its group, which loads this
module only when one of them runs (its listing and showing need only the read models)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from waymark.cli.main import face
from waymark.cli.output import StepProgress, emit, fraction_progress, interactive, json_option
from waymark.config import ACCELERATORS
from waymark.errors import ConsentRequired, InvalidInput, NotFound
from waymark.external import libvirt_domain
from waymark.model.hardware import (
    CHECKPOINT_TYPES,
    DEFAULT_BOOT_ORDER,
    DEFAULT_CPU_MODEL,
    FIRMWARE_KINDS,
    parse_boot_order,
)
from waymark.model.units import human, parse_size
from waymark.usecases import views
from waymark.usecases.library import store_deploy as library
from waymark.usecases.library import templates
from waymark.usecases.vms import bundles, chains, from_libvirt
from waymark.usecases.vms import definitions as vms
from waymark.usecases.vms import media as media_ops

TYPES = click.Choice(CHECKPOINT_TYPES)
CPU_HELP = ("A CPU model this host's QEMU offers (qemu-system-x86_64 -cpu help), pinned: a "
            "memory state restores only on the model it was taken on.")
ACCEL_HELP = ("kvm, tcg, or auto: this host's WAYMARK_ACCEL, else KVM when a Linux kernel "
              "boots under it (probed), else TCG.")


def _memory(value: str | None) -> int | None:
    return None if value is None else parse_size(value, what="memory size", default_unit="M")


def _boot(value: str | None) -> list[str] | None:
    return None if value is None else parse_boot_order(value)


BOOT = click.option("--boot", metavar="DEV,DEV...",
                    help="Boot order: disk (the first disk), cdrom (the CD drive), network (the "
                         "first NIC); devices left out are never booted.  [default: "
                         f"{','.join(DEFAULT_BOOT_ORDER)}]")


@click.command("create")
@click.argument("name")
@click.option("--template", metavar="T", help="Create it from a template: its disks (linked "
                                              "clones), boot files, profile and settings.")
@click.option("--profile", metavar="P", help="A hardware profile (overrides the template's).")
@click.option("--full-copy", is_flag=True,
              help="The template's disks as standalone copies, not linked clones.")
@click.option("--memory", help="Memory (M, G suffixes)  [default: profile, else 512M]")
@click.option("--cpus", type=click.IntRange(1, 64), help="[default: profile, else 1]")
@click.option("--disk", "disks", multiple=True, metavar="SIZE|PATH[,passthrough=on]",
              help="A new disk of SIZE, or an existing qcow2/raw file (never written: it "
                   "becomes the read-only base of an overlay). Repeatable.")
@click.option("--kernel", metavar="FILE", help="Boot this kernel directly.")
@click.option("--initrd", metavar="FILE")
@click.option("--append", metavar="CMDLINE", help="Kernel command line.")
@click.option("--checkpoint-type", type=TYPES,
              help="[default: profile, else template, else production]")
@click.option("--checkpoint-dir", metavar="DIR", help="Folder for checkpoint files.")
@click.option("--max-checkpoints", type=int, help="[default: profile, else 50]")
@click.option("--automatic-checkpoints", type=click.Choice(["on", "off"]),
              help="[default: profile, else off]")
@click.option("--nic", "nics", multiple=True, metavar="user[,hostfwd=R]|bridge=BR|none",
              help="A virtio NIC (default: one user-mode NIC). Repeatable. BR: a Linux "
                   "interface name (1-15 of A-Za-z0-9_.-); R: [tcp|udp]:[ADDR]:PORT-[ADDR]:PORT.")
@click.option("--firmware", type=click.Choice(FIRMWARE_KINDS),
              help="uefi: OVMF with the VM's own variable store (Hyper-V's Generation 2); "
                   "uefi-secure: with Secure Boot and Microsoft's keys.  [default: the "
                   "template's, else bios]")
@click.option("--tpm", type=click.Choice(["on", "off"]),
              help="A TPM 2.0 whose state the VM owns (BitLocker, Windows 11).  [default: the "
                   "template's, else off]")
@click.option("--cpu", "cpu_model", metavar="MODEL",
              help=f"{CPU_HELP}  [default: {DEFAULT_CPU_MODEL}]")
@click.option("--accel", type=click.Choice(ACCELERATORS), default="auto", show_default=True,
              help=ACCEL_HELP)
@BOOT
@json_option
def create(name: str, template: str | None, profile: str | None, full_copy: bool,
           memory: str | None, cpus: int | None, disks: tuple[str, ...], kernel: str | None,
           initrd: str | None, append: str | None, checkpoint_type: str | None,
           checkpoint_dir: str | None, max_checkpoints: int | None,
           automatic_checkpoints: str | None, nics: tuple[str, ...], firmware: str | None,
           tpm: str | None, cpu_model: str | None, accel: str, boot: str | None,
           as_json: bool) -> None:
    """Define a new VM (it is off). Each setting comes from its option, else the hardware
    profile, else the template, else the default; `vm show` says which."""
    if full_copy and template is None:
        raise InvalidInput("--full-copy copies a template's disks.",
                           hint="Add --template T, or leave --full-copy out.")
    specs = [vms.DiskSpec.parse(d) for d in disks]
    boot_order = _boot(boot)
    nic_list = None if not nics else [n for n in map(vms.parse_nic, nics) if n is not None]
    ctx = face().ctx
    explicit = {"memory": _memory(memory), "cpus": cpus, "checkpoint_type": checkpoint_type,
                "max_checkpoints": max_checkpoints,
                "automatic_checkpoints": None if automatic_checkpoints is None
                else automatic_checkpoints == "on"}
    vm_id = templates.new_vm(ctx, name, explicit=explicit, template=template, profile=profile,
                             disks=specs, full_copy=full_copy, kernel=kernel, initrd=initrd,
                             append=append, checkpoint_dir=checkpoint_dir, nics=nic_list,
                             platform=platform(firmware, tpm, template),
                             cpu_model=cpu_model, accel=accel, boot_order=boot_order)
    shown = views.vm_show(ctx, vm_id)
    source = f" from template {template}" if template else ""
    emit(as_json, shown, [f"Created VM {name} ({vm_id[:12]}){source} with "
                          f"{len(shown['disks'])} disk(s)."])


def platform(firmware: str | None, tpm: str | None, template: str | None) -> vms.Platform | None:
    """The firmware and TPM asked for (None: the template's); one alone keeps the other's
    default."""
    if firmware is None and tpm is None and template is not None:
        return None
    if template is not None:
        raise InvalidInput("--firmware and --tpm come from the template.",
                           hint="Leave them out, or make a template with the platform you want.")
    return vms.Platform(firmware=firmware or "bios", tpm=tpm == "on")


DISCARD_SAVED = click.option(
    "--discard-saved-state", is_flag=True,
    help="A saved VM: change its hardware anyway; its saved memory is lost.")


@click.command("set")
@click.argument("vm_ref", metavar="VM")
@click.option("--memory")
@click.option("--cpus", type=click.IntRange(1, 64))
@click.option("--checkpoint-type", type=TYPES)
@click.option("--checkpoint-dir", metavar="DIR")
@click.option("--max-checkpoints", type=int)
@click.option("--automatic-checkpoints", type=click.Choice(["on", "off"]),
              help="A checkpoint at each start, deleted after a clean shutdown.")
@click.option("--cpu", "cpu_model", metavar="MODEL", help=CPU_HELP)
@click.option("--accel", type=click.Choice(ACCELERATORS), help=ACCEL_HELP)
@click.option("--kernel", metavar="FILE", help="Boot this kernel directly.")
@click.option("--initrd", metavar="FILE", help="Its initrd ('' drops it).")
@click.option("--append", metavar="CMDLINE", help="Kernel command line ('' drops it).")
@click.option("--no-kernel", is_flag=True,
              help="Drop the kernel, initrd and command line: boot from the VM's disk.")
@BOOT
@DISCARD_SAVED
@click.option("--consolidate", type=click.Choice(["on", "off"]),
              help="Keep Now's chain consolidated, two hops whatever the number of "
                   "checkpoints, at the cost of about one copy of the disk's data (off: "
                   "that copy is deleted).")
@json_option
def set_(vm_ref: str, memory: str | None, cpus: int | None, checkpoint_type: str | None,
         checkpoint_dir: str | None, max_checkpoints: int | None,
         automatic_checkpoints: str | None, cpu_model: str | None, accel: str | None,
         kernel: str | None, initrd: str | None, append: str | None, no_kernel: bool,
         boot: str | None, discard_saved_state: bool, consolidate: str | None,
         as_json: bool) -> None:
    """Change a VM's settings (memory, CPUs, CPU model, accelerator and boot files only while
    it is off; the boot order at any time, for its next boot)."""
    ctx, vm_id = face().ctx, face().vm_id(vm_ref)
    boot_files = vms.BootChange(kernel, initrd, append, no_kernel)
    vms.set_settings(ctx, vm_id, memory=_memory(memory), cpus=cpus,
                     checkpoint_type=checkpoint_type, checkpoint_dir=checkpoint_dir,
                     max_checkpoints=max_checkpoints, discard_saved=discard_saved_state,
                     automatic_checkpoints=None if automatic_checkpoints is None
                     else automatic_checkpoints == "on", cpu_model=cpu_model, accel=accel,
                     boot=boot_files if boot_files.asked() else None, boot_order=_boot(boot))
    if consolidate is not None:
        chains.set_enabled(ctx, vm_id, consolidate == "on")
    data = views.vm_show(ctx, vm_id)
    emit(as_json, data, [f"Updated VM {data['name']}."])


@click.command("consolidate")
@click.argument("vm_ref", metavar="VM")
@json_option
def consolidate(vm_ref: str, as_json: bool) -> None:
    """Consolidate Now's chain now (a VM that is off): reads of Now then stop after two
    hops, whatever the number of checkpoints. Waymark also does it in the background."""
    done = chains.consolidate(face().ctx, face().vm_id(vm_ref))
    emit(as_json, {"disks": done},
         [f"disk {d['disk_id'][:12]}: {d['action']}"
          + (f" ({d['layers']} layer(s))" if d["layers"] else "")
          + (f": {d['reason']}" if d["reason"] else "") for d in done] or ["No disk to do."])


@click.command("rename")
@click.argument("vm_ref", metavar="VM")
@click.argument("new_name")
@json_option
def rename(vm_ref: str, new_name: str, as_json: bool) -> None:
    """Give a VM a new name (its id, files and checkpoints stay)."""
    vm_id = vms.rename(face().ctx, face().vm_id(vm_ref), new_name)
    emit(as_json, {"id": vm_id, "name": new_name}, [f"Renamed VM {vm_ref} to {new_name}."])


@click.command("delete")
@click.argument("vm_ref", metavar="VM")
@click.option("--yes", is_flag=True, help="Also delete its checkpoints and disk images.")
@json_option
def delete(vm_ref: str, yes: bool, as_json: bool) -> None:
    """Delete a VM with its checkpoints and the files Waymark made (your own files stay)."""
    ctx, vm_id = face().ctx, face().vm_id(vm_ref)
    try:
        done = vms.delete(ctx, vm_id, yes=yes)
    except ConsentRequired as err:
        if not interactive():
            raise
        click.confirm(f"{err.message} Delete it?", abort=True)
        done = vms.delete(ctx, vm_id, yes=True)
    emit(as_json, done, [f"Deleted VM {g['name']}." for g in done["deleted"]])


@click.group("disk")
def disk() -> None:
    """Attach and detach disks."""


@disk.command("add")
@click.argument("vm_ref", metavar="VM")
@click.argument("spec", metavar="SIZE|PATH[,passthrough=on]")
@DISCARD_SAVED
@json_option
def disk_add(vm_ref: str, spec: str, discard_saved_state: bool, as_json: bool) -> None:
    """Attach a new disk of SIZE, or an existing image file (kept read-only)."""
    ctx, vm_id = face().ctx, face().vm_id(vm_ref)
    disk_id = vms.add_disk(ctx, vm_id, vms.DiskSpec.parse(spec), discard_saved_state)
    data = views.vm_show(ctx, vm_id)
    shown = next(d for d in data["disks"] if d["id"] == disk_id)
    emit(as_json, shown, [f"Attached disk {disk_id[:12]} to {data['name']}."])


@disk.command("remove")
@click.argument("vm_ref", metavar="VM")
@click.argument("disk_ref", metavar="DISK")
@DISCARD_SAVED
@json_option
def disk_remove(vm_ref: str, disk_ref: str, discard_saved_state: bool, as_json: bool) -> None:
    """Detach a disk; its files are kept (see them in vm show)."""
    ctx, vm_id = face().ctx, face().vm_id(vm_ref)
    removed = vms.remove_disk(ctx, vm_id, disk_ref, discard_saved_state)
    shown = next(d for d in views.vm_show(ctx, vm_id)["detached_disks"] if d["id"] == removed.id)
    emit(as_json, shown, [f"Detached disk {removed.id[:12]}; its files are kept."])


@click.group("media")
def media() -> None:
    """The CD drive: insert and eject an ISO (off, running or paused; never written)."""


@media.command("insert")
@click.argument("vm_ref", metavar="VM")
@click.argument("iso", metavar="ISO")
@json_option
def media_insert(vm_ref: str, iso: str, as_json: bool) -> None:
    """Put the ISO file ISO in the VM's CD drive (replacing what is in)."""
    ctx, vm_id = face().ctx, face().vm_id(vm_ref)
    path = media_ops.insert(ctx, vm_id, iso)
    data = views.vm_show(ctx, vm_id)
    emit(as_json, data, [f"Inserted {path} into the CD drive of {data['name']}."])


@media.command("eject")
@click.argument("vm_ref", metavar="VM")
@json_option
def media_eject(vm_ref: str, as_json: bool) -> None:
    """Empty the VM's CD drive."""
    ctx, vm_id = face().ctx, face().vm_id(vm_ref)
    media_ops.eject(ctx, vm_id)
    data = views.vm_show(ctx, vm_id)
    emit(as_json, data, [f"Ejected the CD drive of {data['name']}; it is empty."])


@click.command("import")
@click.argument("bundle", metavar="BUNDLE_DIR", type=click.Path(path_type=Path))
@click.option("--name", help="Name of the new VM (default: the exported VM's name).")
@json_option
def import_(bundle: Path, name: str | None, as_json: bool) -> None:
    """Create a new VM (new id, new files) from an exported bundle, after verifying it."""
    ctx = face().ctx
    done = bundles.import_bundle(ctx, bundle.absolute(), name,
                                 on_progress=fraction_progress("importing"))
    data = views.vm_show(ctx, done.vm_id)
    lines = [f"Imported VM {data['name']} ({done.vm_id[:12]}) from {bundle}."]
    if done.checkpoint_notes:
        lines += ["The exported checkpoint's notes:",
                  *(f"  {line}" for line in done.checkpoint_notes.split("\n"))]
    emit(as_json, {**data, "checkpoint_notes": done.checkpoint_notes}, lines)


@click.command("import-libvirt")
@click.argument("xml", metavar="XML")
@click.option("--name", help="Name of the new VM (default: the domain's name).")
@click.option("--copy", is_flag=True,
              help="Copy the disks into standalone images (default: they become the read-only "
                   "bases of overlays, as vm create --disk PATH makes them).")
@click.option("--nvram", type=click.Path(path_type=Path), metavar="FILE",
              help="The domain's UEFI variables file, when not where libvirt keeps it on this "
                   "host (/var/lib/libvirt/qemu/nvram/NAME_VARS.fd or its <nvram>).")
@click.option("--tpm-state", type=click.Path(path_type=Path), metavar="FILE",
              help="The domain's TPM state (swtpm's tpm2-00.permall), when not in "
                   "/var/lib/libvirt/swtpm/UUID/tpm2/.")
@json_option
def import_libvirt(xml: str, name: str | None, copy: bool, nvram: Path | None,
                   tpm_state: Path | None, as_json: bool) -> None:
    """Create a VM (off) from a libvirt domain's XML: a file, or - for stdin
    (virsh dumpxml DOMAIN | waymark vm import-libvirt -). Its disks, memory, CPUs, firmware
    with its variables, TPM state, NICs and kernel come along; what Waymark cannot represent is
    refused, naming it, and nothing is created. Shut the domain down first and do not start it
    again: its disks become the bases of the new VM's."""
    ctx = face().ctx  # (refused through --server before stdin is read)
    data = _read_xml(xml)
    sources = from_libvirt.Sources(nvram=None if nvram is None else nvram.absolute(),
                                   tpm_state=None if tpm_state is None else tpm_state.absolute())
    done = from_libvirt.import_xml(ctx, data, name=name, copy=copy, sources=sources)
    shown = views.vm_show(ctx, done.vm_id)
    lines = [f"Imported libvirt domain {done.domain} as VM {shown['name']} "
             f"({done.vm_id[:12]}) with {len(shown['disks'])} disk(s); it is off."]
    lines += [f"  note: {note}" for note in done.notes]
    lines += [f"  not carried: <{s['element']}>" + (f": {s['why']}" if s["why"] else "")
              for s in done.not_carried]
    emit(as_json, from_libvirt.answer(done, shown), lines)


def _read_xml(xml: str) -> bytes:
    if xml == "-":
        return libvirt_domain.read(sys.stdin.buffer, "stdin")
    path = Path(xml).expanduser().absolute()
    try:
        with path.open("rb") as file:
            return libvirt_domain.read(file, str(path))
    except OSError as err:
        raise NotFound(f"the domain XML {path} cannot be read ({err.strerror}).",
                       hint="Give the file virsh dumpxml DOMAIN wrote, or - for stdin.") from err


LIBRARY = click.option("--library", "library_path", required=True, metavar="PATH",
                       type=click.Path(path_type=Path), help="The library share's folder.")


@click.command("store")
@click.argument("vm_ref", metavar="VM")
@LIBRARY
@json_option
def store(vm_ref: str, library_path: Path, as_json: bool) -> None:
    """Move a VM that is off or saved, with its checkpoints, into a library share."""
    done = library.store(face().ctx, face().vm_id(vm_ref), library_path, StepProgress())
    emit(as_json, done, [f"Stored VM {done['vm_name']} with {done['checkpoint_count']} "
                         "checkpoint(s) in "
                         f"{done['library']} ({done['files']} files, {human(done['bytes'])}).",
                         f"Bring it back with: waymark vm deploy {done['vm_name']} --library "
                         f"{done['library']}"])


@click.command("deploy")
@click.argument("name")
@LIBRARY
@json_option
def deploy(name: str, library_path: Path, as_json: bool) -> None:
    """Bring a VM stored in a library back onto this host, checkpoints intact."""
    done = library.deploy(face().ctx, name, library_path, StepProgress())
    emit(as_json, done, [f"Deployed VM {done['vm_name']} ({done['state']}) with "
                         f"{done['checkpoint_count']} checkpoint(s) from {done['library']}."])
