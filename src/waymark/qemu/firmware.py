"""UEFI firmware (OVMF, Debian's ``ovmf`` package) for a VM's ``firmware`` setting.

The executable is the host's, read-only, never part of the VM (as libvirt and Proxmox do it: a
package update fixes every VM at its next cold boot; a memory state carries the firmware it was
taken with in its RAM). The variable store is the VM's own: copied from the package's template
when the VM is created, then a disk of the VM (``HardwareConfig.nvram``; docs/firmware.md).

The files and what they need are those of the package's descriptors in
``/usr/share/qemu/firmware`` (``60-edk2-x86_64.json``, ``40-edk2-x86_64-secure-enrolled.json``):
Secure Boot needs SMM and a flash only SMM code may write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from waymark.errors import ToolMissing

OVMF = Path("/usr/share/OVMF")


@dataclass(frozen=True)
class Firmware:
    """One UEFI build: its code, the template of its variable store, whether it needs SMM."""

    code: Path
    variables: Path
    secure: bool


BUILDS = {
    "uefi": Firmware(OVMF / "OVMF_CODE_4M.fd", OVMF / "OVMF_VARS_4M.fd", secure=False),
    # Microsoft's keys enrolled, Secure Boot on: what Windows and shim-signed Linux boot with
    "uefi-secure": Firmware(OVMF / "OVMF_CODE_4M.ms.fd", OVMF / "OVMF_VARS_4M.ms.fd",
                            secure=True),
}


def build(kind: str) -> Firmware:
    """The installed build for ``kind`` (``uefi`` or ``uefi-secure``); ToolMissing, saying what
    to install, when its files are absent."""
    found = BUILDS[kind]
    for path in (found.code, found.variables):
        if not path.is_file():
            raise ToolMissing(f"the UEFI firmware file {path} is missing.",
                              hint="Install Debian's ovmf package: apt-get install ovmf")
    return found


def machine_options(kind: str, code_node: str, variables_node: str) -> list[str]:
    """The ``-machine`` sub-options and ``-global`` arguments of a UEFI VM's two flash chips."""
    options = [f"pflash0={code_node}", f"pflash1={variables_node}"]
    if BUILDS[kind].secure:
        options.append("smm=on")
    return options


def global_options(kind: str) -> list[str]:
    """``-global`` arguments: with Secure Boot only SMM code may write the variable store."""
    return ["-global", "driver=cfi.pflash01,property=secure,value=on"] \
        if BUILDS[kind].secure else []
