"""A VM's hardware configuration: what a checkpoint records and apply restores.

Plain dataclasses (no pydantic): this is on every command's import path, and ``waymark
checkpoint list`` has a 300 ms budget.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from waymark.config import ACCELERATORS
from waymark.errors import InvalidInput

# Pinned, never an alias (q35, host): a saved memory state only restores on the machine it
# was taken on.
MACHINE = "pc-q35-7.2"
# The CPU model of every configuration written before --cpu existed (they load unchanged).
CPU_MODEL = "qemu64"
# A new VM's CPU model: the x86-64-v2 baseline plus AES-NI and PCLMULQDQ (Proxmox's
# x86-64-v2-AES), which current distributions and Windows 11 24H2 need (qemu64 lacks SSSE3,
# SSE4.1/4.2 and POPCNT). KVM runs it on any Intel or AMD host since about 2011, and TCG
# emulates every feature of it (QEMU 7.2 warns for none), so the VM and its memory states move
# between such hosts (docs/runtime.md, "CPU model"). ``host`` and ``max`` are faster on one
# host, but a memory state taken with them restores only on a host with the same CPU (and QEMU).
DEFAULT_CPU_MODEL = "Westmere"
# What a CPU model name may be, whoever wrote it (it reaches QEMU's -cpu): QEMU's names are
# letters, digits, '-', '_' and '.' ("Skylake-Client-IBRS", "EPYC-Rome-v2", "qemu64", "max");
# no ',' or '=' can ride along as a CPU property.
CPU_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

CHECKPOINT_TYPES = ("disabled", "production", "productiononly", "standard")

# bios: SeaBIOS. uefi: OVMF with its own variable store. uefi-secure: OVMF with Secure Boot on
# and Microsoft's keys enrolled (what a Hyper-V Generation 2 VM has). (waymark.qemu.firmware)
FIRMWARE_KINDS = ("bios", "uefi", "uefi-secure")

# What a configuration may hold, whoever wrote it (the CLI, or a bundle, backup point or library
# share from storage others may write): these strings reach QEMU's command line.
NIC_KINDS = ("user", "bridge")
BRIDGE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # a Linux interface name (IFNAMSIZ - 1)
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_PORT = r"([0-9]{1,5})"
_IPV4 = r"(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3})?"
FORWARD = re.compile(rf"(?:tcp|udp)?:{_IPV4}:{_PORT}-{_IPV4}:{_PORT}")
DISK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_CPUS, MAX_MEMORY_MIB, MAX_APPEND = 1024, 16 << 20, 4096
MAX_PATH = 4096
# The devices a VM boots from, in the order ``--boot`` names them (the first disk, the CD drive,
# the first NIC). The default tries the VM's own disk first and falls through to the CD drive:
# a new VM with an empty disk boots the installation ISO, an installed one its own bootloader,
# and nobody has to change the order or eject the ISO in between; the network (PXE) only when
# asked, since a VM that has neither would otherwise wait on a DHCP server first.
BOOT_DEVICES = ("disk", "cdrom", "network")
DEFAULT_BOOT_ORDER = ("disk", "cdrom")

BootRule = Callable[[str], bool]  # may the VM boot this kernel, initrd or ISO file?


def _bad(what: str, hint: str) -> InvalidInput:
    return InvalidInput(f"the VM configuration is refused: {what}.", hint=hint)


def check_bridge(name: object) -> str:
    """A host bridge's name: a Linux interface name (1-15 of ``A-Za-z0-9_.-``, not ``.`` or
    ``..``), so nothing else can ride along into QEMU's ``-netdev bridge,br=``."""
    if not isinstance(name, str) or not BRIDGE.fullmatch(name) or name in (".", ".."):
        raise _bad(f"the bridge name {name!r} is not a Linux interface name",
                   "Give 1-15 letters, digits, '_', '.' or '-', e.g. --nic bridge=br0.")
    return name


def check_forward(rule: object) -> str:
    """A host port forward, ``[tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT``."""
    found = FORWARD.fullmatch(rule) if isinstance(rule, str) else None
    if found is None or not all(0 < int(p) < 65536 for p in found.groups()):
        raise _bad(f"the port forward {rule!r} is not tcp|udp:[ADDR]:PORT-[ADDR]:PORT",
                   "For example: --nic user,hostfwd=tcp::2222-:22")
    return str(rule)


def check_cpu_model(name: object) -> str:
    """A CPU model's name of QEMU's shape (:data:`CPU_MODEL_NAME`); whether this host's QEMU
    offers it is :mod:`waymark.qemu.cpus`'s question."""
    if not isinstance(name, str) or not CPU_MODEL_NAME.fullmatch(name):
        raise _bad(f"the CPU model {name!r} is not a QEMU CPU model name",
                   f"Give a name that qemu-system-x86_64 -cpu help lists, e.g. "
                   f"--cpu {DEFAULT_CPU_MODEL}.")
    return name


def check_firmware(kind: object) -> str:
    """A firmware Waymark knows (:data:`FIRMWARE_KINDS`)."""
    if kind not in FIRMWARE_KINDS:
        raise _bad(f"the firmware {kind!r} is unknown", f"Use one of: {', '.join(FIRMWARE_KINDS)}.")
    return str(kind)


def check_accel(value: object) -> str:
    """``auto`` (this host decides: WAYMARK_ACCEL, else the KVM probe), ``kvm`` or ``tcg``."""
    if value not in ACCELERATORS:
        raise _bad(f"the accelerator {value!r} is unknown",
                   f"Use one of: {', '.join(ACCELERATORS)}.")
    return str(value)


def parse_boot_order(text: str) -> list[str]:
    """``--boot disk,cdrom,network``: known device words, each at most once, at least one."""
    order = [word.strip() for word in text.split(",")]
    check_boot_order(order)
    return order


def check_boot_order(order: object) -> None:
    """InvalidInput unless ``order`` is a list of :data:`BOOT_DEVICES`, each at most once."""
    words = order if isinstance(order, list) else [order]
    unknown = [w for w in words if w not in BOOT_DEVICES]
    if not isinstance(order, list):
        problem = f"{order!r}, which is no list of devices"
    elif unknown:
        problem = f"{unknown[0]!r}, which is no boot device"
    elif len(set(words)) != len(words):
        problem = "a device twice"
    elif not words:
        problem = "no device"
    else:
        return
    raise _bad(f"the boot order {','.join(map(str, words))!r} names {problem}",
               f"Name each of {', '.join(BOOT_DEVICES)} at most once, in the order to try "
               "them, e.g. --boot cdrom,disk.")


def plain_path(path: object) -> bool:
    """An absolute path of printable text (no newline, no NUL), not too long."""
    return (isinstance(path, str) and path.startswith("/") and len(path) <= MAX_PATH
            and path.isprintable())


def check_media(path: object, boot: BootRule) -> None:
    """The ISO in the CD drive: a :func:`plain_path` that ``boot`` allows. Waymark opens it and
    hands QEMU the open file (:mod:`waymark.qemu.confine`); the path itself is only the fd set's
    text on QEMU's command line (escaped there)."""
    if path is None:
        return
    if not plain_path(path):
        raise _bad(f"the CD drive's media {path!r} is not an absolute path",
                   "Use a configuration Waymark wrote.")
    if not boot(str(path)):
        raise _bad(f"the ISO {path!r} is not one this VM may boot",
                   "A VM boots only files in its own folder, in a template's folder, in a "
                   "media location or that an administrator gave it.")


@dataclass
class Nic:
    """A virtio NIC: user-mode networking (optional host port forwards) or a host bridge."""

    mac: str
    kind: str = "user"  # user | bridge
    bridge: str | None = None
    forwards: list[str] = field(default_factory=list)  # hostfwd rules, e.g. tcp::2222-:22

    def check(self) -> None:
        """InvalidInput unless the kind is known, the bridge a strict name (bridge NICs only),
        the forwards plain rules (user NICs only) and the MAC a MAC."""
        if self.kind not in NIC_KINDS:
            raise _bad(f"the NIC kind {self.kind!r} is unknown",
                       f"Use one of: {', '.join(NIC_KINDS)}.")
        if not isinstance(self.mac, str) or not MAC.fullmatch(self.mac):
            raise _bad(f"the MAC address {self.mac!r} is not aa:bb:cc:dd:ee:ff",
                       "Give six lower-case hex pairs.")
        if self.kind == "bridge":
            check_bridge(self.bridge)
        elif self.bridge is not None:
            raise _bad("a user-mode NIC names a bridge", "Use --nic bridge=BR for a bridge.")
        if not isinstance(self.forwards, list) or (self.forwards and self.kind != "user"):
            raise _bad("only a user-mode NIC forwards host ports", "Use --nic user,hostfwd=R.")
        for rule in self.forwards:
            check_forward(rule)


@dataclass
class HardwareConfig:
    """Hardware of a VM. ``disks`` lists the attached disk ids, in bus order."""

    memory_mib: int
    cpus: int
    machine: str = MACHINE
    cpu_model: str = CPU_MODEL
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    disks: list[str] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    firmware: str = "bios"
    # the disk (one of ``disks``) that holds a UEFI VM's variable store: a small image with its
    # own chain, captured, applied, merged, backed up and carried exactly as a disk is; the
    # guest sees it as the second flash chip, never as a disk (docs/firmware.md)
    nvram: str | None = None
    tpm: bool = False  # a TPM 2.0 (swtpm), its state owned by the VM (docs/firmware.md)
    accel: str = "auto"  # auto | kvm | tcg (check_accel)
    media: str | None = None  # the ISO in the CD drive (never written; not one of the disks)
    boot_order: list[str] = field(default_factory=lambda: list(DEFAULT_BOOT_ORDER))

    @classmethod
    def load(cls, data: dict[str, Any]) -> HardwareConfig:
        fields = dict(data)
        fields["nics"] = [Nic(**nic) for nic in fields.get("nics", [])]
        fields["disks"] = list(fields.get("disks", []))
        order = fields.get("boot_order", DEFAULT_BOOT_ORDER)
        fields["boot_order"] = list(order) if isinstance(order, list | tuple) else order
        return cls(**fields)

    @classmethod
    def load_checked(cls, data: Any, boot: BootRule) -> HardwareConfig:
        """A configuration from outside the catalog (a bundle, a backup point, a library
        share), held to :meth:`check`; InvalidInput says what is wrong. An ISO in its CD drive
        that ``boot`` does not allow (another host's, or one this host no longer offers) is
        taken out (one that is no plain path is refused): the drive comes back empty, as
        Hyper-V imports a VM whose ISO is missing."""
        try:
            hardware = cls.load(data)
        except (TypeError, ValueError, AttributeError) as err:
            raise _bad(f"it is not a Waymark VM configuration ({err})",
                       "Use a configuration Waymark wrote.") from err
        if plain_path(hardware.media) and not boot(str(hardware.media)):
            hardware.media = None
        hardware.check(boot)
        return hardware

    def check(self, boot: BootRule) -> None:
        """InvalidInput unless every field is what Waymark itself would write: the pinned
        machine, a CPU model of QEMU's name shape, an accelerator Waymark knows, sizes in
        range, kernel and initrd files ``boot`` allows, plain disk ids and NICs that pass
        :meth:`Nic.check`. The one check of CLI input and of configurations read from storage."""
        if self.machine != MACHINE:
            raise _bad(f"the machine {self.machine!r} is not {MACHINE}",
                       "Use a configuration Waymark wrote.")
        check_cpu_model(self.cpu_model)
        check_accel(self.accel)
        for what, value, top in (("memory", self.memory_mib, MAX_MEMORY_MIB),
                                 ("CPU count", self.cpus, MAX_CPUS)):
            if type(value) is not int or not 1 <= value <= top:
                raise _bad(f"the {what} {value!r} is out of range", f"Give 1 to {top}.")
        for option, path in (("--kernel", self.kernel), ("--initrd", self.initrd)):
            if path is not None and not (isinstance(path, str) and boot(path)):
                raise _bad(f"the {option} file {path!r} is not one this VM may boot",
                           "A VM boots only files in its own folder, in a template's folder "
                           "or that an administrator gave to vm create.")
        if self.append is not None and (not isinstance(self.append, str)
                                        or len(self.append) > MAX_APPEND or "\0" in self.append):
            raise _bad("the kernel command line is not text", f"At most {MAX_APPEND} chars.")
        if not all(isinstance(d, str) and DISK_ID.fullmatch(d) for d in self.disks):
            raise _bad(f"a disk id in {self.disks!r} is not a plain id",
                       "Use a configuration Waymark wrote.")
        for nic in self.nics:
            nic.check()
        check_media(self.media, boot)
        check_boot_order(self.boot_order)
        self._check_firmware()

    def _check_firmware(self) -> None:
        check_firmware(self.firmware)
        if (self.firmware == "bios") != (self.nvram is None) or (
                self.nvram is not None and self.nvram not in self.disks):
            raise _bad("the UEFI variable store and the firmware disagree",
                       "Use a configuration Waymark wrote.")
        if type(self.tpm) is not bool:
            raise _bad(f"the TPM setting {self.tpm!r} is not on or off",
                       "Use a configuration Waymark wrote.")

    @property
    def uefi(self) -> bool:
        return self.firmware != "bios"

    @property
    def guest_disks(self) -> list[str]:
        """The disks the guest sees as disks, in bus order (not the UEFI variable store)."""
        return [d for d in self.disks if d != self.nvram]

    def rekeyed(self, keys: dict[str, str]) -> None:
        """Disk ids renamed by ``keys`` (a copy's new disks); disks without a key are gone."""
        self.disks = [keys[d] for d in self.disks if d in keys]
        if self.nvram is not None:
            self.nvram = keys.get(self.nvram)

    def dump(self) -> dict[str, Any]:
        return asdict(self)
