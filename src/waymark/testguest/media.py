"""The test guest's boot disk and ISO: the same guest, booted by its own GRUB, BIOS or UEFI.

Both carry the kernel and initramfs of :mod:`waymark.testguest.build` and boot them with the
same command line; GRUB's configuration (:data:`waymark.testguest.scripts.GRUB_CFG`) boots at
once and writes to the serial port too. GRUB's BIOS image comes from the host's
``grub-pc-bin``, the ISO's UEFI image from ``grub-efi-amd64-bin``; nothing is mounted and
nothing needs root.

* **Boot disk** (``boot-<key>.qcow2``): one GPT disk (:mod:`waymark.testguest.disk`). SeaBIOS
  runs ``boot.img`` from the MBR, which loads GRUB's ``core.img`` from the BIOS boot partition;
  OVMF finds ``\\EFI\\BOOT\\BOOTX64.EFI`` on the EFI system partition (the removable-media
  path: no boot entry needed): Debian's shim (``shim-signed``, signed by Microsoft's UEFI CA),
  which starts Debian's signed GRUB (``grub-efi-amd64-signed``) next to it, which boots the
  signed cloud kernel. So the disk also boots with Secure Boot on under OVMF's
  Microsoft-enrolled variables (``OVMF_VARS_4M.ms.fd``, SMM on; with 256 MiB of memory the
  kernel resets right after its EFI stub there, 512 MiB works), and its kernel then runs
  locked down. GRUBs read
  ``/boot/grub/grub.cfg`` and the kernel and initramfs from the EFI system partition (FAT, made
  with ``mkfs.fat`` and filled with mtools; ``/.disk/info`` marks it for the signed GRUB's
  search). The third partition is the guest's ext4 data file system (label ``waymark-data``),
  so the guest writes its ``LINE`` records on the disk it boots from.
* **ISO** (``guest-<key>.iso``): ``grub-mkrescue`` (xorriso): El Torito for BIOS and an EFI
  image for UEFI. It holds no data file system: boot it with the data disk attached as a
  separate (virtio) disk, which the guest finds by its label.

A file's name carries the key of everything that decides its content (kernel, initramfs, GRUB
versions, configuration, data file system), so an existing one is never replaced: VMs keep the
boot disk as their read-only base in place, as they do the data disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from waymark import durable
from waymark.errors import ImageError, ToolMissing
from waymark.images import qemu_img
from waymark.testguest import disk, host, scripts

# Bump when the boot disk's or the ISO's make-up changes: they then get new file names.
MEDIA_VERSION = 1

GRUB_ROOT = Path("/usr/lib/grub")
BIOS_PLATFORM, EFI_PLATFORM = "i386-pc", "x86_64-efi"
GRUB_PACKAGES = {BIOS_PLATFORM: "grub-pc-bin", EFI_PLATFORM: "grub-efi-amd64-bin"}
# Built into the BIOS GRUB image: the ESP carries no module folders.
BIOS_MODULES = ("biosdisk", "part_gpt", "fat", "normal", "configfile", "linux", "echo",
                "serial", "terminal", "test", "boot")
# The BIOS GRUB's prefix: partition 2 of the disk it booted from.
BIOS_PREFIX = "(,gpt2)/boot/grub"
ESP_LABEL = "WAYMARK-ESP"
_ESP_SLACK = 4 * disk.MIB  # FAT's own tables and room to spare
_CHUNK = disk.MIB

MEDIA_TOOLS = ("grub-mkimage", "grub-mkrescue", "xorriso", "mkfs.fat", "mmd", "mcopy",
               "mformat", "dpkg-query", "env")


@dataclass(frozen=True)
class GuestFiles:
    """What the boot disk and the ISO are made of."""

    kernel: Path
    initrd: Path
    append: str
    data_fs: Path  # a raw ext4 file system, copied into the boot disk's third partition
    data_key: str  # what decides its content (the data disk's name)
    shim: Path  # shimx64.efi, signed by Microsoft's UEFI CA
    signed_grub: Path  # grubx64.efi, signed by Debian (shim trusts it)


def grub_versions() -> dict[str, str]:
    """The installed versions of GRUB's platform packages (their images go onto the media)."""
    host.require_tools("dpkg-query")
    missing = [GRUB_PACKAGES[p] for p in GRUB_PACKAGES if not (GRUB_ROOT / p).is_dir()]
    if missing:
        raise ToolMissing(f"Building the test guest's boot disk and ISO needs GRUB's "
                          f"{', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          "not installed.",
                          hint=f"Install with: apt-get install -y {' '.join(missing)}")
    out = host.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n",
                    *GRUB_PACKAGES.values()], what="asking dpkg for GRUB's versions")
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def names(files: GuestFiles, versions: Mapping[str, str]) -> tuple[str, str]:
    """``boot-<key>.qcow2`` and ``guest-<key>.iso``, keyed on what decides their content."""
    key = {"media_version": MEDIA_VERSION, "grub": dict(sorted(versions.items())),
           "kernel": durable.sha256(files.kernel), "initrd": durable.sha256(files.initrd),
           "append": files.append, "grub_cfg": scripts.GRUB_CFG}
    iso = _digest(key)
    boot = _digest({**key, "data": files.data_key, "modules": BIOS_MODULES,
                    "shim": durable.sha256(files.shim),
                    "signed_grub": durable.sha256(files.signed_grub)})
    return f"boot-{boot[:12]}.qcow2", f"guest-{iso[:12]}.iso"


def _digest(key: object) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def grub_cfg(append: str) -> str:
    return scripts.GRUB_CFG.replace("@APPEND@", append)


# --- the boot disk ---------------------------------------------------------------------------

def make_boot_disk(files: GuestFiles, work: Path, out: Path) -> None:
    """The GPT boot disk as qcow2 at ``out`` (written to a temp name, then renamed)."""
    host.require_tools(*MEDIA_TOOLS)
    work.mkdir(parents=True, exist_ok=True)
    core = _grub_image(BIOS_PLATFORM, BIOS_PREFIX, BIOS_MODULES, work / "core.img")
    esp = _make_esp(files, work)
    layout = disk.boot_layout(esp.stat().st_size, files.data_fs.stat().st_size)
    raw = work / "boot.raw"
    _write_disk(raw, layout, core, esp, files.data_fs, uuid.UUID(_digest(out.name)[:32]))
    write_qcow2(raw, out)


def write_qcow2(raw: Path, out: Path) -> None:
    """The raw image ``raw`` as qcow2 at ``out``: written to a temp name, synced, renamed."""
    staged = durable.temp_path(out)
    durable.remove(staged)
    qemu_img.convert(raw, "raw", staged)
    durable.fsync_file(staged)
    os.replace(staged, out)
    durable.fsync_dir(out.parent)


def _grub_image(platform: str, prefix: str, modules: tuple[str, ...], out: Path) -> Path:
    host.run(["grub-mkimage", "-O", platform, "-d", str(GRUB_ROOT / platform), "-p", prefix,
              "-o", str(out), *modules], what=f"making GRUB's {platform} image")
    return out


def esp_size(payload: int) -> int:
    """The EFI system partition's size for ``payload`` bytes of files: whole MiB, with room
    for FAT's tables."""
    return -(-(payload + _ESP_SLACK) // disk.MIB) * disk.MIB


def _make_esp(files: GuestFiles, work: Path) -> Path:
    """A FAT file system holding shim at the removable-media path and the signed GRUB next to
    it, grub.cfg, the kernel and the initramfs."""
    cfg = work / "grub.cfg"
    cfg.write_text(grub_cfg(files.append))
    # The signed GRUB sets its root to the file system holding /.disk/info and reads
    # /boot/grub/grub.cfg there.
    marker = work / "info"
    marker.write_text("Waymark test guest\n")
    placed = {files.shim: "::/EFI/BOOT/BOOTX64.EFI", files.signed_grub: "::/EFI/BOOT/grubx64.efi",
              cfg: "::/boot/grub/grub.cfg", marker: "::/.disk/info",
              files.kernel: "::/boot/vmlinuz", files.initrd: "::/boot/initrd.img"}
    esp = work / "esp.img"
    durable.remove(esp)
    size = esp_size(sum(path.stat().st_size for path in placed))
    host.run(["mkfs.fat", "-C", "-n", ESP_LABEL, "-i", "57a1e5b0", str(esp),
              str(size // 1024)], what="making the EFI system partition's FAT file system")
    _mtools("mmd", esp, "::/EFI", "::/EFI/BOOT", "::/boot", "::/boot/grub", "::/.disk")
    for source, target in placed.items():
        _mtools("mcopy", esp, str(source), target)
    return esp


def _mtools(program: str, image: Path, *args: str) -> None:
    """An mtools command on a file system image (no drive letters, no mtools.conf)."""
    host.run(["env", "MTOOLS_SKIP_CHECK=1", host.tool(program) or program,
              "-i", str(image), *args], what=f"filling the EFI system partition ({program})")


def _write_disk(raw: Path, layout: disk.Layout, core: Path, esp: Path, data_fs: Path,
                disk_id: uuid.UUID) -> None:
    bios = layout.partition(disk.BIOS_BOOT)
    core_img = core.read_bytes()
    if len(core_img) > bios.size * disk.SECTOR:
        raise ImageError(f"GRUB's core.img ({len(core_img)} bytes) does not fit the "
                         f"{bios.size * disk.SECTOR}-byte BIOS boot partition.",
                         hint="Report this with the grub-pc-bin version.")
    head, tail = disk.gpt(layout, disk_id)
    boot_img = (GRUB_ROOT / BIOS_PLATFORM / "boot.img").read_bytes()
    mbr, core_img = disk.bios_boot_code(boot_img, core_img, head[:disk.SECTOR], bios.start)
    with open(raw, "wb") as out:
        out.truncate(layout.size)
        out.write(mbr + head[disk.SECTOR:])
        out.seek(layout.size - len(tail))
        out.write(tail)
        out.seek(bios.offset)
        out.write(core_img)
        _copy_at(esp, out, layout.partition(disk.EFI_SYSTEM).offset)
        _copy_at(data_fs, out, layout.partition(disk.LINUX_DATA).offset)


def _copy_at(source: Path, out: BinaryIO, offset: int) -> None:
    """``source`` into ``out`` at ``offset``, leaving its zero chunks as holes (sparse)."""
    with open(source, "rb") as src:
        position = offset
        while chunk := src.read(_CHUNK):
            if chunk.count(0) != len(chunk):
                out.seek(position)
                out.write(chunk)
            position += len(chunk)


# --- the ISO ---------------------------------------------------------------------------------

def make_iso(files: GuestFiles, work: Path, out: Path) -> None:
    """A BIOS + UEFI bootable ISO at ``out`` (written to a temp name, then renamed)."""
    host.require_tools(*MEDIA_TOOLS)
    tree = work / "iso"
    (tree / "boot" / "grub").mkdir(parents=True)
    shutil.copyfile(files.kernel, tree / "boot" / "vmlinuz")
    shutil.copyfile(files.initrd, tree / "boot" / "initrd.img")
    (tree / "boot" / "grub" / "grub.cfg").write_text(grub_cfg(files.append))
    staged = durable.temp_path(out)
    durable.remove(staged)
    host.run(["grub-mkrescue", "-o", str(staged), str(tree), "--", "-volid", "WAYMARK_GUEST"],
             what="making the guest's ISO")
    durable.fsync_file(staged)
    os.replace(staged, out)
    durable.fsync_dir(out.parent)
