"""The test guest's boot disk and ISO boot by their own GRUB under SeaBIOS and OVMF, and from
inside a UEFI guest with a TPM the helpers of :mod:`tests.guest.firmware_guest` keep an EFI
variable and a TPM NV index.

QEMU (and swtpm) are started here directly, not through Waymark, under TCG, each in a temporary
folder, and killed at the end of the test: these tests prove the images themselves. The boot
disk under Secure Boot and the ISO under OVMF are booted as Waymark VMs instead
(tests/guest/test_firmware.py, tests/guest/test_media.py), which proves the same and more.
Each boot prints its time to READY (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest import firmware_guest as fw
from tests.guest.guests import BOOT_TIMEOUT, READY_RE, wait_for

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
OVMF_BOOT_TIMEOUT = 120.0  # OVMF under TCG on a busy 2-core machine: ~12 s, sometimes far more


class Machine:
    """One qemu-system-x86_64 (q35, TCG) of the guest: serial log, guest agent and QMP sockets
    in ``run_dir`` (what :func:`tests.guest.guests.agent_exec` needs)."""

    def __init__(self, run_dir: Path, *, uefi: bool = False, tpm: bool = False) -> None:
        self.run_dir = run_dir
        self.serial = run_dir / "serial.log"
        self.vars = run_dir / "OVMF_VARS_4M.fd"
        self.tpm_state = run_dir / "tpm"
        self.uefi, self.tpm = uefi, tpm
        self.devices: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.started = 0.0

    def disk(self, base: Path, *, boot: bool) -> Path:
        """A throwaway qcow2 overlay of ``base`` as a virtio disk (the cached image is never
        written)."""
        overlay = self.run_dir / f"disk{len(self.devices)}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(base), str(overlay)], check=True)
        node = f"disk{len(self.devices)}"
        self.devices += ["-blockdev", f"driver=qcow2,node-name={node},file.driver=file,"
                                      f"file.filename={overlay}",
                         "-device", f"virtio-blk-pci,drive={node}" + (",bootindex=0" * boot)]
        return overlay

    def cdrom(self, iso: Path) -> None:
        self.devices += ["-blockdev", f"driver=raw,node-name=cd0,read-only=on,file.driver=file,"
                                      f"file.filename={iso}",
                         "-device", "ide-cd,drive=cd0,bootindex=0"]

    def start(self) -> None:
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-cpu", "qemu64",
                "-m", "256", "-nodefaults", "-display", "none",
                "-chardev", f"file,id=ser0,path={self.serial}", "-serial", "chardev:ser0",
                "-chardev", f"socket,id=qga0,path={self.run_dir / 'qga.sock'},server=on,wait=off",
                "-device", "virtio-serial-pci,id=vs0",
                "-device", "virtserialport,bus=vs0.0,chardev=qga0,name=org.qemu.guest_agent.0",
                "-qmp", f"unix:{self.run_dir / 'qmp.sock'},server=on,wait=off",
                *self._firmware(), *self._tpm(), *self.devices]
        self.started = time.monotonic()
        self.processes.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                               stderr=(self.run_dir / "qemu.err").open("wb")))

    def _firmware(self) -> list[str]:
        if not self.uefi:
            return []  # SeaBIOS
        shutil.copyfile(OVMF_VARS, self.vars)
        return ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,file={self.vars}"]

    def _tpm(self) -> list[str]:
        """swtpm (TPM 2.0, state in ``tpm/``) and a CRB TPM device talking to it."""
        if not self.tpm:
            return []
        self.tpm_state.mkdir()
        ctrl = self.run_dir / "swtpm.sock"
        self.processes.append(subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.tpm_state}",
             "--ctrl", f"type=unixio,path={ctrl}", "--log", f"file={self.run_dir / 'swtpm.log'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for("swtpm's socket", ctrl.exists, 10.0)
        return ["-chardev", f"socket,id=chrtpm,path={ctrl}",
                "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0"]

    def console(self) -> str:
        try:
            return self.serial.read_bytes().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def wait_ready(self, what: str, timeout: float) -> float:
        """Seconds from start to the READY line (printed); fails with the console's tail."""
        qemu = self.processes[-1]
        with contextlib.suppress(AssertionError):  # the assert below says what went wrong
            wait_for(f"READY from {what}",
                     lambda: READY_RE.search(self.console()) or qemu.poll() is not None, timeout)
        elapsed = time.monotonic() - self.started
        assert READY_RE.search(self.console()), (
            f"{what}: no READY after {elapsed:.1f} s (QEMU {qemu.poll()}); console tail:\n"
            f"{self.console()[-3000:]}\n{(self.run_dir / 'qemu.err').read_text()}")
        print(f"{what}: READY after {elapsed:.1f} s")
        return elapsed

    def power_off(self) -> None:
        """The ACPI power button: the guest's shutdown unmounts /data and powers off."""
        qmp(self.run_dir / "qmp.sock", "system_powerdown")
        assert self.processes[-1].wait(timeout=60) == 0
        assert "\nSHUTDOWN poweroff\n" in self.console()

    def kill(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.kill()
            process.wait()


def qmp(path: Path, command: str) -> Any:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        stream = sock.makefile("rwb")
        json.loads(stream.readline())  # the greeting
        for execute in ("qmp_capabilities", command):
            stream.write(json.dumps({"execute": execute}).encode() + b"\n")
            stream.flush()
            while "return" not in (reply := json.loads(stream.readline())):
                assert "error" not in reply, reply
        return reply["return"]


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Any]:
    """A factory of machines in ``tmp_path``; every process they started is killed at the end."""
    made: list[Machine] = []

    def make(name: str, **options: bool) -> Machine:
        folder = tmp_path / name
        folder.mkdir()
        made.append(Machine(folder, **options))
        return made[-1]
    yield make
    for vm in made:
        vm.kill()


def mounts(vm: Machine) -> dict[str, str]:
    """Mount point -> device or file system in the guest."""
    return {fields[1]: fields[0] for line in fw.guest_sh(vm, "cat /proc/mounts").splitlines()
            if len(fields := line.split()) >= 3}


def logged_lines(vm: Machine) -> list[str]:
    """The guest's /data/log.txt once it holds a LINE record."""
    return wait_for("a LINE record in /data/log.txt",
                    lambda: fw.guest_sh(vm, "cat /data/log.txt 2>/dev/null || true").splitlines(),
                    20.0, interval=0.5)


# --- the boot disk ---------------------------------------------------------------------------

def test_boot_disk_boots_by_seabios_and_logs_on_its_own_data_partition(
        image: dict[str, str], machine: Any) -> None:
    vm = machine("seabios")
    vm.disk(Path(image["boot_disk"]), boot=True)
    vm.start()
    vm.wait_ready("boot disk, SeaBIOS", BOOT_TIMEOUT)
    assert "GRUB: booting the Waymark test guest" in vm.console()
    assert "Command line: BOOT_IMAGE=/boot/vmlinuz console=ttyS0" in vm.console()
    assert mounts(vm)["/data"] == "/dev/vda3"
    assert logged_lines(vm)[0] == "LINE 1"
    # booted by BIOS, without a TPM: no efivarfs, no TPM device, no warning about either
    assert fw.EFIVARS not in mounts(vm)
    assert not fw.tpm_present(vm)
    assert not re.search(r"^WARNING:", vm.console(), re.MULTILINE)
    vm.power_off()


def test_boot_disk_under_ovmf_with_a_tpm_keeps_an_efi_variable_and_an_nv_index(
        image: dict[str, str], machine: Any) -> None:
    vm = machine("ovmf-tpm", uefi=True, tpm=True)
    vm.disk(Path(image["boot_disk"]), boot=True)
    vm.start()
    vm.wait_ready("boot disk, OVMF + swtpm", OVMF_BOOT_TIMEOUT)
    assert mounts(vm)["/data"] == "/dev/vda3"
    assert mounts(vm)[fw.EFIVARS] == "efivarfs"
    assert fw.tpm_present(vm)

    assert fw.read_efi_variable(vm, "WaymarkTest") is None
    fw.set_efi_variable(vm, "WaymarkTest", b"checkpoint-1")
    assert fw.read_efi_variable(vm, "WaymarkTest") == (fw.NV_BS_RT, b"checkpoint-1")
    fw.set_efi_variable(vm, "WaymarkTest", b"changed")  # replaced, not appended
    assert fw.read_efi_variable(vm, "WaymarkTest") == (fw.NV_BS_RT, b"changed")
    fw.set_efi_variable(vm, "WaymarkGone", b"x")
    fw.delete_efi_variable(vm, "WaymarkGone")
    assert fw.read_efi_variable(vm, "WaymarkGone") is None

    assert fw.NV_INDEX not in fw.nv_indices(vm)
    fw.define_nv_index(vm, 16)
    assert fw.NV_INDEX in fw.nv_indices(vm)
    fw.write_nv(vm, b"tpm-value-0001\x00\xff")
    assert fw.read_nv(vm, 16) == b"tpm-value-0001\x00\xff"
    fw.write_nv(vm, b"02", offset=12)
    assert fw.read_nv(vm, 16) == b"tpm-value-0002\x00\xff"
    fw.define_nv_index(vm, 4, index=fw.NV_INDEX + 1)
    fw.undefine_nv_index(vm, index=fw.NV_INDEX + 1)
    assert fw.nv_indices(vm) == [fw.NV_INDEX]
    # OVMF measured the boot into the TPM; its random number generator answers
    assert fw.pcr_sha256(vm, 0) not in (bytes(32), b"")
    assert len(set(fw.random_bytes(vm, 16))) > 1

    vm.power_off()
    # the variable lives in the VM's own variable store (the pflash copy), not in the template
    stored = vm.vars.read_bytes()
    assert "WaymarkTest".encode("utf-16-le") in stored and b"changed" in stored
    assert "WaymarkTest".encode("utf-16-le") not in OVMF_VARS.read_bytes()
    assert (vm.tpm_state / "tpm2-00.permall").is_file()


# --- the ISO ---------------------------------------------------------------------------------

def test_iso_boots_with_the_data_disk_attached(image: dict[str, str], machine: Any) -> None:
    uefi = False  # under OVMF: tests/guest/test_media.py boots it in a Waymark UEFI VM
    vm = machine("iso", uefi=uefi)
    vm.cdrom(Path(image["iso"]))
    vm.disk(Path(image["disk"]), boot=False)
    vm.start()
    vm.wait_ready(f"ISO, {'OVMF' if uefi else 'SeaBIOS'}",
                  OVMF_BOOT_TIMEOUT if uefi else BOOT_TIMEOUT)
    assert re.search(r"^GRUB: booting the Waymark test guest", vm.console(), re.MULTILINE)
    assert mounts(vm)["/data"] == "/dev/vda"
    assert logged_lines(vm)[0] == "LINE 1"
    assert (fw.EFIVARS in mounts(vm)) == uefi
    vm.power_off()
