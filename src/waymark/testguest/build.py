"""Build the test/demo guest from Debian packages: a kernel, an initramfs, an ext4 data disk,
and the same guest as a boot disk and an ISO.

Any VM image works with Waymark; this guest only makes the demo and the tests self-contained. It
boots under TCG in a few seconds and needs no root, no loop mounts and no network at run time.

* kernel: ``linux-image-cloud-amd64``'s vmlinuz, unpacked with ``dpkg-deb -x`` (no install);
* initramfs (``initrd.img``): ``busybox-static``, the virtio/ACPI button modules and, loaded
  only when booted by UEFI, efivarfs (dependencies resolved with ``modinfo -F depends``; the TPM
  drivers are built into the kernel), the real ``qemu-ga`` with the host's copies of its
  libraries, and the scripts of :mod:`waymark.testguest.scripts`; a newc cpio written in
  Python, gzipped;
* ``initrd-tools.img``: the same with a second archive appended (the kernel unpacks both), the
  firmware tools: ``tpm2-tools`` (the ``tpm2`` program and its ``tpm2_*`` names), the TCTI
  library they load at run time for ``/dev/tpmrm0`` (``libtss2-tcti-device0``) and e2fsprogs'
  ``chattr`` (efivarfs makes the variables it creates immutable), with the host's copies of
  their libraries. Kept apart because it triples the initramfs;
* data disk: ``mkfs.ext4 -d`` of a small folder (label ``waymark-data``), converted to qcow2;
* boot disk and ISO (:mod:`waymark.testguest.media`): the kernel and ``initrd-tools.img`` booted
  by GRUB from BIOS or UEFI without ``-kernel``; the boot disk carries the data file system as its
  third partition and boots by UEFI through Debian's signed ``shim-signed`` and
  ``grub-efi-amd64-signed`` (so Secure Boot with Microsoft's keys accepts it), the ISO boots
  with the data disk attached.

Booted directly (``vm create --kernel --initrd --disk --append``), the guest is the same as
before: without UEFI or a TPM, nothing new runs or waits.

VMs made with ``vm create --disk`` keep the data disk as their read-only base, in place, so a
data disk file is never replaced: its name carries the key of its own inputs
(``data-<key>.qcow2``), and package updates, which rebuild the kernel and initramfs, leave it alone.
The boot disk and the ISO are named the same way (``boot-<key>.qcow2``, ``guest-<key>.iso``),
their keys covering the kernel and initramfs they carry.

Outputs are cached in ``dest``: a build is skipped when ``dest/inputs.json`` records the same
inputs (package versions, scripts, :data:`BUILD_VERSION`). Each output is written to a temp name
then renamed, and ``inputs.json`` is removed first and written last, so an interrupted build
never looks done. Host library updates do not change the key: use ``force=True`` after one.
GRUB's installed versions are part of the key (its images go onto the boot disk and the ISO).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waymark import durable
from waymark.errors import ImageError, StorageError, ToolError, ToolMissing
from waymark.testguest import cpio, host, media, scripts

# Bump when the build code changes what it produces, so cached guests are rebuilt.
BUILD_VERSION = 2
# Bump when the data disk's content or format changes: it then gets a new file name.
DISK_VERSION = 1

KERNEL_PACKAGE = "linux-image-cloud-amd64"  # a metapackage naming the versioned image package
BUSYBOX_PACKAGE = "busybox-static"
AGENT_PACKAGE = "qemu-guest-agent"
TPM_PACKAGE = "tpm2-tools"
TCTI_PACKAGE = "libtss2-tcti-device0"  # tpm2-tools load it (dlopen) for device:/dev/tpmrm0
# chattr: efivarfs makes the variables it creates immutable (busybox has no chattr)
E2FS_PACKAGE = "e2fsprogs"
# The boot disk's UEFI boot loaders, which Secure Boot with Microsoft's keys accepts.
SHIM_PACKAGE, SIGNED_GRUB_PACKAGE = "shim-signed", "grub-efi-amd64-signed"
SHIM_PATH = "usr/lib/shim/shimx64.efi.signed"
SIGNED_GRUB_PATH = "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"
PACKAGES = (KERNEL_PACKAGE, BUSYBOX_PACKAGE, AGENT_PACKAGE, TPM_PACKAGE, TCTI_PACKAGE,
            E2FS_PACKAGE, SHIM_PACKAGE, SIGNED_GRUB_PACKAGE)

# Loaded in the guest with their dependencies first. ext4, jbd2 and crc32c are built in, and so
# are the TPM drivers (tpm_crb, tpm_tis).
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "evdev", "button")
# Loaded only when the guest booted by UEFI (/etc/modules.efi).
EFI_MODULES = ("efivarfs",)

DISK_SIZE = "256M"
DATA_LABEL = "waymark-data"  # the guest's init finds its data file system by this label
# The kernel command line the guest expects (its init also writes to ttyS0 without it).
APPEND = "console=ttyS0"

KERNEL_NAME, INITRD_NAME, INITRD_TOOLS_NAME = "vmlinuz", "initrd.img", "initrd-tools.img"
INPUTS_NAME = "inputs.json"

# Host programs the build runs (host.TOOLS names their packages). zstd only matters for a
# kernel whose modules are .ko.zst: checked when one is met.
BUILD_TOOLS = ("apt-get", "apt-cache", "env", "dpkg-deb", "modinfo", "ldd", "mkfs.ext4",
               "qemu-img", *media.MEDIA_TOOLS)

Log = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    """The built guest: boot ``kernel`` + ``initrd`` with ``append``; ``disk`` is /dev/vda.

    ``initrd_tools`` is ``initrd`` with the firmware tools added (tpm2-tools, chattr: boot it
    instead for TPM or EFI variable tests with ``-kernel``); ``boot_disk`` boots the guest with
    it by its own GRUB (BIOS or UEFI, no ``-kernel``) and holds its data file system; ``iso``
    boots it from a CD, with ``disk`` attached for its data.
    """

    kernel: Path
    initrd: Path
    disk: Path
    initrd_tools: Path
    boot_disk: Path
    iso: Path
    inputs_hash: str
    append: str = APPEND
    rebuilt: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"kernel": str(self.kernel), "initrd": str(self.initrd), "disk": str(self.disk),
                "initrd_tools": str(self.initrd_tools), "boot_disk": str(self.boot_disk),
                "iso": str(self.iso), "append": self.append, "inputs_hash": self.inputs_hash,
                "rebuilt": self.rebuilt}


class _DownloadFailed(ToolError):
    """apt-get download failed: usually stale package lists naming a version now gone."""


def build(dest: Path, *, log: Log | None = None, force: bool = False) -> GuestImage:
    """Build the guest into ``dest``, or return the cached one when its inputs are unchanged.

    Concurrent builds into one ``dest`` wait for each other (the second one then finds the
    guest up to date).
    """
    say: Log = log or (lambda _message: None)
    dest = dest.expanduser().absolute()
    _make_dir(dest)
    with _locked(dest):
        try:
            return _build_or_reuse(dest, say, force)
        except _DownloadFailed as err:
            say(f"{err.message} Running apt-get update once and trying again.")
            _apt_update()
            return _build_or_reuse(dest, say, force)


def _build_or_reuse(dest: Path, say: Log, force: bool) -> GuestImage:
    versions = package_versions(say)
    grub = media.grub_versions()
    digest = inputs_hash(versions, grub)
    recorded = None if force else _current_media(dest, digest)
    if recorded is not None:
        say(f"The guest in {dest} is up to date.")
        return _image(dest, digest, recorded)
    host.require_tools(*BUILD_TOOLS)
    durable.remove(dest / INPUTS_NAME)
    work = dest / ".work"
    shutil.rmtree(work, ignore_errors=True)
    try:
        made = _build_into(dest, work, versions, grub, say)
    except OSError as err:
        raise StorageError(f"could not build the guest in {dest}: {err}",
                           hint="Free space or fix permissions there, then build the guest "
                                "again (the package cache is kept).") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {"hash": digest, "build_version": BUILD_VERSION, "packages": versions,
              "grub": grub, "disk": disk_name(), "boot_disk": made[0], "iso": made[1]}
    durable.write_bytes(dest / INPUTS_NAME, json.dumps(record, indent=2).encode())
    say(f"Built the guest in {dest}.")
    return _image(dest, digest, made, rebuilt=True)


def _image(dest: Path, digest: str, media_names: tuple[str, str], *, rebuilt: bool = False
           ) -> GuestImage:
    return GuestImage(dest / KERNEL_NAME, dest / INITRD_NAME, dest / disk_name(),
                      dest / INITRD_TOOLS_NAME, dest / media_names[0], dest / media_names[1],
                      digest, rebuilt=rebuilt)


def inputs_hash(versions: Mapping[str, str], grub: Mapping[str, str] | None = None) -> str:
    """The cache key: everything that decides the outputs, except the host's own libraries."""
    key = {"build_version": BUILD_VERSION, "packages": dict(sorted(versions.items())),
           "grub": dict(sorted((grub or {}).items())), "modules": [MODULES, EFI_MODULES],
           "scripts": scripts.SCRIPTS, "grub_cfg": scripts.GRUB_CFG, "disk": disk_name(),
           "media_version": media.MEDIA_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def disk_name() -> str:
    """``data-<key>.qcow2``, the key covering only what decides the data disk's content."""
    key = {"disk_version": DISK_VERSION, "size": DISK_SIZE, "readme": scripts.DATA_README}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"data-{digest[:12]}.qcow2"


def _current_media(dest: Path, digest: str) -> tuple[str, str] | None:
    """The boot disk's and the ISO's names if ``dest`` holds the guest of ``digest``."""
    try:
        recorded = json.loads((dest / INPUTS_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or recorded.get("hash") != digest:
        return None
    made = (recorded.get("boot_disk"), recorded.get("iso"))
    if not all(isinstance(name, str) and name for name in made):
        return None
    names = (str(made[0]), str(made[1]))
    outputs = (KERNEL_NAME, INITRD_NAME, INITRD_TOOLS_NAME, disk_name(), *names)
    return names if all((dest / name).is_file() for name in outputs) else None


def _build_into(dest: Path, work: Path, versions: Mapping[str, str], grub: Mapping[str, str],
                say: Log) -> tuple[str, str]:
    """Build everything into ``dest``; the boot disk's and the ISO's names."""
    debs = fetch_packages(dest / "debs", versions, say)
    trees = {name: _unpack(deb, work / name, say) for name, deb in debs.items()}
    say("Collecting the modules, the guest agent, the firmware tools and their libraries.")
    archive, tools = cpio.Archive(), cpio.Archive()
    _add_base(archive, trees[BUSYBOX_PACKAGE])
    _add_modules(archive, trees[KERNEL_PACKAGE], work / "modules")
    _add_program(archive, trees[AGENT_PACKAGE], "usr/sbin/qemu-ga", debs[AGENT_PACKAGE])
    _add_firmware_tools(tools, trees, debs, archive)
    say("Writing the kernel and the initramfs (without and with the firmware tools).")
    durable.write_bytes(dest / KERNEL_NAME, _find_kernel(trees[KERNEL_PACKAGE]).read_bytes())
    base = gzip.compress(archive.pack(), compresslevel=6, mtime=0)
    durable.write_bytes(dest / INITRD_NAME, base)
    # The kernel unpacks concatenated archives in turn: the second one adds the tools.
    durable.write_bytes(dest / INITRD_TOOLS_NAME,
                        base + gzip.compress(tools.pack(), compresslevel=6, mtime=0))
    data_fs = _make_data_fs(work)
    disk = dest / disk_name()
    if not disk.is_file():  # complete if present (temp + rename); VMs may use it as a base
        say(f"Making the {DISK_SIZE} ext4 data disk.")
        media.write_qcow2(data_fs, disk)
    files = media.GuestFiles(dest / KERNEL_NAME, dest / INITRD_TOOLS_NAME, APPEND, data_fs,
                             disk_name(), _unpacked(trees, SHIM_PACKAGE, SHIM_PATH),
                             _unpacked(trees, SIGNED_GRUB_PACKAGE, SIGNED_GRUB_PATH))
    boot_name, iso_name = media.names(files, grub)
    if not (dest / boot_name).is_file():  # never replaced either: VMs boot from it in place
        say("Making the boot disk (GPT: BIOS boot, EFI system, data).")
        media.make_boot_disk(files, work / "boot", dest / boot_name)
    if not (dest / iso_name).is_file():
        say("Making the ISO (BIOS and UEFI).")
        media.make_iso(files, work / "iso", dest / iso_name)
    return boot_name, iso_name


# --- Debian packages -------------------------------------------------------------------------

def package_versions(say: Log) -> dict[str, str]:
    """The candidate version of each package, running ``apt-get update`` once if apt has none."""
    versions = _candidates()
    if len(versions) < len(PACKAGES):
        say("apt knows no version of some packages; running apt-get update once.")
        _apt_update()
        versions = _candidates()
    missing = sorted(set(PACKAGES) - set(versions))
    if missing:
        raise ToolError(f"apt has no installable version of {', '.join(missing)}.",
                        hint="Enable Debian's main archive in /etc/apt/sources.list, run "
                             "apt-get update, then build the guest again.")
    return versions


def _candidates() -> dict[str, str]:
    """Parse ``apt-cache policy``: a ``name:`` line, then an indented ``Candidate: X`` line."""
    host.require_tools("apt-cache")
    out = host.run(["apt-cache", "policy", *PACKAGES], what="asking apt for package versions")
    versions: dict[str, str] = {}
    name = None
    for line in out.splitlines():
        if not line.startswith(" "):
            name = line[:-1] if line.endswith(":") else None
        elif name and line.strip().startswith("Candidate:"):
            candidate = line.split(":", 1)[1].strip()
            if candidate != "(none)":
                versions[name] = candidate
    return versions


def _apt_update() -> None:
    if os.geteuid() != 0:
        raise ToolError("apt's package lists are missing or out of date.",
                        hint="Run: sudo apt-get update, then build the guest again.")
    host.require_tools("apt-get")
    host.run(["apt-get", "update", "-q"], what="updating apt's package lists")


def fetch_packages(cache: Path, versions: Mapping[str, str], say: Log) -> dict[str, Path]:
    """The .deb of each package; for the kernel metapackage, that of the image it names.

    Other .deb files in ``cache`` (older versions) are removed.
    """
    _make_dir(cache)
    debs = _fetch(cache, versions, say)
    meta = debs[KERNEL_PACKAGE]
    image_name, image_version = _kernel_image(meta)
    debs[KERNEL_PACKAGE] = _fetch(cache, {image_name: image_version}, say)[image_name]
    keep = {meta, *debs.values()}
    for old in cache.glob("*.deb"):
        if old not in keep:
            durable.remove(old)
    return debs


def _kernel_image(meta_deb: Path) -> tuple[str, str]:
    """``linux-image-cloud-amd64`` depends on exactly one versioned image package."""
    depends = _deb_field(meta_deb, "Depends")
    match = re.match(r"\s*(linux-image-[^\s,(]+)\s*\(=\s*([^)\s]+)\)", depends)
    if match is None:
        raise ImageError(f"{meta_deb.name} names no kernel image package: {depends!r}",
                         hint=f"Delete {meta_deb} and build the guest again.")
    return match.group(1), match.group(2)


def _fetch(cache: Path, versions: Mapping[str, str], say: Log) -> dict[str, Path]:
    """Download (in one apt-get call) each ``name=version`` not yet in ``cache``."""
    missing = [f"{name}={version}" for name, version in versions.items()
               if _cached_deb(cache, name, version) is None]
    if missing:
        say(f"Downloading {', '.join(missing)}.")
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        try:
            host.run(["env", "-C", str(cache), "apt-get", "download", "-q", *sandbox, *missing],
                     what=f"downloading {', '.join(missing)}")
        except ToolError as err:  # reported as apt-get's failure, not env's
            detail = err.message.partition(": ")[2] or err.message
            raise _DownloadFailed(f"apt-get download failed: {detail}",
                                  hint="Check the network and apt's sources, then build the "
                                       "guest again.") from err
    found: dict[str, Path] = {}
    for name, version in versions.items():
        deb = _cached_deb(cache, name, version)
        if deb is None:
            raise ToolError(f"apt-get download of {name} {version} left no .deb in {cache}.")
        found[name] = deb
    return found


def _cached_deb(cache: Path, name: str, version: str) -> Path | None:
    """apt-get download names files ``NAME_VERSION_ARCH.deb``, with ``:`` written ``%3a``."""
    found = sorted(cache.glob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
    return found[0] if found else None


def _deb_field(deb: Path, field: str) -> str:
    return host.run(["dpkg-deb", "-f", str(deb), field],
                    what=f"reading {field} of {deb.name}").strip()


def _unpack(deb: Path, into: Path, say: Log) -> Path:
    say(f"Unpacking {deb.name}.")
    into.mkdir(parents=True)
    host.run(["dpkg-deb", "-x", str(deb), str(into)], what=f"unpacking {deb.name}")
    return into


# --- the initramfs ---------------------------------------------------------------------------

def _add_base(archive: cpio.Archive, busybox_tree: Path) -> None:
    """busybox (init makes its applet links), the scripts, and the folders init mounts on."""
    archive.add_file("bin/busybox", (busybox_tree / "bin" / "busybox").read_bytes(), 0o755)
    archive.add_symlink("bin/sh", "busybox")
    for path, text in scripts.SCRIPTS.items():
        archive.add_file(path, text.encode(), 0o755)
    for folder in ("proc", "sys", "dev", "run", "tmp", "data", "usr/bin", "usr/sbin"):
        archive.add_dir(folder)
    archive.add_symlink("var/run", "../run")
    # The kernel opens /dev/console for init before init can mount devtmpfs.
    archive.add_char_device("dev/console", 5, 1)


def _add_modules(archive: cpio.Archive, kernel_tree: Path, scratch: Path) -> None:
    """Each wanted module after its dependencies, uncompressed: those of :data:`MODULES` listed
    in /etc/modules, the others :data:`EFI_MODULES` need in /etc/modules.efi."""
    root = _modules_root(kernel_tree)
    index = {_module_name(path): path for path in root.rglob("*.ko*")}
    builtin = _builtin_modules(root)
    order: list[str] = []
    for name in MODULES:
        _visit(name, index, builtin, scratch, order)
    always = list(order)
    for name in EFI_MODULES:
        _visit(name, index, builtin, scratch, order)
    for name in order:
        archive.add_file(f"lib/modules/{name}.ko", _plain_module(index[name], scratch).read_bytes())
    archive.add_file("etc/modules", "".join(f"{name}\n" for name in always).encode())
    archive.add_file("etc/modules.efi",
                     "".join(f"{name}\n" for name in order[len(always):]).encode())


def _visit(name: str, index: Mapping[str, Path], builtin: set[str], scratch: Path,
           order: list[str]) -> None:
    """Depth-first: dependencies first; built-in modules need no loading."""
    if name in order or name in builtin:
        return
    if name not in index:
        raise ImageError(f"the kernel in {KERNEL_PACKAGE} has no module {name}.",
                         hint="Report this: the guest build expects "
                              f"{', '.join(MODULES + EFI_MODULES)}.")
    plain = _plain_module(index[name], scratch)
    depends = host.run(["modinfo", "-F", "depends", str(plain)], what=f"reading {name}'s depends")
    for dependency in filter(None, depends.strip().split(",")):
        _visit(dependency.replace("-", "_"), index, builtin, scratch, order)
    order.append(name)


def _modules_root(kernel_tree: Path) -> Path:
    for lib in (kernel_tree / "lib" / "modules", kernel_tree / "usr" / "lib" / "modules"):
        found = sorted(lib.glob("*/kernel"))
        if found:
            return found[-1].parent
    raise ImageError(f"no lib/modules/<version>/kernel in the unpacked {KERNEL_PACKAGE}.",
                     hint="Delete the guest folder's debs/ and build the guest again.")


def _module_name(path: Path) -> str:
    return path.name.split(".ko", 1)[0].replace("-", "_")


def _builtin_modules(root: Path) -> set[str]:
    try:
        lines = (root / "modules.builtin").read_text().splitlines()
    except FileNotFoundError:
        return set()
    return {_module_name(Path(line)) for line in lines if line.strip()}


def _plain_module(path: Path, scratch: Path) -> Path:
    """The uncompressed module: busybox insmod loads only plain .ko files."""
    if path.name.endswith(".ko"):
        return path
    plain = scratch / f"{_module_name(path)}.ko"
    if plain.exists():
        return plain
    scratch.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".ko.xz"):
        plain.write_bytes(lzma.decompress(path.read_bytes()))
    elif path.name.endswith(".ko.gz"):
        plain.write_bytes(gzip.decompress(path.read_bytes()))
    elif path.name.endswith(".ko.zst"):
        host.require_tools("zstd")
        host.run(["zstd", "-q", "-d", "-f", "-o", str(plain), str(path)],
                 what=f"decompressing {path.name}")
    else:
        raise ImageError(f"{path.name} is compressed in a way the guest build cannot read.",
                         hint="Report this with the kernel package version.")
    return plain


def _add_program(archive: cpio.Archive, tree: Path, path: str, deb: Path,
                 have: cpio.Archive | None = None) -> None:
    """The file at ``path`` in the unpacked ``deb`` and, at the same paths, the host's copies of
    the libraries ``ldd`` finds for it (those not already in ``have``)."""
    binary = tree / path
    archive.add_file(path, binary.read_bytes(), 0o755)
    for library in _libraries(binary, deb):
        if have is None or str(library) not in have:
            archive.add_file(str(library), library.resolve().read_bytes(), 0o755)


def _add_firmware_tools(archive: cpio.Archive, trees: Mapping[str, Path],
                        debs: Mapping[str, Path], base: cpio.Archive) -> None:
    """tpm2-tools' one program ``tpm2``, its ``tpm2_*`` names (symlinks in the package), the
    device TCTI library it loads by name at run time, and ``chattr`` and ``lsattr`` (efivarfs
    variables are immutable until ``chattr -i``), each with the libraries ``base`` lacks.

    They are an archive of their own, appended to the initramfs for the boot disk and the ISO
    (``initrd-tools.img``): the libraries (curl, OpenSSL, GnuTLS, Kerberos...) triple the
    initramfs, which would slow every direct-kernel boot by about 0.3 s under TCG.
    """
    tools = trees[TPM_PACKAGE]
    _add_program(archive, tools, "usr/bin/tpm2", debs[TPM_PACKAGE], base)
    for link in sorted((tools / "usr" / "bin").glob("tpm2_*")):
        if link.is_symlink():
            archive.add_symlink(f"usr/bin/{link.name}", "tpm2")
    tcti = sorted((trees[TCTI_PACKAGE] / "usr" / "lib").glob("*/libtss2-tcti-device.so.0"))
    if not tcti:
        raise ImageError(f"no libtss2-tcti-device.so.0 in the unpacked {TCTI_PACKAGE}.",
                         hint="Delete the guest folder's debs/ and build the guest again.")
    _add_program(archive, trees[TCTI_PACKAGE], str(tcti[0].relative_to(trees[TCTI_PACKAGE])),
                 debs[TCTI_PACKAGE], base)
    for program in ("usr/bin/chattr", "usr/bin/lsattr"):
        _add_program(archive, trees[E2FS_PACKAGE], program, debs[E2FS_PACKAGE], base)


def _libraries(binary: Path, deb: Path) -> list[Path]:
    """The paths ``ldd`` resolves; a library the host lacks names the packages to install."""
    out = host.run(["ldd", str(binary)], what=f"listing the libraries of {binary.name}")
    found: list[Path] = []
    missing: list[str] = []
    for line in out.splitlines():
        name, _, target = line.strip().partition(" => ")
        path = (target if target else name).split(" (")[0].strip()
        if path == "not found":
            missing.append(name)
        elif path.startswith("/"):
            found.append(Path(path))
    if missing:
        needs = re.findall(r"(?:^|,)\s*([a-z0-9][a-z0-9.+-]*)", _deb_field(deb, "Depends"))
        raise ToolMissing(f"{binary.name} needs {', '.join(missing)}, which this host does "
                          "not have.",
                          hint=f"Install them with: apt-get install -y {' '.join(needs)}")
    return found


def _unpacked(trees: Mapping[str, Path], package: str, path: str) -> Path:
    found = trees[package] / path
    if not found.is_file():
        raise ImageError(f"no {path} in the unpacked {package}.",
                         hint="Delete the guest folder's debs/ and build the guest again.")
    return found


def _find_kernel(tree: Path) -> Path:
    found = sorted((tree / "boot").glob("vmlinuz-*"))
    if not found:
        raise ImageError(f"no boot/vmlinuz-* in the unpacked {KERNEL_PACKAGE}.",
                         hint="Delete the guest folder's debs/ and build the guest again.")
    return found[-1]


# --- outputs ---------------------------------------------------------------------------------

def _make_data_fs(work: Path) -> Path:
    """``mkfs.ext4 -d`` fills the file system from a folder: no loop mount, no root needed.
    The raw file system: the data disk's content and the boot disk's third partition."""
    content = work / "disk-content"
    content.mkdir(parents=True)
    (content / "README").write_text(scripts.DATA_README)
    raw = work / "data.raw"
    host.run(["mkfs.ext4", "-q", "-F", "-L", DATA_LABEL,
              "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
              "-d", str(content), str(raw), DISK_SIZE], what="making the data disk's file system")
    return raw


# --- host plumbing ---------------------------------------------------------------------------

def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"could not create {path}: {err}",
                           hint="Choose another folder with --dest, or fix its permissions."
                           ) from err


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """One build at a time per folder (flock: released even if the process is killed)."""
    with open(dest / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
