"""``waymark vm import-libvirt``: a libvirt domain's XML becomes a Waymark VM (off).

The XML is mapped by :mod:`waymark.external.libvirt_domain` (pure; it refuses what Waymark
cannot represent), then every file it names is checked here (each disk's format is the one
libvirt declares, the NVRAM is a variable store of the firmware's size, the TPM state is one),
and only then is the VM made by :func:`waymark.usecases.vms.definitions.create`: a refusal at
any point leaves nothing behind. Host files are named, so only an administrator (the CLI) may
import; the REST API has no such call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from waymark.engine.context import Context
from waymark.errors import Conflict, ImageError, InvalidInput, NotFound
from waymark.external import libvirt_domain
from waymark.external.libvirt_domain import Domain, DomainDisk
from waymark.images import qemu_img
from waymark.model import names
from waymark.qemu import tpm as swtpm
from waymark.usecases.vms import definitions as vms


@dataclass(frozen=True)
class Sources:
    """Where the domain's state is, when not where libvirt keeps it on this host: ``nvram``,
    its UEFI variables file; ``tpm_state``, its swtpm ``tpm2-00.permall``."""

    nvram: Path | None = None
    tpm_state: Path | None = None


@dataclass
class Imported:
    """The new VM's id and what the import says about it."""

    vm_id: str
    domain: str
    notes: list[str] = field(default_factory=list)
    not_carried: list[dict[str, str]] = field(default_factory=list)


def import_xml(ctx: Context, xml: bytes, *, name: str | None = None, copy: bool = False,
               sources: Sources = Sources()) -> Imported:
    """A new VM from a domain's XML: its disks as read-only bases of overlays (or standalone
    copies with ``copy``), its firmware's variables and its TPM's state copied."""
    domain = libvirt_domain.parse(xml)
    notes = list(domain.notes)
    vm_name = _name(name, domain.name)
    disks = [_disk(disk, copy) for disk in domain.disks]
    platform = vms.Platform(firmware=domain.firmware, tpm=domain.tpm,
                            variables_from=_variables(domain, sources.nvram, notes),
                            tpm_state=_tpm_state(domain, sources.tpm_state))
    if not disks and domain.kernel is None:
        notes.append("the domain has no disk and no kernel: the VM has nothing to boot yet "
                     "(waymark vm disk add).")
    vm_id = vms.create(ctx, vm_name, memory=domain.memory, cpus=domain.cpus, disks=disks,
                       kernel=domain.kernel, initrd=domain.initrd, append=domain.append,
                       nics=domain.nics, platform=platform, cpu_model=domain.cpu_model)
    return Imported(vm_id, domain.name, notes,
                    [{"element": s.element, "why": s.why} for s in domain.not_carried])


def _name(given: str | None, domain_name: str) -> str:
    """The VM's name: ``given``, else the domain's, which must be a Waymark name."""
    if given is not None:
        return given
    try:
        return names.clean(domain_name, what="VM name")
    except InvalidInput as err:
        raise InvalidInput(f"the domain's name cannot be a Waymark VM's: {err.message}",
                           hint="Give the VM a name with --name NAME.") from err


def _disk(disk: DomainDisk, copy: bool) -> vms.DiskSpec:
    """The disk as ``vm create --disk PATH`` takes it; its file must be of the format libvirt
    opens it with (a raw disk whose content is a qcow2 header would name any host file as its
    backing file: never probed into one)."""
    if disk.path.is_file():
        refuse_in_use(disk.path, disk.fmt, f"disk {disk.target}")
    found = qemu_img.probe_format(disk.path)
    if found != disk.fmt:
        raise ImageError(f"the domain's disk {disk.target} ({disk.path}) is declared {disk.fmt} "
                         f"but its file is {found}; nothing was created.",
                         hint="Check the file: a raw disk whose content looks like qcow2 is "
                              "never opened as qcow2. Fix the domain's <driver type> if it is "
                              "wrong.")
    return vms.DiskSpec(path=disk.path, copy=copy)


def refuse_in_use(path: Path, fmt: str, what: str) -> None:
    """Conflict when a running QEMU writes the qcow2 image ``path`` (the domain still runs):
    it would change under the new VM's overlays. (A raw file's writer lets others read it, so a
    raw disk in use is not seen here: docs/libvirt.md asks to shut the domain down first.)"""
    if qemu_img.in_use(path, fmt):
        raise Conflict(f"the domain's {what} ({path}) is in use by a running QEMU: is the "
                       "libvirt domain still running? Nothing was created.",
                       hint="Shut it down first (virsh shutdown DOMAIN; virsh domstate DOMAIN "
                            "says shut off), then import again.")


def _variables(domain: Domain, given: Path | None, notes: list[str]) -> Path | None:
    """The file the VM's variable store is copied from (None: the firmware's template, for a
    domain that never started, as libvirt itself would make it at its first start)."""
    if domain.firmware == "bios":
        if given is not None:
            raise InvalidInput("--nvram is given but the domain boots by BIOS.",
                               hint="Leave --nvram out.")
        return None
    path = given or domain.nvram
    if path is None:
        return None
    if given is None and not path.exists():
        notes.append(f"the domain has no NVRAM file yet ({path}: it never started): the "
                     "variable store is made from the firmware's template, as libvirt would.")
        return None
    if not path.is_file():
        raise NotFound(f"the domain's UEFI variables file {path} does not exist.",
                       hint="Give the file that holds its variables with --nvram FILE.")
    return path


def _tpm_state(domain: Domain, given: Path | None) -> bytes | None:
    """The TPM's state read from libvirt's swtpm folder (or ``given``); refused when missing
    (a new TPM would lose every key sealed to the domain's own)."""
    if not domain.tpm:
        if given is not None:
            raise InvalidInput("--tpm-state is given but the domain has no TPM.",
                               hint="Leave --tpm-state out.")
        return None
    path = given or domain.tpm_state()
    if path is None:
        raise InvalidInput("the domain has a TPM but no <uuid>, which names its state's folder.",
                           hint="Give its state with --tpm-state FILE (libvirt keeps it in "
                                f"{libvirt_domain.SWTPM_DIR}/UUID/{libvirt_domain.TPM_STATE}).")
    try:
        if not path.is_file():
            raise FileNotFoundError(2, "no such file")
        with path.open("rb") as file:
            data = file.read(swtpm.MAX_STATE + 1)
    except OSError as err:
        raise NotFound(f"the domain's TPM state {path} cannot be read ({err.strerror}): a new "
                       "TPM would lose every key sealed to its own, so nothing was created.",
                       hint="Start the domain once in libvirt (swtpm makes its state), or give "
                            "the state with --tpm-state FILE.") from err
    if not swtpm.fits(data):
        raise ImageError(f"{path} is not a TPM state ({len(data)} bytes); nothing was created.",
                         hint="Give swtpm's tpm2-00.permall with --tpm-state FILE.")
    return data


def answer(imported: Imported, shown: dict[str, Any]) -> dict[str, Any]:
    """``vm show``'s answer with what the import says (``libvirt``: the domain's name, the
    notes, what was not carried)."""
    return {**shown, "libvirt": {"domain": imported.domain, "notes": imported.notes,
                                 "not_carried": imported.not_carried}}
