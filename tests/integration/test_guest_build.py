"""The test guest: built from Debian packages, cached, and booted once under real QEMU (TCG).

The guest is built into a folder that survives between runs (``$WAYMARK_TEST_GUEST`` or
``/var/tmp/waymark-test-guest``), so only the first run downloads packages. The boot test writes
to a throwaway overlay: the cached data disk is never written.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from waymark.cli.main import LazyGroup, cli
from waymark.errors import ToolMissing
from waymark.testguest import build as builder
from waymark.testguest import disk, media, scripts
from waymark.testguest.build import GuestImage

GUEST_DIR = Path(os.environ.get("WAYMARK_TEST_GUEST", "/var/tmp/waymark-test-guest"))
BOOT_TIMEOUT = 40.0


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return builder.build(GUEST_DIR)


def _initrd_names(initrd: Path) -> set[str]:
    """Entry names of gzipped newc cpio archives, concatenated (gzip reads every member)."""
    data, offset = gzip.decompress(initrd.read_bytes()), 0
    names: set[str] = set()
    while offset < len(data):
        assert data[offset:offset + 6] == b"070701", f"bad cpio header at {offset}"
        size = int(data[offset + 54:offset + 62], 16)
        name_size = int(data[offset + 94:offset + 102], 16)
        name = data[offset + 110:offset + 110 + name_size - 1].decode()
        names.add(name)
        offset += 110 + name_size
        offset += -offset % 4 + size
        offset += -offset % 4
        if name == "TRAILER!!!":  # the next archive starts at the next gzip member's data
            while data[offset:offset + 1] == b"\0":
                offset += 1
    return names - {"TRAILER!!!"}


def test_build_outputs(guest: GuestImage) -> None:
    assert guest.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
    names = _initrd_names(guest.initrd)
    assert {"init", "bin/busybox", "bin/sh", "sbin/shutdown", "usr/sbin/qemu-ga", "dev/console",
            "etc/modules", "etc/acpi/PWRF/00000080"} <= names
    assert any(name.endswith("libglib-2.0.so.0") for name in names)
    modules = {name for name in names if name.startswith("lib/modules/")}
    assert {f"lib/modules/{m}.ko" for m in builder.MODULES + builder.EFI_MODULES} <= modules
    assert "usr/bin/tpm2" not in names  # the direct-kernel initramfs stays small
    tools = _initrd_names(guest.initrd_tools)
    assert names <= tools
    assert {"usr/bin/tpm2", "usr/bin/tpm2_nvdefine", "usr/bin/tpm2_nvwrite", "usr/bin/tpm2_nvread",
            "usr/bin/tpm2_nvundefine", "usr/bin/tpm2_pcrread", "usr/bin/tpm2_getrandom",
            "usr/bin/chattr"} <= tools
    assert any(name.endswith("/libtss2-tcti-device.so.0") for name in tools)
    assert any(name.endswith("/libtss2-esys.so.0") for name in tools)
    assert _qemu_img_info(guest.disk)["virtual-size"] == 256 * 1024 * 1024
    boot = _qemu_img_info(guest.boot_disk)
    assert boot["format"] == "qcow2" and boot["virtual-size"] > 256 * 1024 * 1024
    assert guest.iso.read_bytes()[0x8001:0x8006] == b"CD001"  # an ISO 9660 volume descriptor


def _qemu_img_info(image: Path) -> Any:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                     capture_output=True, check=True).stdout)


def test_boot_disk_holds_grub_the_boot_files_and_the_data_file_system(
        guest: GuestImage, tmp_path: Path) -> None:
    """The layout docs/architecture.md describes, read without booting (the boots:
    tests/guest/test_guest_images.py)."""
    raw = tmp_path / "boot.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(guest.boot_disk), str(raw)],
                   check=True)
    with raw.open("rb") as image:
        head = image.read(34 * 512)
        types = [uuid.UUID(bytes_le=head[1024 + 128 * i:1024 + 128 * i + 16]) for i in range(3)]
        assert types == [disk.BIOS_BOOT, disk.EFI_SYSTEM, disk.LINUX_DATA]
        esp, data = (struct.unpack_from("<Q", head, 1024 + 128 * i + 32)[0] * 512
                     for i in (1, 2))
        image.seek(data + 1024 + 0x78)
        assert image.read(16).rstrip(b"\0") == b"waymark-data"  # the ext4 volume name
    assert head[0x1FE:0x200] == b"\x55\xaa" and head[512:520] == b"EFI PART"

    def mtools(*argv: str) -> str:
        return subprocess.run([*argv[:1], "-i", f"{raw}@@{esp}", *argv[1:]], check=True,
                              capture_output=True, text=True,
                              env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout
    assert set(mtools("mdir", "-b", "::/EFI/BOOT").split()) == {
        "::/EFI/BOOT/BOOTX64.EFI", "::/EFI/BOOT/grubx64.efi"}
    assert "linux /boot/vmlinuz console=ttyS0" in mtools("mtype", "::/boot/grub/grub.cfg")
    for name, built in (("vmlinuz", guest.kernel), ("initrd.img", guest.initrd_tools)):
        mtools("mcopy", f"::/boot/{name}", str(tmp_path / name))
        assert (tmp_path / name).read_bytes() == built.read_bytes()


def test_second_build_is_cached(guest: GuestImage) -> None:
    outputs = (guest.kernel, guest.initrd, guest.disk, guest.initrd_tools, guest.boot_disk,
               guest.iso)
    before = [path.stat().st_mtime_ns for path in outputs]
    again = builder.build(GUEST_DIR)
    assert not again.rebuilt
    assert again.inputs_hash == guest.inputs_hash
    assert again == GuestImage(*outputs, inputs_hash=guest.inputs_hash)
    assert [path.stat().st_mtime_ns for path in outputs] == before


def test_missing_record_rebuilds_from_cached_debs(guest: GuestImage, tmp_path: Path) -> None:
    """A build that never wrote inputs.json (interrupted) is redone, without downloading."""
    dest = tmp_path / "guest"
    shutil.copytree(GUEST_DIR / "debs", dest / "debs")
    for name in (builder.KERNEL_NAME, builder.INITRD_NAME):
        (dest / name).write_bytes(b"half")
    messages: list[str] = []
    rebuilt = builder.build(dest, log=messages.append)
    assert rebuilt.rebuilt and rebuilt.inputs_hash == guest.inputs_hash
    assert not any(message.startswith("Downloading") for message in messages)
    assert rebuilt.initrd.stat().st_size > 1_000_000
    assert rebuilt.disk.name == builder.disk_name() and rebuilt.disk.is_file()
    assert not (dest / ".work").exists()


def test_inputs_hash_follows_the_guest_scripts(monkeypatch: pytest.MonkeyPatch) -> None:
    versions = {"busybox-static": "1"}
    first = builder.inputs_hash(versions)
    monkeypatch.setitem(scripts.SCRIPTS, "init", "#!/bin/sh\n")
    assert builder.inputs_hash(versions) != first


def test_rebuild_keeps_the_data_disk_and_the_boot_disk(guest: GuestImage, tmp_path: Path
                                                        ) -> None:
    """VMs use the data disk and the boot disk in place as their base: a rebuild must not
    replace them (the same inputs give the same names)."""
    dest = tmp_path / "guest"
    shutil.copytree(GUEST_DIR / "debs", dest / "debs")
    disks = (dest / builder.disk_name(), dest / guest.boot_disk.name)
    for source, copy in zip((guest.disk, guest.boot_disk), disks, strict=True):
        shutil.copyfile(source, copy)
    before = [copy.stat().st_mtime_ns for copy in disks]
    rebuilt = builder.build(dest, force=True)
    assert (rebuilt.disk, rebuilt.boot_disk) == disks
    assert [copy.stat().st_mtime_ns for copy in disks] == before


def test_a_host_without_grub_images_is_told_which_packages_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "GRUB_ROOT", tmp_path)  # neither i386-pc nor x86_64-efi
    (tmp_path / "i386-pc").mkdir()
    dest = tmp_path / "guest"
    with pytest.raises(ToolMissing) as caught:
        builder.build(dest)
    assert "grub-efi-amd64-bin" in caught.value.message
    assert "grub-pc-bin" not in caught.value.message
    assert caught.value.hint == "Install with: apt-get install -y grub-efi-amd64-bin"
    assert not (dest / builder.INPUTS_NAME).exists()


def test_compressed_modules_are_unpacked_for_busybox_insmod(tmp_path: Path) -> None:
    plain = b"\x7fELF" + bytes(range(256)) * 8
    (tmp_path / "virtio-x.ko.xz").write_bytes(lzma.compress(plain))
    (tmp_path / "y.ko.gz").write_bytes(gzip.compress(plain))
    for name, module in (("virtio_x", "virtio-x.ko.xz"), ("y", "y.ko.gz")):
        unpacked = builder._plain_module(tmp_path / module, tmp_path / "plain")
        assert unpacked.name == f"{name}.ko"
        assert unpacked.read_bytes() == plain


def test_cli_prints_the_paths(guest: GuestImage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(LazyGroup.COMMANDS, "guest", ("waymark.cli.guest", "guest", "Guest."))
    result = CliRunner().invoke(cli, ["guest", "build", "--dest", str(GUEST_DIR), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["kernel"], data["initrd"], data["disk"]) == (
        str(guest.kernel), str(guest.initrd), str(guest.disk))
    assert (data["initrd_tools"], data["boot_disk"], data["iso"]) == (
        str(guest.initrd_tools), str(guest.boot_disk), str(guest.iso))
    text = CliRunner().invoke(cli, ["guest", "build", "--dest", str(GUEST_DIR)])
    assert "waymark vm create NAME --kernel" in text.stdout
    assert f"boot disk: {guest.boot_disk}" in text.stdout


# --- booting it ------------------------------------------------------------------------------

class Machine:
    """One QEMU process with the guest, its serial log, agent socket and QMP socket."""

    def __init__(self, guest: GuestImage, folder: Path) -> None:
        self.folder = folder
        self.serial = folder / "serial.log"
        overlay = folder / "overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(guest.disk), str(overlay)], check=True)
        self.overlay = overlay
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self._argv(guest), stdout=subprocess.DEVNULL,
                                     stderr=(folder / "qemu.err").open("wb"))

    def _argv(self, guest: GuestImage) -> list[str]:
        f = self.folder
        return [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "pc-q35-7.2", "-cpu", "qemu64",
            "-m", "256", "-nodefaults", "-display", "none",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", guest.append,
            "-chardev", f"file,id=ser0,path={self.serial}", "-serial", "chardev:ser0",
            "-blockdev", "driver=qcow2,node-name=data0,file.driver=file,"
                         f"file.filename={self.overlay}",
            "-device", "virtio-blk-pci,drive=data0",
            "-chardev", f"socket,id=qga0,path={f / 'qga.sock'},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vs0",
            "-device", "virtserialport,bus=vs0.0,chardev=qga0,name=org.qemu.guest_agent.0",
            "-qmp", f"unix:{f / 'qmp.sock'},server=on,wait=off",
        ]

    def console(self) -> str:
        try:
            return self.serial.read_bytes().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def wait_for(self, what: str, check: Callable[[str], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (found := check(self.console())) or self.proc.poll() is not None:
                break
            time.sleep(0.05)
        assert found, f"no {what} after {timeout} s; QEMU {self.proc.poll()}; console tail:\n" \
                      f"{self.console()[-2000:]}\n{(self.folder / 'qemu.err').read_text()}"
        return found

    def counters(self) -> list[int]:
        after_ready = self.console().partition("\nREADY ")[2]
        return [int(n) for n in re.findall(r"^COUNTER (\d+)$", after_ready, re.MULTILINE)]


@pytest.fixture
def machine(guest: GuestImage, tmp_path: Path) -> Iterator[Machine]:
    vm = Machine(guest, tmp_path)
    yield vm
    if vm.proc.poll() is None:
        vm.proc.kill()
        vm.proc.wait()


def _agent(path: Path, command: str) -> Any:
    """One guest agent command, after guest-sync-delimited drops any stale bytes (0xFF mark)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b'{"execute": "guest-sync-delimited", "arguments": {"id": 4242}}\n')
        buffer = b""
        while b"\n" not in buffer.partition(b"\xff")[2]:
            buffer += sock.recv(4096)
        assert json.loads(buffer.partition(b"\xff")[2]) == {"return": 4242}
        sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        reply = sock.makefile("rb").readline()
    return json.loads(reply)


def _qmp(path: Path, command: str) -> Any:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        stream = sock.makefile("rwb")
        assert "QMP" in json.loads(stream.readline())
        replies = []
        for execute in ("qmp_capabilities", command):
            stream.write(json.dumps({"execute": execute}).encode() + b"\n")
            stream.flush()
            while "return" not in (reply := json.loads(stream.readline())):
                assert "error" not in reply, reply
            replies.append(reply)
    return replies[-1]


def _ext4(image: Path, folder: Path, *command: str) -> str:
    raw = folder / "data.raw"
    if not raw.exists():
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)],
                       check=True)
    return subprocess.run([*command, str(raw)], capture_output=True, text=True, check=True).stdout


def test_guest_boots_counts_logs_and_powers_off(machine: Machine, guest: GuestImage) -> None:
    cached_disk = guest.disk.stat().st_mtime_ns
    ready = machine.wait_for("READY line", lambda text: re.search(
        r"^READY [0-9a-f-]{36}$", text, re.MULTILINE), BOOT_TIMEOUT)
    print(f"READY after {time.monotonic() - machine.started:.1f} s: {ready.group(0)}")
    assert _agent(machine.folder / "qga.sock", "guest-ping") == {"return": {}}
    machine.wait_for("COUNTER 11", lambda _text: len(machine.counters()) >= 11, 15)
    counters = machine.counters()
    assert counters == list(range(1, len(counters) + 1))

    assert _qmp(machine.folder / "qmp.sock", "system_powerdown") == {"return": {}}
    assert machine.proc.wait(timeout=20) == 0
    assert "\nSHUTDOWN poweroff\n" in machine.console()

    state = _ext4(machine.overlay, machine.folder, "dumpe2fs", "-h")
    assert re.search(r"^Filesystem state:\s+clean$", state, re.MULTILINE), state
    log = _ext4(machine.overlay, machine.folder, "debugfs", "-R", "cat /log.txt")
    lines = log.splitlines()
    assert log.endswith("\n") and len(lines) >= 2
    assert lines == [f"LINE {n}" for n in range(1, len(lines) + 1)]
    assert guest.disk.stat().st_mtime_ns == cached_disk  # only the overlay was written
