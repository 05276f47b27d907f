"""VM definitions: create, set, delete, attach and detach disks."""

from __future__ import annotations

import base64
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import delete as sql_delete
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from waymark.catalog.models import (
    BackupBase,
    Checkpoint,
    Disk,
    FrozenImage,
    Grant,
    Image,
    Intent,
    Template,
    Vm,
)
from waymark.engine import compaction, consolidation, journal, lookup, settle
from waymark.engine.context import Context
from waymark.engine.journal import now
from waymark.engine.params import Params
from waymark.engine.running import power, presence
from waymark.engine.steps import (
    Convert,
    CopyFile,
    CreateImage,
    DeleteFile,
    MakeDir,
    MakeTpm,
    PruneDirs,
    Step,
)
from waymark.errors import Conflict, ConsentRequired, ImageError, InvalidInput, NotFound
from waymark.external import shares, vm_files
from waymark.images import qemu_img
from waymark.model import names
from waymark.model.hardware import (
    CHECKPOINT_TYPES,
    DEFAULT_CPU_MODEL,
    BootRule,
    HardwareConfig,
    Nic,
    check_accel,
    check_boot_order,
    check_cpu_model,
    check_firmware,
)
from waymark.model.units import parse_size
from waymark.model.vocabulary import DeleteAnswer, deleted, gone
from waymark.qemu import cpus as cpu_models
from waymark.qemu import firmware
from waymark.qemu import tpm as swtpm
from waymark.usecases.access import locations, quotas

DEFAULT_MAX_CHECKPOINTS = 50
MAX_CHECKPOINTS_CEILING = 1000


def new_id() -> str:
    return uuid.uuid4().hex


class VmCreate(Params, frozen=True, kw_only=True):
    """A new VM: its catalog rows (``vm``, ``disks``, ``images``, parents first)."""

    kind: ClassVar[str] = "vm_create"
    vm: dict[str, Any]
    disks: list[dict[str, Any]]
    images: list[dict[str, Any]]


class DiskAdd(Params, frozen=True, kw_only=True):
    """A disk attached to a VM: its catalog rows."""

    kind: ClassVar[str] = "disk_add"
    disk: dict[str, Any]
    images: list[dict[str, Any]]


class VmDelete(Params, frozen=True, kw_only=True):
    """A deleted VM's files (its rows went in the transaction that wrote the intent)."""

    kind: ClassVar[str] = "vm_delete"


@dataclass(frozen=True)
class DiskSpec:
    """What ``--disk`` asked for: a new image of ``size`` bytes, or a file at ``path``."""

    size: int | None = None
    path: Path | None = None
    passthrough: bool = False
    copy: bool = False  # a standalone copy of ``path`` (a template's full copy), not an overlay

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        if re.fullmatch(r"\s*\d+\s*[KMGT]?(I?B)?\s*", text, re.IGNORECASE):
            return cls(size=parse_size(text, what="disk size"))
        path, _, opts = text.partition(",")
        passthrough = False
        for opt in filter(None, opts.split(",")):
            if opt not in ("passthrough=on", "passthrough=off"):
                raise InvalidInput(f"unknown disk option {opt!r} in {text!r}.",
                                   hint="The only option is passthrough=on.")
            passthrough = opt == "passthrough=on"
        if not path:
            raise InvalidInput("a --disk is empty.", hint="Give a size (10G) or a file path.")
        return cls(path=Path(path).expanduser().absolute(), passthrough=passthrough)


@dataclass(frozen=True)
class Platform:
    """A new VM's firmware (:data:`waymark.model.hardware.FIRMWARE_KINDS`) and whether it has a
    TPM: Hyper-V's generation and security settings. A VM brought from elsewhere (a libvirt
    domain) keeps its own: ``variables_from``, a raw variable store (its boot entries and keys)
    copied instead of the firmware's template; ``tpm_state``, its TPM's state (swtpm's
    ``tpm2-00.permall``) instead of a new TPM."""

    firmware: str = "bios"
    tpm: bool = False
    variables_from: Path | None = None
    tpm_state: bytes | None = None

    def __post_init__(self) -> None:
        if self.tpm_state is not None and not (self.tpm and swtpm.fits(self.tpm_state)):
            raise InvalidInput("a TPM state is given for a VM without a TPM, or it is empty or "
                               f"larger than {swtpm.MAX_STATE} bytes.",
                               hint="Give the TPM's state file (tpm2-00.permall).")


GENERATION_1 = Platform()  # BIOS, no TPM: what a VM has unless asked otherwise


def new_mac() -> str:
    """A locally administered MAC in QEMU's 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


def parse_nic(text: str) -> Nic | None:
    """``user[,hostfwd=RULE...]``, ``bridge=BR`` or ``none`` (no NIC); held to
    :meth:`Nic.check` like a configuration read from storage."""
    kind, *opts = text.split(",")
    nic: Nic | None = None
    if kind == "none" and not opts:
        return None
    if kind == "user":
        rules = [o.removeprefix("hostfwd=") for o in opts if o.startswith("hostfwd=")]
        if len(rules) != len(opts):
            raise InvalidInput(f"unknown NIC option in {text!r}.",
                               hint="Use --nic user[,hostfwd=tcp::2222-:22] or --nic bridge=BR.")
        nic = Nic(kind="user", mac=new_mac(), forwards=rules)
    elif kind.startswith("bridge=") and not opts:
        nic = Nic(kind="bridge", bridge=kind[7:], mac=new_mac())
    if nic is not None:
        nic.check()
        return nic
    raise InvalidInput(f"invalid --nic {text!r}.",
                       hint="Use --nic user[,hostfwd=tcp::2222-:22], --nic bridge=BR or "
                            "--nic none.")


def check_type(value: str) -> str:
    if value not in CHECKPOINT_TYPES:
        raise InvalidInput(f"unknown checkpoint type {value!r}.",
                           hint=f"Use one of: {', '.join(CHECKPOINT_TYPES)}.")
    return value


MIN_MEMORY = 16 << 20


MAX_MEMORY = 16 << 40  # QEMU's x86 machines top out far below this


def check_memory(value: int) -> int:
    """Memory in bytes -> MiB: whole MiB, at least 16, at most 16 TiB."""
    if value < MIN_MEMORY or value % (1 << 20) or value > MAX_MEMORY:
        raise InvalidInput(f"memory of {value} bytes is not a whole number of MiB from 16 MiB "
                           "to 16 TiB.", hint="Give e.g. --memory 512M or --memory 2G.")
    return value >> 20


def check_limit(value: int) -> int:
    if not 1 <= value <= MAX_CHECKPOINTS_CEILING:
        raise InvalidInput(f"--max-checkpoints {value} is out of range.",
                           hint=f"Give 1 to {MAX_CHECKPOINTS_CEILING}.")
    return value


def check_folder(value: str) -> str:
    """An absolute folder path that exists or can be made (no file where a folder must be)."""
    path = Path(value).expanduser().absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InvalidInput(f"{probe} is a file, so the folder {path} cannot be made.",
                           hint="Give a folder path.")
    return str(path)


def check_boot_file(value: str | None, option: str) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser().absolute()
    if not path.is_file():
        raise NotFound(f"{option} {path} does not exist.",
                       hint=f"Give an existing file to {option}.")
    return str(path)


def check_cpu(ctx: Context, model: str) -> str:
    """A CPU model of QEMU's name shape that this host's QEMU offers (where one is installed)."""
    return cpu_models.check_offered(check_cpu_model(model), ctx.home / "run")


def given_by_admin(path: str) -> bool:
    """The boot rule of CLI input: an administrator may boot any file that exists
    (:func:`check_boot_file`)."""
    return Path(path).is_file()


def boot_rule(ctx: Context, vm_id: str | None) -> BootRule:
    """The boot rule of a configuration read from storage (a bundle, a backup point, a library
    share): a kernel, initrd or ISO in the VM's own folder, a template's folder or a ``media``
    location, or one an administrator gave to a VM (a VM or checkpoint in the catalog names
    it)."""
    with ctx.catalog.session() as session:
        folders = [Path(f) for f in session.scalars(select(Template.folder))]
        configs = [*session.scalars(select(Vm.config)), *session.scalars(select(Checkpoint.config))]
    given = {c.get(key) for c in configs for key in ("kernel", "initrd", "media")} - {None}
    roots = [f.resolve() for f in folders + locations.folders(ctx, locations.MEDIA)]
    if vm_id is not None:
        roots.append(ctx.vm_folder(vm_id).resolve())

    def allowed(path: str) -> bool:
        resolved = Path(path).resolve()
        return path in given or (Path(path).is_absolute()
                                 and any(root in resolved.parents for root in roots))

    return allowed


def untrusted_hardware(ctx: Context, data: Any, *, vm_id: str | None, where: str,
                       carried: Sequence[vm_files.Carried] = ()) -> HardwareConfig:
    """A configuration read from storage others may write, held to the checks of CLI input
    (:meth:`HardwareConfig.check`) with :func:`boot_rule`; refused naming ``where``. The
    fields ``carried`` replaces (:func:`create_from_copies` installs the copies) are left
    empty here: they must name a file, whichever."""
    keys = [c.key for c in carried]
    if keys and isinstance(data, dict):
        if missing := [k for k in keys if not data.get(k)]:
            raise shares.refused(where, f"it carries a {missing[0]} its configuration does "
                                        "not boot")
        data = {**data, **dict.fromkeys(keys)}
    try:
        hardware = HardwareConfig.load_checked(data, boot_rule(ctx, vm_id))
        check_cpu(ctx, hardware.cpu_model)
    except InvalidInput as err:
        raise shares.refused(where, err.message.rstrip(".")) from err
    return hardware


def _image_row(vm_id: str, path: Path, fmt: str, size: int, *, parent: str | None = None,
               pinned: bool = False, chain_length: int = 1) -> dict[str, Any]:
    return {"id": path.stem if not pinned else new_id(), "vm_id": vm_id, "path": str(path),
            "format": fmt, "parent_id": parent, "pinned": pinned, "virtual_size": size,
            "chain_length": chain_length}


def _owned_paths(session: Session) -> set[str]:
    return set(session.scalars(select(Image.path).where(Image.pinned.is_(False))))


def plan_disk(ctx: Context, session: Session, vm_id: str, spec: DiskSpec
              ) -> tuple[dict[str, Any], list[dict[str, Any]], list[Step]]:
    """(disk row, image rows, file steps) for one ``--disk``; nothing is written here."""
    disk: dict[str, Any] = {"id": new_id(), "vm_id": vm_id, "active_image_id": None,
                            "passthrough_path": None}
    if spec.passthrough and spec.path is not None:
        if not spec.path.exists():
            raise NotFound(f"pass-through device {spec.path} does not exist.",
                           hint="Give an existing block device or file.")
        if spec.path.is_dir():
            raise InvalidInput(f"pass-through target {spec.path} is a folder.",
                               hint="Give a block device or a file.")
        if spec.path.is_file():  # a block device's size is no file length
            qemu_img.check_disk_size(spec.path, "raw", spec.path.stat().st_size)
        disk["passthrough_path"] = str(spec.path)
        return disk, [], []
    folder = ctx.disk_folder(vm_id)
    if spec.size is not None:
        path = folder / f"{new_id()}.qcow2"
        row = _image_row(vm_id, path, "qcow2", spec.size)
        disk["active_image_id"] = row["id"]
        return disk, [row], [CreateImage(path=str(path), size=spec.size)]
    assert spec.path is not None
    if str(spec.path) in _owned_paths(session) or ctx.home / "vms" in spec.path.parents:
        raise InvalidInput(f"{spec.path} is a file Waymark manages.",
                           hint="Export a checkpoint (a later command) to get a standalone copy.")
    fmt = qemu_img.probe_format(spec.path)
    if spec.copy:
        path = folder / f"{new_id()}.qcow2"
        row = _image_row(vm_id, path, "qcow2", qemu_img.info(spec.path, fmt).virtual_size)
        disk["active_image_id"] = row["id"]
        return disk, [row], [Convert(path=str(path), src=str(spec.path), src_fmt=fmt)]
    chain = qemu_img.chain(spec.path, fmt)
    base = _image_row(vm_id, spec.path, fmt, chain[0].virtual_size, pinned=True,
                      chain_length=len(chain))
    overlay_path = folder / f"{new_id()}.qcow2"
    overlay = _image_row(vm_id, overlay_path, "qcow2", base["virtual_size"], parent=base["id"])
    disk["active_image_id"] = overlay["id"]
    step = CreateImage(path=str(overlay_path), backing=str(spec.path), backing_fmt=fmt)
    return disk, [base, overlay], [step]


def create(ctx: Context, name: str, *, memory: int, cpus: int, disks: list[DiskSpec],
           kernel: str | None = None, initrd: str | None = None, append: str | None = None,
           checkpoint_type: str = "production", checkpoint_dir: str | None = None,
           max_checkpoints: int = DEFAULT_MAX_CHECKPOINTS, nics: list[Nic] | None = None,
           automatic_checkpoints: bool = False, origin: dict[str, Any] | None = None,
           owner_id: str | None = None, visible: lookup.Visible = lookup.everything,
           platform: Platform = GENERATION_1, cpu_model: str | None = None,
           accel: str = "auto", boot_order: list[str] | None = None) -> str:
    """Define a VM (it is off); returns its id. ``cpu_model``: one this host's QEMU offers
    (default :data:`~waymark.model.hardware.DEFAULT_CPU_MODEL`); ``accel``: auto, kvm or tcg.
    ``origin``: where its settings came from
    (:func:`waymark.usecases.library.templates.new_vm`); ``owner_id``: the user it belongs to, who
    may see
    the VMs ``visible`` accepts (:func:`refuse_taken`); ``boot_order``: the devices it boots
    from, in order (default :data:`waymark.model.hardware.DEFAULT_BOOT_ORDER`)."""
    name = names.clean(name, what="VM name")
    check_type(checkpoint_type)
    check_limit(max_checkpoints)
    vm_id = new_id()
    hardware = HardwareConfig(memory_mib=check_memory(memory), cpus=cpus,
                              kernel=check_boot_file(kernel, "--kernel"),
                              initrd=check_boot_file(initrd, "--initrd"), append=append,
                              nics=[Nic(mac=new_mac())] if nics is None else nics,
                              cpu_model=check_cpu(ctx, DEFAULT_CPU_MODEL if cpu_model is None
                                                  else cpu_model),
                              accel=check_accel(accel),
                              firmware=platform.firmware, tpm=platform.tpm)
    if boot_order is not None:
        hardware.boot_order = boot_order
    store = _variable_store(hardware, platform.variables_from)
    disk_rows: list[dict[str, Any]] = []
    image_rows: list[dict[str, Any]] = []
    steps: list[Step] = []
    with ctx.catalog.session() as session:
        refuse_taken(session, name, owner_id, visible)
        for spec in [*disks, *([store] if store else [])]:
            disk, images, disk_steps = plan_disk(ctx, session, vm_id, spec)
            disk_rows.append(disk)
            image_rows += images
            steps += disk_steps
    hardware.disks = [d["id"] for d in disk_rows]
    if store is not None:
        hardware.nvram = hardware.disks[-1]
    if platform.tpm:
        steps.append(MakeTpm(path=str(power.tpm_folder(ctx, vm_id)),
                             state=None if platform.tpm_state is None
                             else base64.b64encode(platform.tpm_state).decode()))
    hardware.check(given_by_admin)
    folder = checkpoint_dir or str(ctx.vm_folder(vm_id) / "checkpoints")
    vm_row = {"id": vm_id, "name": name, "state": "off", "config": hardware.dump(),
              "checkpoint_type": checkpoint_type, "max_checkpoints": max_checkpoints,
              "checkpoint_dir": check_folder(folder),
              "automatic_checkpoints": automatic_checkpoints, "origin": origin,
              "owner_id": owner_id}
    steps.insert(0, MakeDir(path=str(ctx.vm_folder(vm_id))))
    with quotas.vm_created(ctx, owner_id, hardware, disk_rows, image_rows), \
            ctx.vm_locked(vm_id, name):
        ctx.journal.run(vm_id, VmCreate(vm=vm_row, disks=disk_rows, images=image_rows), steps)
    return vm_id


def _variable_store(hardware: HardwareConfig, variables_from: Path | None) -> DiskSpec | None:
    """A UEFI VM's own variable store: a copy of the firmware's template (ToolMissing when the
    firmware is not installed) or of ``variables_from``, which must be a raw store of the
    template's size (the firmware's flash chip); None for BIOS."""
    check_firmware(hardware.firmware)
    if not hardware.uefi:
        if variables_from is not None:
            raise InvalidInput("a UEFI variable store is given for a BIOS VM.",
                               hint="Give --firmware uefi or uefi-secure.")
        return None
    template = firmware.build(hardware.firmware).variables
    if variables_from is None:
        return DiskSpec(path=template, copy=True)
    fmt, size = qemu_img.probe_format(variables_from), variables_from.stat().st_size
    if fmt != "raw" or size != template.stat().st_size:
        raise ImageError(f"{variables_from} is not a variable store of this firmware: it is a "
                         f"{size}-byte {fmt} file, and {template.name}'s flash holds "
                         f"{template.stat().st_size} raw bytes.",
                         hint="Give the variables of a VM that ran OVMF's 4 MiB build (Debian's "
                              "OVMF_CODE_4M.fd), or leave them out to start from the "
                              "firmware's template.")
    return DiskSpec(path=variables_from, copy=True)


def refuse_taken(session: Session, name: str, owner_id: str | None,
                 visible: lookup.Visible = lookup.everything,
                 hint: str = "Choose another name.") -> None:
    """A new VM's name may not be one that a VM of the same owner, or one the creator may see
    (``visible``; the host's root sees every VM), already has. A VM the creator may not see
    never clashes, so the answer tells them nothing about it (names are unique per owner)."""
    for row in session.scalars(select(Vm).where(Vm.name == name)):
        if row.owner_id == owner_id or visible(row):
            raise Conflict(f"a VM named {name!r} already exists.", hint=hint)


def _insert_images(session: Session, rows: list[dict[str, Any]]) -> None:
    for row in rows:  # parents first: rows are listed base before overlay
        session.add(Image(**row, created_at=now()))
        session.flush()


def commit_vm_create(session: Session, params: VmCreate) -> None:
    try:
        session.add(Vm(**params.vm, created_at=now()))
        session.flush()
    except IntegrityError as err:
        raise Conflict(f"a VM named {params.vm['name']!r} already exists.",
                       hint="Choose another name.") from err
    _insert_images(session, params.images)
    for row in params.disks:
        session.add(Disk(**row, created_at=now()))


@dataclass(frozen=True)
class BootChange:
    """What ``vm set`` changes of how a VM boots: ``kernel``, ``initrd``, ``append`` (None:
    unchanged; ``""`` for initrd or append: dropped), or ``no_kernel``: drop all three, so the
    VM boots from its disk (its firmware and bootloader). Kernel and initrd paths are host
    files: only an administrator (the CLI, an administrator through the API) names them."""

    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    no_kernel: bool = False

    def asked(self) -> list[str]:
        """The options given, as the CLI spells them."""
        named = [f"--{k}" for k in ("kernel", "initrd", "append") if getattr(self, k) is not None]
        return named + (["--no-kernel"] if self.no_kernel else [])

    def apply(self, hardware: HardwareConfig) -> None:
        """Change ``hardware``; InvalidInput when the options contradict themselves, a file
        does not exist, or an initrd or command line would be left without a kernel."""
        if self.no_kernel and (self.kernel or self.initrd or self.append):
            raise InvalidInput("--no-kernel drops the kernel, initrd and command line; it "
                               "cannot be given with --kernel, --initrd or --append.",
                               hint="Give either --no-kernel or the boot files.")
        if self.no_kernel or self.kernel == "":
            hardware.kernel = hardware.initrd = hardware.append = None
        elif self.kernel is not None:
            hardware.kernel = check_boot_file(self.kernel, "--kernel")
        if self.initrd is not None and not self.no_kernel:
            hardware.initrd = check_boot_file(self.initrd or None, "--initrd")
        if self.append is not None and not self.no_kernel:
            hardware.append = self.append or None
        if hardware.kernel is None and (hardware.initrd or hardware.append):
            raise InvalidInput("an initrd and a kernel command line need a kernel to boot "
                               "directly.", hint="Add --kernel FILE, or leave them out.")
        hardware.check(given_by_admin)


def set_settings(ctx: Context, vm_id: str, *, memory: int | None = None, cpus: int | None = None,
                 checkpoint_type: str | None = None, checkpoint_dir: str | None = None,
                 max_checkpoints: int | None = None, discard_saved: bool = False,
                 automatic_checkpoints: bool | None = None, cpu_model: str | None = None,
                 accel: str | None = None, boot: BootChange | None = None,
                 boot_order: list[str] | None = None) -> None:
    """Change a VM's settings; its hardware (memory, CPUs, CPU model, accelerator, boot files)
    only while it is off (:func:`_hardware_change`); the boot order in any state, taking effect
    at its next boot (a running firmware already chose)."""
    if boot_order is not None:
        check_boot_order(boot_order)
    with ctx.locked(vm_id) as (_, vm_name):
        discard = False
        asked = (("--memory", memory), ("--cpus", cpus), ("--cpu", cpu_model), ("--accel", accel))
        changed = [n for n, v in asked if v] + (boot.asked() if boot is not None else [])
        if any(v is not None for _, v in asked) or changed:
            if memory is not None:
                check_memory(memory)
            if cpu_model is not None:
                check_cpu(ctx, cpu_model)
            if accel is not None:
                check_accel(accel)
            discard = _hardware_change(ctx, vm_id, vm_name, " and ".join(changed),
                                       discard_saved)
        with quotas.vm_resized(ctx, vm_id, cpus=cpus, memory=memory):
            _set_locked(ctx, vm_id, vm_name, memory, cpus, checkpoint_type, checkpoint_dir,
                        max_checkpoints, boot)
        with ctx.catalog.session() as session:
            row = session.get_one(Vm, vm_id)
            if automatic_checkpoints is not None:
                row.automatic_checkpoints = automatic_checkpoints
            if cpu_model is not None or accel is not None or boot_order is not None:
                hardware = _with_processor(lookup.hardware(row), cpu_model, accel)
                hardware.boot_order = boot_order or hardware.boot_order
                row.config = hardware.dump()
            _own(row, {"memory_mib": memory, "cpus": cpus, "checkpoint_type": checkpoint_type,
                       "max_checkpoints": max_checkpoints,
                       "automatic_checkpoints": automatic_checkpoints})
        if discard:
            power.discard_saved(ctx, vm_id)


def _with_processor(hardware: HardwareConfig, cpu_model: str | None, accel: str | None
                    ) -> HardwareConfig:
    """``hardware`` with the CPU model and accelerator that were given (checked already)."""
    hardware.cpu_model = cpu_model or hardware.cpu_model
    hardware.accel = accel or hardware.accel
    return hardware


def rename(ctx: Context, vm_id: str, new_name: str) -> str:
    """Give the VM a new name (Hyper-V's Rename-VM); its id, files and checkpoints stay."""
    new_name = names.clean(new_name, what="VM name")
    with ctx.locked(vm_id), ctx.catalog.session() as session:
        clash = session.scalars(select(Vm).where(Vm.name == new_name, Vm.id != vm_id)).first()
        if clash is not None:
            raise Conflict(f"a VM named {new_name!r} already exists.", hint="Choose another name.")
        session.get_one(Vm, vm_id).name = new_name
        return vm_id


def _own(row: Vm, changed: dict[str, Any]) -> None:
    """The settings just set become the VM's own (no longer its profile's or template's)."""
    if row.origin is None:
        return
    sources = {**row.origin.get("sources", {}),
               **{key: "vm" for key, value in changed.items() if value is not None}}
    row.origin = {**row.origin, "sources": sources}


def _hardware_change(ctx: Context, vm_id: str, vm_name: str, what: str,
                     discard_saved: bool) -> bool:
    """Memory, CPUs and disks change only while the VM is off: a running QEMU has its hardware,
    and a saved memory state restores only onto the hardware it was saved with. Returns
    whether the caller must discard the saved state (after its change is known to be valid).
    """
    state = presence.reconcile(ctx, vm_id)
    if state in presence.LIVE_STATES:
        raise Conflict(f"VM {vm_name!r} is {state}: {what} takes effect only after a power "
                       "cycle.", hint=f"Stop it first: waymark vm stop {vm_name}")
    if state == "saved" and not discard_saved:
        raise Conflict(f"VM {vm_name!r} is saved, and its saved memory restores only onto the "
                       f"hardware it was saved with: {what} would make it unusable.",
                       hint="Add --discard-saved-state to change it anyway (the saved memory "
                            f"is lost), or start {vm_name} and shut it down first.")
    return state == "saved"


def _set_locked(ctx: Context, vm_id: str, vm_name: str, memory: int | None, cpus: int | None,
                checkpoint_type: str | None, checkpoint_dir: str | None,
                max_checkpoints: int | None, boot: BootChange | None) -> None:
    with ctx.catalog.session() as session:
        row = session.get_one(Vm, vm_id)
        hardware = lookup.hardware(row)
        if memory is not None:
            hardware.memory_mib = check_memory(memory)
        if cpus is not None:
            hardware.cpus = cpus
        if boot is not None:
            boot.apply(hardware)
        row.config = hardware.dump()
        if checkpoint_type is not None:
            row.checkpoint_type = check_type(checkpoint_type)
        if max_checkpoints is not None:
            row.max_checkpoints = check_limit(max_checkpoints)
        if checkpoint_dir is not None:
            if lookup.checkpoint_count(session, vm_id):
                raise Conflict(f"VM {vm_name!r} has checkpoints; its checkpoint folder can change "
                               "only while it has none.",
                               hint="Delete its checkpoints first, or keep the folder.")
            row.checkpoint_dir = check_folder(checkpoint_dir)


def delete(ctx: Context, vm_id: str, *, yes: bool) -> DeleteAnswer:
    """Remove the VM, its checkpoints and every file Waymark created for it (pinned files stay)."""
    with ctx.locked(vm_id) as (_, vm_name):
        _delete_locked(ctx, vm_id, vm_name, yes=yes)
    return deleted(gone("vm", vm_name, vm_id))


def _delete_locked(ctx: Context, vm_id: str, vm_name: str, *, yes: bool) -> None:
    presence.require_offline(ctx, vm_id, "deleting the VM")
    with ctx.catalog.session() as session:
        row = session.get_one(Vm, vm_id)
        count = lookup.checkpoint_count(session, vm_id)
        owned = compaction.owned_files(session, vm_id)
        if (count or owned) and not yes:
            raise ConsentRequired(
                f"VM {vm_name!r} has {count} checkpoint(s) and {len(owned)} disk image(s) "
                "Waymark created; deleting it deletes them.",
                hint=f"Confirm with: waymark vm delete {vm_name} --yes")
        checkpoints = lookup.checkpoints(session, vm_id)
        files = [str(p) for p in owned]
        files += [str(Path(row.checkpoint_dir) / f"{c.id}.json") for c in checkpoints]
        files += [c.memory_path for c in checkpoints if c.memory_path]
        folder = ctx.vm_folder(vm_id)  # a saved state and the last run's logs go too
        files += [str(folder / "saved" / n) for n in ("state.bin", "saved.json")]
        files += [str(p) for p in sorted((folder / "boot").glob("*"))]  # its own boot files
        files += [str(p) for p in presence.run_files(ctx, vm_id).kept()]
        files += [str(p) for p in power.tpm_files(ctx, vm_id, lookup.hardware(row))]
        delete_rows(session, vm_id)
        session.execute(sql_delete(Grant).where(Grant.object_kind == "vm",
                                                Grant.object_id == vm_id))
        steps: list[Step] = [DeleteFile(path=f) for f in files]
        steps.append(PruneDirs(path=str(ctx.vm_folder(vm_id))))
        journal.add(session, vm_id, VmDelete(), steps)
    settle.settle_vm(ctx, vm_id)


def delete_rows(session: Session, vm_id: str) -> None:
    checkpoint_ids = select(Checkpoint.id).where(Checkpoint.vm_id == vm_id)
    session.execute(sql_delete(FrozenImage).where(FrozenImage.checkpoint_id.in_(checkpoint_ids)))
    session.execute(update(Checkpoint).where(Checkpoint.vm_id == vm_id).values(parent_id=None))
    session.execute(sql_delete(Checkpoint).where(Checkpoint.vm_id == vm_id))
    session.execute(sql_delete(Disk).where(Disk.vm_id == vm_id))
    session.execute(sql_delete(Image).where(Image.vm_id == vm_id))
    session.execute(sql_delete(Intent).where(Intent.vm_id == vm_id, Intent.status != "pending"))
    session.execute(sql_delete(BackupBase).where(BackupBase.vm_id == vm_id))
    consolidation.forget(session, vm_id)
    session.execute(sql_delete(Vm).where(Vm.id == vm_id))


def add_disk(ctx: Context, vm_id: str, spec: DiskSpec, discard_saved: bool = False) -> str:
    with ctx.locked(vm_id) as (_, vm_name):
        discard = _hardware_change(ctx, vm_id, vm_name, "adding a disk", discard_saved)
        with ctx.catalog.session() as session:
            disk, images, steps = plan_disk(ctx, session, vm_id, spec)
        if discard:
            power.discard_saved(ctx, vm_id)
        ctx.journal.run(vm_id, DiskAdd(disk=disk, images=images), steps)
    return str(disk["id"])


def commit_disk_add(session: Session, params: DiskAdd) -> None:
    _insert_images(session, params.images)
    disk = Disk(**params.disk, created_at=now())
    session.add(disk)
    row = session.get_one(Vm, disk.vm_id)
    hardware = HardwareConfig.load(row.config)
    hardware.disks.append(disk.id)
    row.config = hardware.dump()


def remove_disk(ctx: Context, vm_id: str, disk_ref: str, discard_saved: bool = False) -> Disk:
    """Detach a disk: the VM stops using it; its files stay (listed as detached)."""
    with ctx.locked(vm_id) as (_, vm_name):
        discard = _hardware_change(ctx, vm_id, vm_name, "removing a disk", discard_saved)
        disk = _detach(ctx, vm_id, vm_name, disk_ref)
        if discard:
            power.discard_saved(ctx, vm_id)
        return disk


def _detach(ctx: Context, vm_id: str, vm_name: str, disk_ref: str) -> Disk:
    with ctx.catalog.session() as session:
        row = session.get_one(Vm, vm_id)
        disk = lookup.disk(session, row, disk_ref)
        hardware = lookup.hardware(row)
        if disk.id == hardware.nvram:
            raise Conflict(f"disk {disk.id[:12]} is {vm_name!r}'s UEFI variable store, not a "
                           "disk the guest sees.", hint="It goes only with the VM.")
        if disk.id not in hardware.disks:
            raise Conflict(f"disk {disk.id[:12]} is already detached from {vm_name!r}.",
                           hint=f"See its disks with: waymark vm show {vm_name}")
        hardware.disks.remove(disk.id)
        row.config = hardware.dump()
        return disk


@dataclass(frozen=True)
class Copy:
    """A disk of a new VM made as a standalone copy of ``src``'s chain (its ``key`` is the
    name the source's configuration gives the disk). ``confined_to``: the untrusted folder
    (a repository, a bundle) the chain must stay inside; it is then copied from the very files
    checked (:func:`waymark.external.shares.pinned_chain`)."""

    key: str
    src: Path
    src_fmt: str
    virtual_size: int
    confined_to: Path | None = None

    def __post_init__(self) -> None:  # read from a manifest: it may be anything
        size = self.virtual_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"the disk {self.src.name} has the size {size!r}, not a size in "
                             "bytes. Nothing was created.",
                             hint="Check who can write the storage it came from.")


def own_copies(ctx: Context, vm_id: str, hardware: HardwareConfig,
               carried: Sequence[vm_files.Carried]) -> list[Step]:
    """Steps copying each carried file into the VM's ``boot`` folder (from the very file
    opened inside its share); ``hardware`` names the copies."""
    steps: list[Step] = []
    for entry in carried:
        own = ctx.vm_folder(vm_id) / "boot" / entry.key
        steps.append(CopyFile(path=str(own), src=str(entry.path), confined_to=str(entry.root)))
        setattr(hardware, entry.key, str(own))
    return steps


def _outside_limit(settings: dict[str, Any]) -> int:
    """The checkpoint limit a source (a bundle, a backup point) carries, checked as CLI input."""
    value = settings.get("max_checkpoints")
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"the source's checkpoint limit {value!r} is not a number.",
                           hint="Check who can write the storage it came from.")
    return check_limit(value)


ExtraSteps = Callable[[str, dict[str, Any]], list[Step]]


def create_from_copies(ctx: Context, name: str, hardware: HardwareConfig, copies: list[Copy],
                       settings: dict[str, Any], extra: ExtraSteps | None = None,
                       on_progress: qemu_img.Progress = None,
                       rename_hint: str = "Choose another name.",
                       owner_id: str | None = None,
                       carried: Sequence[vm_files.Carried] = (),
                       tpm_state: bytes | None = None) -> str:
    """A new VM (new id, new MACs) whose disks are copies (an import, a restore as a new VM).

    ``settings`` gives checkpoint_type and max_checkpoints; ``extra(vm_id, hardware)`` may add
    file steps (a saved memory state: the new VM is then saved); ``carried``: files beyond
    its disks (checked), copied into its folder, which its configuration then names;
    ``tpm_state``: its TPM's state, which a configuration with a TPM must come with. Returns
    the id.
    """
    if hardware.tpm != (tpm_state is not None):
        raise ImageError("the source's configuration and its TPM state disagree: "
                         f"{'a TPM without its state' if hardware.tpm else 'a state, no TPM'}.",
                         hint="Use a copy Waymark wrote whole.")
    vm_name = names.clean(name, what="VM name")
    vm_id = new_id()
    keys, disks, images = {}, [], []
    steps: list[Step] = []
    for copy in copies:
        image_id, disk_id = new_id(), new_id()  # an image's id is its file's name
        path = ctx.disk_folder(vm_id) / f"{image_id}.qcow2"
        keys[copy.key] = disk_id
        images.append(_image_row(vm_id, path, "qcow2", copy.virtual_size))
        disks.append({"id": disk_id, "vm_id": vm_id, "active_image_id": image_id,
                      "passthrough_path": None})
        steps.append(Convert(path=str(path), src=str(copy.src), src_fmt=copy.src_fmt,
                             confined_to=None if copy.confined_to is None
                             else str(copy.confined_to)))
    steps += own_copies(ctx, vm_id, hardware, carried)
    if set(hardware.disks) != set(keys):
        raise ImageError("the source's configuration and its disks disagree.")
    hardware.rekeyed(keys)
    for nic in hardware.nics:  # a clone is a new machine on the network
        nic.mac = new_mac()
    with ctx.catalog.session() as session:
        refuse_taken(session, vm_name, owner_id, hint=rename_hint)
    vm_row = {"id": vm_id, "name": vm_name, "owner_id": owner_id, "state": "off",
              "config": hardware.dump(),
              "checkpoint_type": check_type(str(settings.get("checkpoint_type"))),
              "max_checkpoints": _outside_limit(settings),
              "checkpoint_dir": str(ctx.vm_folder(vm_id) / "checkpoints")}
    more = extra(vm_id, hardware.dump()) if extra is not None else []
    if more:
        vm_row["state"] = "saved"
    if tpm_state is not None:
        more.append(MakeTpm(path=str(power.tpm_folder(ctx, vm_id)),
                            state=base64.b64encode(tpm_state).decode()))
    steps = [MakeDir(path=str(ctx.vm_folder(vm_id))), *steps, *more]
    with ctx.vm_locked(vm_id, vm_name):
        ctx.journal.run(vm_id, VmCreate(vm=vm_row, disks=disks, images=images), steps,
                        on_progress)
    return vm_id
