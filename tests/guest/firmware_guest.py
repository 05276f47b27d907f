"""From inside the test guest, through its guest agent: an EFI variable and a TPM NV index.

The test guest booted by UEFI mounts efivarfs on ``/sys/firmware/efi/efivars``; with a TPM 2.0
and ``initrd-tools.img`` (the boot disk and the ISO carry it) it has the real ``tpm2-tools`` and
``/dev/tpmrm0`` (:mod:`waymark.testguest.scripts`). These helpers run shell commands there with
:func:`tests.guest.guests.agent_exec`, so they work on a :class:`~tests.guest.guests.Guest` (a
Waymark VM) and on anything else whose ``run_dir`` holds the agent's socket ``qga.sock``.

A command that fails in the guest raises AssertionError with its exit code and stderr.

* EFI variables: the file ``<Name>-<GUID>`` in efivarfs holds 4 bytes of attributes (little
  endian) then the data, written in one ``write(2)``. Tests use :data:`WAYMARK_GUID`, a vendor
  GUID of Waymark's own, so they never touch the firmware's variables.
* TPM NV: an owner-hierarchy index (``tpm2_nvdefine -C o``) read and written with the owner's
  (empty) authorization, through the kernel's resource manager (TCTI ``device:/dev/tpmrm0``).
"""

from __future__ import annotations

import struct
import uuid
from typing import Any

from tests.guest.guests import agent_exec

WAYMARK_GUID = uuid.UUID("118d6cb2-4653-46f6-a907-57de5a2a1832")  # Waymark's test vendor GUID
EFIVARS = "/sys/firmware/efi/efivars"
# EFI_VARIABLE_NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS: kept in the variable store
NV_BS_RT = 0x7
TCTI = "device:/dev/tpmrm0"
NV_INDEX = 0x01500019  # in the owner's range (0x01000000-0x01FFFFFF)
NV_ATTRIBUTES = "ownerread|ownerwrite|authread|authwrite"

# Runs the script in a subshell whose stderr is kept; prints "EXIT <code>" after its stdout,
# then, when it failed, that stderr.
_WRAPPED = ('( {script} ) 2>/tmp/wm-stderr; code=$?; echo; echo "EXIT $code"; '
            '[ "$code" = 0 ] || cat /tmp/wm-stderr')


def guest_sh(vm: Any, script: str, *args: str) -> str:
    """``script`` run by the guest's ``sh`` with ``args`` as ``$1``...; its stdout."""
    out = agent_exec(vm, "/bin/sh", "-c", _WRAPPED.format(script=script), "sh", *args)
    stdout, found, rest = out.rpartition("\nEXIT ")
    assert found, f"no exit code from the guest's sh: {out!r}"
    code, _, stderr = rest.partition("\n")
    assert code == "0", f"{script!r} {args} failed in the guest (exit {code}): {stderr.strip()}"
    return stdout.removesuffix("\n")


def _octal(data: bytes) -> str:
    """``data`` as a printf format of octal escapes (no ``%`` or quote can appear)."""
    return "".join(f"\\{byte:03o}" for byte in data)


def _hex_bytes(od_output: str) -> bytes:
    return bytes.fromhex("".join(od_output.split()))


def _put_file(vm: Any, path: str, data: bytes) -> None:
    guest_sh(vm, 'printf "$1" >"$2"', _octal(data), path)


# --- EFI variables ---------------------------------------------------------------------------

def efi_variable_path(name: str, guid: uuid.UUID = WAYMARK_GUID) -> str:
    return f"{EFIVARS}/{name}-{guid}"


def efivarfs_mounted(vm: Any) -> bool:
    return f" {EFIVARS} efivarfs " in guest_sh(vm, "cat /proc/mounts")


def set_efi_variable(vm: Any, name: str, value: bytes, *, guid: uuid.UUID = WAYMARK_GUID,
                     attributes: int = NV_BS_RT) -> None:
    """Create or replace the variable.

    efivarfs makes the variables it creates immutable (all but a few well-known ones): lifted
    with ``chattr -i`` first. It cannot truncate either: the file is opened for appending
    (``>>``), and without the APPEND_WRITE attribute a write replaces the whole value; ``cat``
    copies the small file in one ``write(2)``, as efivarfs requires.
    """
    path = efi_variable_path(name, guid)
    _put_file(vm, "/tmp/wm-efivar", struct.pack("<I", attributes) + value)
    guest_sh(vm, '[ ! -e "$1" ] || chattr -i "$1"; cat /tmp/wm-efivar >>"$1"', path)


def read_efi_variable(vm: Any, name: str, *, guid: uuid.UUID = WAYMARK_GUID
                      ) -> tuple[int, bytes] | None:
    """The variable's attributes and data, or None when it does not exist."""
    path = efi_variable_path(name, guid)
    out = guest_sh(vm, '[ ! -e "$1" ] || od -An -v -tx1 "$1"', path)
    if not out.strip():
        return None
    raw = _hex_bytes(out)
    return struct.unpack("<I", raw[:4])[0], raw[4:]


def delete_efi_variable(vm: Any, name: str, *, guid: uuid.UUID = WAYMARK_GUID) -> None:
    guest_sh(vm, '[ ! -e "$1" ] || { chattr -i "$1"; rm "$1"; }', efi_variable_path(name, guid))


# --- TPM NV indices --------------------------------------------------------------------------

def tpm_present(vm: Any) -> bool:
    """The guest has a TPM 2.0 behind the kernel's resource manager."""
    return guest_sh(vm, "[ -c /dev/tpmrm0 ] && echo yes || true") == "yes"


def _tpm2(vm: Any, tool: str, *args: str) -> str:
    return guest_sh(vm, f'{tool} -T {TCTI} "$@"', *args)


def define_nv_index(vm: Any, size: int, index: int = NV_INDEX) -> None:
    """An owner NV index of ``size`` bytes, readable and writable with the owner's auth."""
    _tpm2(vm, "tpm2_nvdefine", "-C", "o", "-s", str(size), "-a", NV_ATTRIBUTES, f"{index:#x}")


def undefine_nv_index(vm: Any, index: int = NV_INDEX) -> None:
    _tpm2(vm, "tpm2_nvundefine", "-C", "o", f"{index:#x}")


def nv_indices(vm: Any) -> list[int]:
    """The NV indices the TPM holds (``tpm2_getcap handles-nv-index``)."""
    out = _tpm2(vm, "tpm2_getcap", "handles-nv-index")
    return [int(line.strip(" -"), 16) for line in out.splitlines() if line.strip(" -")]


def write_nv(vm: Any, data: bytes, index: int = NV_INDEX, offset: int = 0) -> None:
    _put_file(vm, "/tmp/wm-nv-in", data)
    _tpm2(vm, "tpm2_nvwrite", "-C", "o", "-i", "/tmp/wm-nv-in", "--offset", str(offset),
          f"{index:#x}")


def read_nv(vm: Any, size: int, index: int = NV_INDEX, offset: int = 0) -> bytes:
    _tpm2(vm, "tpm2_nvread", "-C", "o", "-s", str(size), "--offset", str(offset),
          "-o", "/tmp/wm-nv-out", f"{index:#x}")
    return _hex_bytes(guest_sh(vm, "od -An -v -tx1 /tmp/wm-nv-out"))


def pcr_sha256(vm: Any, pcr: int) -> bytes:
    """PCR ``pcr`` of the SHA-256 bank (``tpm2_pcrread -o``: the raw digest)."""
    _tpm2(vm, "tpm2_pcrread", f"sha256:{pcr}", "-o", "/tmp/wm-pcr")
    return _hex_bytes(guest_sh(vm, "od -An -v -tx1 /tmp/wm-pcr"))


def random_bytes(vm: Any, count: int) -> bytes:
    _tpm2(vm, "tpm2_getrandom", str(count), "-o", "/tmp/wm-random")
    return _hex_bytes(guest_sh(vm, "od -An -v -tx1 /tmp/wm-random"))
