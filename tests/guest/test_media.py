"""The CD drive on a real guest (TCG, SeaBIOS): a VM boots an ISO first when its boot order says
so, its drive changes while it runs, and a checkpoint puts its ISO back.

The bootable ISO is made here (``grub-mkrescue``: GRUB for BIOS booting the test guest's kernel
and initramfs, a marker on the kernel command line), as is a plain data ISO (``xorriso``). The
test guest's kernel (Debian's cloud kernel) has no AHCI driver, so Linux in the guest cannot
read the SATA CD drive itself: what it booted from is its kernel command line, the marker only
the ISO's GRUB gives.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.guest.guests import Guest, agent_exec
from tests.helpers import Waymark, file_sha256

MARKER = "waymark.booted=cd"
GRUB_CFG = f"""set timeout=0
menuentry "waymark test guest from its ISO" {{
  linux /boot/vmlinuz console=ttyS0 {MARKER}
  initrd /boot/initrd.img
}}
"""


@pytest.fixture(scope="module")
def isos(home: Waymark, image: dict[str, str], tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, Path]:
    """``boot``: the test guest on a BIOS-bootable ISO; ``tools``: an ISO of one text file."""
    for tool, package in (("grub-mkrescue", "grub-pc-bin"), ("xorriso", "xorriso")):
        if shutil.which(tool) is None:
            raise RuntimeError(f"missing {tool} (apt-get install -y {package})")
    folder = tmp_path_factory.mktemp("isos")
    root = folder / "boot-root"
    (root / "boot" / "grub").mkdir(parents=True)
    (root / "boot" / "grub" / "grub.cfg").write_text(GRUB_CFG)
    for name in ("kernel", "initrd"):
        target = root / "boot" / ("vmlinuz" if name == "kernel" else "initrd.img")
        target.write_bytes(Path(image[name]).read_bytes())
    tools = folder / "tools-root"
    tools.mkdir()
    (tools / "README.TXT").write_text("virtio drivers would be here\n")
    made = {"boot": folder / "boot.iso", "tools": folder / "tools.iso"}
    subprocess.run(["grub-mkrescue", "-d", "/usr/lib/grub/i386-pc", "-o", str(made["boot"]),
                    str(root)], check=True, capture_output=True)
    subprocess.run(["xorriso", "-as", "mkisofs", "-V", "WAYMARK_TOOLS", "-o",
                    str(made["tools"]), str(tools)], check=True, capture_output=True)
    return made


def drive(vm: Guest) -> dict[str, Any]:
    """The CD drive as the running QEMU has it, its medium's file mapped to its path."""
    (found,) = [d for d in vm.qmp_command("query-block") if d.get("qdev") == "cd0"]
    if "inserted" in found:
        found["inserted"]["path"] = vm.qemu_file()(found["inserted"]["file"])
    return dict(found)


def test_a_vm_boots_its_iso_first_and_its_drive_changes_while_it_runs(
        home: Waymark, image: dict[str, str], isos: dict[str, Path]) -> None:
    digests = {name: file_sha256(path) for name, path in isos.items()}
    home("vm", "create", "cd", "--disk", image["disk"], "--memory", "256M",
         "--boot", "cdrom,disk", "--checkpoint-type", "standard", "--accel", "tcg")
    home("vm", "media", "insert", "cd", str(isos["boot"]))
    vm = Guest(home, "cd")
    vm.boot()  # no --kernel: only the ISO's GRUB can boot the guest
    assert MARKER in agent_exec(vm, "/bin/cat", "/proc/cmdline").split()
    cd = drive(vm)
    assert (cd["tray_open"], cd["inserted"]["ro"], cd["inserted"]["drv"]) == (False, True, "raw")
    assert cd["inserted"]["path"] == str(isos["boot"])

    home("vm", "media", "eject", "cd")
    cd = drive(vm)
    assert "inserted" not in cd and cd["tray_open"] is False
    assert str(isos["boot"]) not in json.dumps(vm.qmp_command("query-fdsets"))  # released
    mark = vm.mark()
    vm.wait_counter_above(mark, 0)  # the guest runs on
    assert vm.state() == "running"

    home("vm", "media", "insert", "cd", str(isos["tools"]))
    cd = drive(vm)
    assert (cd["inserted"]["path"], cd["inserted"]["ro"]) == (str(isos["tools"]), True)
    assert home.json("vm", "show", "cd")["media"] == str(isos["tools"])
    assert {n: file_sha256(p) for n, p in isos.items()} == digests  # never written


def test_a_standard_checkpoint_puts_its_iso_back_when_applied(
        home: Waymark, isos: dict[str, Path]) -> None:
    vm = Guest(home, "cd")
    vm.ensure_running()
    home("vm", "media", "insert", "cd", str(isos["boot"]))
    home("checkpoint", "create", "cd", "--name", "with-iso")
    home("vm", "media", "eject", "cd")
    saved = vm.wait_counter_above(vm.mark(), 0)

    home("checkpoint", "apply", "cd", "with-iso", "--discard-current")
    assert vm.state() == "saved"
    assert home.json("vm", "show", "cd")["media"] == str(isos["boot"])
    mark = vm.mark()
    home("vm", "start", "cd")  # resumes the checkpoint's memory, its ISO in the drive
    resumed = vm.wait_counter_above(mark, 0)
    assert min(resumed) < max(saved), "the guest resumed at the checkpoint, not later"
    cd = drive(vm)
    assert (cd["inserted"]["path"], cd["tray_open"]) == (str(isos["boot"]), False)


def test_the_test_guests_iso_boots_a_uefi_vm(home: Waymark, image: dict[str, str]) -> None:
    """The test guest's own ISO (GRUB for BIOS and UEFI) in the CD drive of a UEFI VM whose
    first boot device is the drive: OVMF boots it (the BIOS case: the test above)."""
    home("vm", "create", "cd-uefi", "--disk", image["disk"], "--memory", "256M",
         "--firmware", "uefi", "--boot", "cdrom,disk", "--accel", "tcg")
    home("vm", "media", "insert", "cd-uefi", image["iso"])
    vm = Guest(home, "cd-uefi")
    mark = vm.mark()
    home("vm", "start", "cd-uefi")
    vm.wait_ready(mark, 240.0)  # OVMF under TCG
    assert "GRUB: booting the Waymark test guest" in vm.since(mark)  # the ISO's GRUB, by UEFI
    assert vm.status()["state"] == "running"
    home("vm", "stop", "cd-uefi", "--force")
