"""Build the test/demo guest from Debian packages: a kernel, an initramfs and an ext4 data disk.

Any VM image works with Waymark; this guest only makes the demo and the tests self-contained. It
boots under TCG in a few seconds and needs no root, no loop mounts and no network at run time.

* kernel: ``linux-image-cloud-amd64``'s vmlinuz, unpacked with ``dpkg-deb -x`` (no install);
* initramfs: ``busybox-static``, the virtio/ACPI button modules (dependencies resolved with
  ``modinfo -F depends``), the real ``qemu-ga`` with the host's copies of its libraries, and the
  scripts of :mod:`waymark.testguest.scripts`; a newc cpio written in Python, gzipped;
* data disk: ``mkfs.ext4 -d`` of a small folder, converted to qcow2.

VMs made with ``vm create --disk`` keep the data disk as their read-only base, in place, so a
data disk file is never replaced: its name carries the key of its own inputs
(``data-<key>.qcow2``), and package updates, which rebuild the kernel and initramfs, leave it alone.

Outputs are cached in ``dest``: a build is skipped when ``dest/inputs.json`` records the same
inputs (package versions, scripts, :data:`BUILD_VERSION`). Each output is written to a temp name
then renamed, and ``inputs.json`` is removed first and written last, so an interrupted build
never looks done. Host library updates do not change the key: use ``force=True`` after one.
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

from waymark import durable, process
from waymark.errors import ImageError, StorageError, ToolError, ToolMissing
from waymark.images import qemu_img
from waymark.testguest import cpio, scripts

# Bump when the build code changes what it produces, so cached guests are rebuilt.
BUILD_VERSION = 1
# Bump when the data disk's content or format changes: it then gets a new file name.
DISK_VERSION = 1

KERNEL_PACKAGE = "linux-image-cloud-amd64"  # a metapackage naming the versioned image package
BUSYBOX_PACKAGE = "busybox-static"
AGENT_PACKAGE = "qemu-guest-agent"
PACKAGES = (KERNEL_PACKAGE, BUSYBOX_PACKAGE, AGENT_PACKAGE)

# Loaded in the guest with their dependencies first. ext4, jbd2 and crc32c are built in.
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "evdev", "button")

DISK_SIZE = "256M"
# The kernel command line the guest expects (its init also writes to ttyS0 without it).
APPEND = "console=ttyS0"

KERNEL_NAME, INITRD_NAME = "vmlinuz", "initrd.img"
INPUTS_NAME = "inputs.json"

# Host programs the build runs -> the Debian package that ships each.
TOOLS = {"apt-get": "apt", "apt-cache": "apt", "env": "coreutils", "dpkg-deb": "dpkg",
         "modinfo": "kmod", "ldd": "libc-bin", "mkfs.ext4": "e2fsprogs",
         "qemu-img": "qemu-utils", "zstd": "zstd"}
# zstd only matters for a kernel whose modules are .ko.zst: checked when one is met.
BUILD_TOOLS = tuple(name for name in TOOLS if name != "zstd")
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"

Log = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    """The built guest: boot ``kernel`` + ``initrd`` with ``append``; ``disk`` is /dev/vda."""

    kernel: Path
    initrd: Path
    disk: Path
    inputs_hash: str
    append: str = APPEND
    rebuilt: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"kernel": str(self.kernel), "initrd": str(self.initrd), "disk": str(self.disk),
                "append": self.append, "inputs_hash": self.inputs_hash, "rebuilt": self.rebuilt}



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
    digest = inputs_hash(versions)
    image = GuestImage(dest / KERNEL_NAME, dest / INITRD_NAME, dest / disk_name(), digest)
    if not force and _is_current(dest, digest):
        say(f"The guest in {dest} is up to date.")
        return image
    _require_tools(*BUILD_TOOLS)
    durable.remove(dest / INPUTS_NAME)
    work = dest / ".work"
    shutil.rmtree(work, ignore_errors=True)
    try:
        _build_into(dest, work, versions, say)
    except OSError as err:
        raise StorageError(f"could not build the guest in {dest}: {err}",
                           hint="Free space or fix permissions there, then build the guest "
                                "again (the package cache is kept).") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {"hash": digest, "build_version": BUILD_VERSION, "packages": versions,
              "disk": disk_name()}
    durable.write_bytes(dest / INPUTS_NAME, json.dumps(record, indent=2).encode())
    say(f"Built the guest in {dest}.")
    return GuestImage(image.kernel, image.initrd, image.disk, digest, rebuilt=True)


def inputs_hash(versions: Mapping[str, str]) -> str:
    """The cache key: everything that decides the outputs, except the host's own libraries."""
    key = {"build_version": BUILD_VERSION, "packages": dict(sorted(versions.items())),
           "modules": MODULES, "scripts": scripts.SCRIPTS, "disk": disk_name()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def disk_name() -> str:
    """``data-<key>.qcow2``, the key covering only what decides the data disk's content."""
    key = {"disk_version": DISK_VERSION, "size": DISK_SIZE, "readme": scripts.DATA_README}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"data-{digest[:12]}.qcow2"


def _is_current(dest: Path, digest: str) -> bool:
    try:
        recorded = json.loads((dest / INPUTS_NAME).read_text())
    except (OSError, ValueError):
        return False
    outputs = (dest / KERNEL_NAME, dest / INITRD_NAME, dest / disk_name())
    return isinstance(recorded, dict) and recorded.get("hash") == digest \
        and all(path.is_file() for path in outputs)


def _build_into(dest: Path, work: Path, versions: Mapping[str, str], say: Log) -> None:
    debs = fetch_packages(dest / "debs", versions, say)
    trees = {name: _unpack(deb, work / name, say) for name, deb in debs.items()}
    say("Collecting the modules and the guest agent's libraries.")
    archive = cpio.Archive()
    _add_base(archive, trees[BUSYBOX_PACKAGE])
    _add_modules(archive, trees[KERNEL_PACKAGE], work / "modules")
    _add_agent(archive, trees[AGENT_PACKAGE], debs[AGENT_PACKAGE])
    say("Writing the kernel and the initramfs.")
    durable.write_bytes(dest / KERNEL_NAME, _find_kernel(trees[KERNEL_PACKAGE]).read_bytes())
    durable.write_bytes(dest / INITRD_NAME, gzip.compress(archive.pack(), compresslevel=6, mtime=0))
    disk = dest / disk_name()
    if not disk.is_file():  # complete if present (temp + rename); VMs may use it as a base
        say(f"Making the {DISK_SIZE} ext4 data disk.")
        _make_disk(work, disk)


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
    _require_tools("apt-cache")
    out = _run(["apt-cache", "policy", *PACKAGES], what="asking apt for package versions")
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
    _require_tools("apt-get")
    _run(["apt-get", "update", "-q"], what="updating apt's package lists")


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
            _run(["env", "-C", str(cache), "apt-get", "download", "-q", *sandbox, *missing],
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
    return _run(["dpkg-deb", "-f", str(deb), field], what=f"reading {field} of {deb.name}").strip()


def _unpack(deb: Path, into: Path, say: Log) -> Path:
    say(f"Unpacking {deb.name}.")
    into.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(into)], what=f"unpacking {deb.name}")
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
    """Each wanted module after its dependencies, uncompressed, listed in /etc/modules."""
    root = _modules_root(kernel_tree)
    index = {_module_name(path): path for path in root.rglob("*.ko*")}
    builtin = _builtin_modules(root)
    order: list[str] = []
    for name in MODULES:
        _visit(name, index, builtin, scratch, order)
    for name in order:
        archive.add_file(f"lib/modules/{name}.ko", _plain_module(index[name], scratch).read_bytes())
    archive.add_file("etc/modules", "".join(f"{name}\n" for name in order).encode())


def _visit(name: str, index: Mapping[str, Path], builtin: set[str], scratch: Path,
           order: list[str]) -> None:
    """Depth-first: dependencies first; built-in modules need no loading."""
    if name in order or name in builtin:
        return
    if name not in index:
        raise ImageError(f"the kernel in {KERNEL_PACKAGE} has no module {name}.",
                         hint=f"Report this: the guest build expects {', '.join(MODULES)}.")
    plain = _plain_module(index[name], scratch)
    depends = _run(["modinfo", "-F", "depends", str(plain)], what=f"reading {name}'s depends")
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
        _require_tools("zstd")
        _run(["zstd", "-q", "-d", "-f", "-o", str(plain), str(path)],
             what=f"decompressing {path.name}")
    else:
        raise ImageError(f"{path.name} is compressed in a way the guest build cannot read.",
                         hint="Report this with the kernel package version.")
    return plain


def _add_agent(archive: cpio.Archive, agent_tree: Path, agent_deb: Path) -> None:
    """qemu-ga and, at the same paths, the host's copies of the libraries ``ldd`` finds."""
    binary = agent_tree / "usr" / "sbin" / "qemu-ga"
    archive.add_file("usr/sbin/qemu-ga", binary.read_bytes(), 0o755)
    for library in _libraries(binary, agent_deb):
        archive.add_file(str(library), library.resolve().read_bytes(), 0o755)


def _libraries(binary: Path, deb: Path) -> list[Path]:
    """The paths ``ldd`` resolves; a library the host lacks names the packages to install."""
    out = _run(["ldd", str(binary)], what=f"listing the libraries of {binary.name}")
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
        raise ToolMissing(f"qemu-ga needs {', '.join(missing)}, which this host does not have.",
                          hint=f"Install them with: apt-get install -y {' '.join(needs)}")
    return found


def _find_kernel(tree: Path) -> Path:
    found = sorted((tree / "boot").glob("vmlinuz-*"))
    if not found:
        raise ImageError(f"no boot/vmlinuz-* in the unpacked {KERNEL_PACKAGE}.",
                         hint="Delete the guest folder's debs/ and build the guest again.")
    return found[-1]


# --- outputs ---------------------------------------------------------------------------------

def _make_disk(work: Path, out: Path) -> None:
    """``mkfs.ext4 -d`` fills the file system from a folder: no loop mount, no root needed."""
    content = work / "disk-content"
    content.mkdir(parents=True)
    (content / "README").write_text(scripts.DATA_README)
    raw = work / "data.raw"
    _run(["mkfs.ext4", "-q", "-F", "-L", "waymark-data",
          "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
          "-d", str(content), str(raw), DISK_SIZE], what="making the data disk's file system")
    staged = durable.temp_path(out)
    durable.remove(staged)
    qemu_img.convert(raw, "raw", staged)
    durable.fsync_file(staged)
    os.replace(staged, out)
    durable.fsync_dir(out.parent)


# --- host plumbing ---------------------------------------------------------------------------

def _run(argv: list[str], *, what: str) -> str:
    """process.run with the program's full path: sbin folders are off a user's PATH."""
    return process.run([_tool(argv[0]) or argv[0], *argv[1:]], what=what).stdout


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def _require_tools(*names: str) -> None:
    missing = [name for name in names if _tool(name) is None]
    if missing:
        packages = sorted({TOOLS.get(name, name) for name in missing})
        raise ToolMissing(f"Building the test guest needs {', '.join(missing)}, "
                          f"which {'is' if len(missing) == 1 else 'are'} not installed.",
                          hint=f"Install with: apt-get install -y {' '.join(packages)}")


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
