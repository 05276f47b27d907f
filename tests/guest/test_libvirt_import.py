"""A UEFI + TPM domain defined by a real libvirt 9.0 (a private libvirtd: tests/libvirt_host.py),
the test guest's boot disk as its disk, imported with ``vm import-libvirt``: the VM's variable
store is the domain's NVRAM file and its TPM state libvirt's, byte for byte; it boots by Secure
Boot to READY (host-model becomes Waymark's named CPU model), its guest reads the NV index
written into libvirt's TPM before the import, and it takes a production checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.firmware_guest import read_nv, tpm_present
from tests.guest.guests import Guest
from tests.helpers import Waymark, content_sha256, file_sha256
from tests.libvirt_host import NVRAM_DIR, OVMF, SWTPM_DIR, Libvirt, private_libvirtd, unique
from tests.tpm_host import NV, nv_write

UEFI_BOOT = 240.0  # seconds: OVMF with SMM under TCG on a loaded 2-core machine
SECRET = "sealed-in-libvirt"[:16]


@pytest.fixture(scope="module")
def libvirt() -> Iterator[Libvirt]:
    with private_libvirtd() as daemon:
        yield daemon


def test_an_imported_uefi_tpm_domain_boots_with_its_own_tpm_and_checkpoints(
        home: Waymark, image: dict[str, str], libvirt: Libvirt) -> None:
    boot_disk = Path(image["boot_disk"])
    fmt = "qcow2" if boot_disk.read_bytes()[:4] == b"QFI\xfb" else "raw"
    name = unique("wm-gen2")
    xml = libvirt.define(f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>
  <features><acpi/><smm state='on'/></features>
  <cpu mode='host-model'/>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>
      <source file='{boot_disk}'/><target dev='vda' bus='virtio'/></disk>
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <graphics type='vnc' port='-1'/>
  </devices>
</domain>""")
    libvirt.give_state(name, OVMF / "OVMF_VARS_4M.ms.fd", tpm=True)
    libvirt_tpm = SWTPM_DIR / libvirt.uuid(name) / "tpm2"
    nv_write(libvirt_tpm, SECRET)  # a secret the domain's TPM holds
    shown = home.run("vm", "import-libvirt", "-", "--name", "from-libvirt", "--json",
                     input=xml).ok().json()
    assert (shown["firmware"], shown["tpm"]) == ("uefi-secure", True)
    assert shown["cpu_model"] == "Westmere"  # host-model: Waymark's named default (the test
    # guest's kernel does not boot on qemu64, libvirt's default for a TCG domain)
    assert content_sha256(shown["firmware_variables"]["active_image"]) == \
        file_sha256(NVRAM_DIR / f"{name}_VARS.fd")
    ours = home.home / "vms" / shown["id"] / "tpm" / "tpm2-00.permall"
    assert ours.read_bytes() == (libvirt_tpm / "tpm2-00.permall").read_bytes()
    vm = Guest(home, "from-libvirt")
    mark = vm.mark()
    home("vm", "start", vm.name)
    vm.wait_ready(mark, UEFI_BOOT)  # OVMF, Debian's signed shim and GRUB, the kernel
    assert tpm_present(vm)
    assert read_nv(vm, 16, index=int(NV, 16)).decode().strip() == SECRET
    made = home.json("checkpoint", "create", vm.name, "--name", "imported", "--type",
                     "production")
    assert made["kind"] == "production" and made["freeze_seconds"] is not None, made
    vm.ensure_off()
