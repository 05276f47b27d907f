"""The host programs the test guest's build runs, and the Debian package that ships each.

Shared by :mod:`waymark.testguest.build` (kernel, initramfs, data disk) and
:mod:`waymark.testguest.media` (boot disk, ISO): a missing program is a
:class:`~waymark.errors.ToolMissing` naming the ``apt-get install`` line.
"""

from __future__ import annotations

import shutil

from waymark import process
from waymark.errors import ToolMissing

# Host programs the build runs -> the Debian package that ships each.
TOOLS = {"apt-get": "apt", "apt-cache": "apt", "env": "coreutils", "dpkg-deb": "dpkg",
         "dpkg-query": "dpkg", "modinfo": "kmod", "ldd": "libc-bin", "mkfs.ext4": "e2fsprogs",
         "qemu-img": "qemu-utils", "zstd": "zstd", "grub-mkimage": "grub-common",
         "grub-mkrescue": "grub-common", "xorriso": "xorriso", "mkfs.fat": "dosfstools",
         "mmd": "mtools", "mcopy": "mtools", "mformat": "mtools"}
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def run(argv: list[str], *, what: str) -> str:
    """process.run with the program's full path: sbin folders are off a user's PATH."""
    return process.run([tool(argv[0]) or argv[0], *argv[1:]], what=what).stdout


def tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def require_tools(*names: str) -> None:
    missing = [name for name in names if tool(name) is None]
    if missing:
        packages = sorted({TOOLS.get(name, name) for name in missing})
        raise ToolMissing(f"Building the test guest needs {', '.join(missing)}, "
                          f"which {'is' if len(missing) == 1 else 'are'} not installed.",
                          hint=f"Install with: apt-get install -y {' '.join(packages)}")
