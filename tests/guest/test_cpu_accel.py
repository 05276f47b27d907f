"""The KVM probe on a real host, and a memory state restored on the CPU model it was taken on.

This machine is the witness the probe was made for: ``/dev/kvm`` exists and the firmware runs
under KVM (SeaBIOS reaches "No bootable device"), yet a Linux kernel hangs under it right after
its setup code. A probe that asks the firmware answers ``kvm`` and the VM hangs silently after
GRUB; the probe must boot a Linux kernel. The test finds out independently what this host's KVM
does (QEMU run directly, with more time than the probe takes) and holds the probe to it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.guest.guests import (
    STARTED,
    Guest,
    agent_exec,
    counters,
    create,
    readies,
    wait_for,
)
from tests.helpers import Waymark

KVM = Path("/dev/kvm")
WITNESS_SECONDS = 20.0  # four times the probe's timeout


def runs_under_kvm(marker: bytes, *args: str) -> bool:
    """Whether QEMU under KVM writes ``marker`` to the ``out`` chardev within the witness time
    (QEMU started here directly, as root, with no sandbox: nothing of Waymark)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.log"
        proc = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "kvm", "-machine", "pc-q35-7.2", "-cpu", "qemu64",
             "-nodefaults", "-display", "none", "-m", "256", "-no-reboot",
             "-chardev", f"file,id=out,path={out}", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + WITNESS_SECONDS
            while time.monotonic() < deadline and proc.poll() is None:
                if out.exists() and marker in out.read_bytes():
                    return True
                time.sleep(0.1)
            return False
        finally:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def kvm() -> None:
    if not (KVM.exists() and os.access(KVM, os.R_OK | os.W_OK)):
        pytest.skip(f"{KVM} is absent or not usable here: the probe answers tcg without "
                    "running (tests/unit/test_cpu_accel.py covers that answer)")


@pytest.mark.usefixtures("kvm")
def test_the_kvm_probe_of_a_disk_booting_vm_boots_a_linux_kernel_not_the_firmware(
        home: Waymark, image: dict[str, str]) -> None:
    """A VM that boots from its disk (no --kernel) is probed with a Linux kernel of the host
    (here WAYMARK_PROBE_KERNEL: this container has no /boot/vmlinuz-*). Its answer is what the
    kernel does under KVM, whatever the firmware does; ``--accel kvm`` where the kernel does not
    run is a clear error at start."""
    firmware = runs_under_kvm(b"No bootable device",
                              "-device", "isa-debugcon,iobase=0x402,chardev=out")
    kernel = runs_under_kvm(b"Linux version", "-kernel", image["kernel"], "-serial",
                            "chardev:out", "-append", "console=ttyS0 earlyprintk=serial,ttyS0")
    print(f"under KVM here: firmware {'runs' if firmware else 'hangs'}, Linux "
          f"{'runs' if kernel else 'hangs'}")
    env = home.env(WAYMARK_PROBE_KERNEL=image["kernel"])
    home("vm", "create", "disky", "--disk", "16M", "--memory", "128M", "--nic", "none")
    try:
        started = home.run("vm", "start", "disky", "--json", env=env).ok().json()
    finally:
        home.run("vm", "stop", "disky", "--force")
    assert started["accelerator"] == ("kvm" if kernel else "tcg"), started
    if not kernel:
        assert started["accelerator_reason"] == ("auto: this host's kernel printed nothing "
                                                 "under KVM within 5 s"), started
        home("vm", "set", "disky", "--accel", "kvm")
        refused = home.run("vm", "start", "disky", env=env)
        assert refused.returncode == 5, refused
        assert "asks for KVM (the VM's --accel), but KVM does not work on this host" \
            in refused.stderr and "--accel tcg" in refused.stderr, refused
        assert home.json("vm", "status", "disky")["state"] == "off"
    if firmware and not kernel:
        print("this host is the trap: a firmware-only probe would have answered kvm")


def test_a_standard_checkpoint_restores_on_the_cpu_model_it_was_taken_on(
        home: Waymark, image: dict[str, str]) -> None:
    """Taken on qemu64 (no SSE4.2 in the guest), applied after ``vm set --cpu Westmere``: the
    VM is qemu64 again, QEMU runs ``-cpu qemu64``, and the guest resumes counting (it did not
    boot) with the CPU it had; its agent answers, so ``vm status`` reports no silence."""
    vm: Guest = create(home, "pinned", image)
    home("vm", "set", "pinned", "--cpu", "qemu64")
    mark = vm.boot()
    assert "sse4_2" not in _cpu_flags(vm)
    vm.wait_counter_above(mark, 3)
    home("checkpoint", "create", "pinned", "--type", "standard", "--name", "on-qemu64")
    home("vm", "stop", "pinned", "--force")
    home("vm", "set", "pinned", "--cpu", "Westmere")
    mark = vm.mark()
    home("checkpoint", "apply", "pinned", "on-qemu64", "--discard-current", "--start")
    assert home.json("vm", "show", "pinned")["cpu_model"] == "qemu64"
    (pid,) = vm.qemus()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"-cpu") + 1] == b"qemu64"

    def resumed() -> list[int]:
        text = vm.since(mark)
        return counters(text[text.find(STARTED):]) if STARTED in text else []
    wait_for("a counter after the resume", resumed, 30.0)
    assert readies(vm.since(mark)) == [], "the guest booted instead of resuming"
    assert "sse4_2" not in _cpu_flags(vm)
    status = vm.status()
    assert status["agent"] and status["silence"] is None, status
    home("vm", "stop", "pinned", "--force")


def _cpu_flags(vm: Guest) -> str:
    return agent_exec(vm, "/bin/sh", "-c", "grep -m1 '^flags' /proc/cpuinfo")
