"""The boot disk's layout, written as bytes: a GPT and GRUB's BIOS boot code (pure code, no I/O).

The boot disk (:mod:`waymark.testguest.media`) is one GPT disk, 1 MiB aligned:

====  ===================  ==========================================================
 1    BIOS boot, 1 MiB     GRUB's i386-pc ``core.img``, loaded by ``boot.img`` in the MBR
 2    EFI system (FAT)     ``\\EFI\\BOOT\\BOOTX64.EFI`` (GRUB x86_64-efi), ``grub.cfg``,
                           the kernel and the initramfs
 3    Linux data (ext4)    the guest's data file system, label ``waymark-data``
====  ===================  ==========================================================

Writing the table here rather than running ``sfdisk`` or ``grub-bios-setup`` keeps the build
free of root-only tools and of programs a fresh Debian lacks: a GPT is a protective MBR, a
header and a partition array, twice, with CRC32s; GRUB's BIOS boot code needs two sector
numbers patched in (as ``grub-bios-setup`` does when it embeds ``core.img`` in a BIOS boot
partition).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

SECTOR = 512
MIB = 1024 * 1024
_ALIGN = MIB // SECTOR  # partitions start on a MiB boundary
_ENTRIES, _ENTRY_SIZE = 128, 128
_ARRAY_SECTORS = _ENTRIES * _ENTRY_SIZE // SECTOR  # 32
_HEADER_SIZE = 92

BIOS_BOOT = uuid.UUID("21686148-6449-6e6f-744e-656564454649")
EFI_SYSTEM = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
LINUX_DATA = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")

# grub-core/boot/i386/pc/boot.S and diskboot.S: where the sector numbers go.
BOOT_CODE_SIZE = 440  # boot.img's code; the disk signature and partition table follow
KERNEL_SECTOR_OFFSET = 0x5C  # boot.img: LBA of core.img's first sector (uint64)
BLOCKLIST_START_OFFSET = SECTOR - 12  # core.img's first sector: LBA of the rest (uint64)


@dataclass(frozen=True)
class Partition:
    """One GPT entry: ``start`` and ``size`` in sectors."""

    name: str
    type: uuid.UUID
    start: int
    size: int

    @property
    def end(self) -> int:
        """The first sector after the partition."""
        return self.start + self.size

    @property
    def offset(self) -> int:
        return self.start * SECTOR


@dataclass(frozen=True)
class Layout:
    """A GPT disk of ``sectors`` sectors holding ``partitions`` in order."""

    sectors: int
    partitions: tuple[Partition, ...]

    @property
    def size(self) -> int:
        return self.sectors * SECTOR

    def partition(self, type_: uuid.UUID) -> Partition:
        return next(p for p in self.partitions if p.type == type_)


def _mib_sectors(size: int) -> int:
    """``size`` bytes rounded up to whole MiB, in sectors."""
    return -(-size // MIB) * _ALIGN


def boot_layout(esp_size: int, data_size: int) -> Layout:
    """BIOS boot (1 MiB), EFI system (``esp_size``) and data (``data_size``), each starting
    on a MiB boundary from 1 MiB; 1 MiB at the end holds the backup GPT."""
    partitions = []
    start = _ALIGN
    for name, type_, size in (("bios-boot", BIOS_BOOT, MIB), ("esp", EFI_SYSTEM, esp_size),
                              ("waymark-data", LINUX_DATA, data_size)):
        partitions.append(Partition(name, type_, start, _mib_sectors(size)))
        start = partitions[-1].end
    return Layout(start + _ALIGN, tuple(partitions))


def gpt(layout: Layout, disk_id: uuid.UUID) -> tuple[bytes, bytes]:
    """The bytes of the disk's first 34 sectors (protective MBR, header, partition array) and
    of its last 33 (array, backup header). Partition GUIDs derive from ``disk_id``."""
    array = b"".join(_entry(p, uuid.uuid5(disk_id, p.name)) for p in layout.partitions)
    array = array.ljust(_ENTRIES * _ENTRY_SIZE, b"\0")
    last = layout.sectors - 1
    first_usable, last_usable = 2 + _ARRAY_SECTORS, last - 1 - _ARRAY_SECTORS
    primary = _header(disk_id, array, here=1, other=last, entries=2,
                      usable=(first_usable, last_usable))
    backup = _header(disk_id, array, here=last, other=1, entries=last - _ARRAY_SECTORS,
                     usable=(first_usable, last_usable))
    return _protective_mbr(layout.sectors) + primary + array, array + backup


def _entry(partition: Partition, unique: uuid.UUID) -> bytes:
    name = partition.name.encode("utf-16-le").ljust(72, b"\0")
    return struct.pack("<16s16sQQQ72s", partition.type.bytes_le, unique.bytes_le,
                       partition.start, partition.end - 1, 0, name)


def _header(disk_id: uuid.UUID, array: bytes, *, here: int, other: int, entries: int,
            usable: tuple[int, int]) -> bytes:
    def packed(crc: int) -> bytes:
        return struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x00010000, _HEADER_SIZE, crc, 0,
                           here, other, usable[0], usable[1], disk_id.bytes_le, entries,
                           _ENTRIES, _ENTRY_SIZE, zlib.crc32(array))
    return packed(zlib.crc32(packed(0))).ljust(SECTOR, b"\0")


def _protective_mbr(sectors: int) -> bytes:
    """One partition of type 0xEE covering the disk (at most 2^32-1 sectors), as UEFI says."""
    entry = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1,
                        min(sectors - 1, 0xFFFFFFFF))
    return bytes(0x1BE) + entry + bytes(48) + b"\x55\xaa"


def bios_boot_code(boot_img: bytes, core_img: bytes, mbr: bytes, core_sector: int
                   ) -> tuple[bytes, bytes]:
    """GRUB's ``boot.img`` merged into ``mbr`` (its code only: the partition table stays) and
    ``core.img``, both told that ``core.img`` starts at LBA ``core_sector``.

    ``boot.img`` loads that one sector (``core.img``'s ``diskboot``), whose block list loads
    the rest of ``core.img`` from the sectors that follow; ``grub-mkimage`` already wrote the
    list's length and load segment.
    """
    if len(boot_img) != SECTOR or len(mbr) != SECTOR:
        raise ValueError("boot.img and the MBR are one sector each")
    if len(core_img) <= SECTOR:
        raise ValueError("core.img is smaller than two sectors")
    boot = bytearray(mbr)
    boot[:BOOT_CODE_SIZE] = boot_img[:BOOT_CODE_SIZE]
    struct.pack_into("<Q", boot, KERNEL_SECTOR_OFFSET, core_sector)
    core = bytearray(core_img)
    struct.pack_into("<Q", core, BLOCKLIST_START_OFFSET, core_sector + 1)
    return bytes(boot), bytes(core)
