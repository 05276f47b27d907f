"""The pure parts of CPU models and accelerators: the configuration's checks, the ``-cpu help``
parser, the accelerator's choice before any probe, the host kernel search, and the silence
report of ``vm status``. The real probe and real QEMUs: tests/guest/test_cpu_accel.py,
tests/integration/test_cpu_accel.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from waymark.engine.running import observe
from waymark.errors import Conflict, InvalidInput
from waymark.model.hardware import DEFAULT_CPU_MODEL, HardwareConfig
from waymark.qemu import accel, cmdline, cpus

HELP = """Available CPUs:
x86 486                   (alias configured by machine type)
x86 Skylake-Client-IBRS   (alias of Skylake-Client-v2)
x86 Westmere-v1           Westmere E56xx/L56xx/X56xx (Nehalem-C)
x86 qemu64                (alias configured by machine type)
x86 host                  processor with all supported host features
x86 max                   Enables all features supported by the accelerator in the current host

Recognized CPUID flags:
  3dnow 3dnowext 3dnowprefetch abm ace2 ace2-en acpi adx aes amd-no-ssb
"""


def allowed(path: str) -> bool:
    return True


def test_cpu_help_gives_the_model_names_not_the_flags() -> None:
    assert cpus.parse(HELP) == {"486", "Skylake-Client-IBRS", "Westmere-v1", "qemu64", "host",
                                "max"}


def test_a_configuration_written_before_cpu_models_loads_unchanged() -> None:
    """What every VM, checkpoint, bundle and backup point holds from before: qemu64, no
    ``accel`` key. It loads as qemu64 (its memory states need it) and ``auto``."""
    old = {"memory_mib": 256, "cpus": 1, "machine": "pc-q35-7.2", "cpu_model": "qemu64",
           "kernel": None, "initrd": None, "append": None, "disks": [], "nics": []}
    hardware = HardwareConfig.load_checked(old, allowed)
    assert (hardware.cpu_model, hardware.accel) == ("qemu64", "auto")
    assert HardwareConfig(memory_mib=1, cpus=1).cpu_model == "qemu64"  # the loading default
    assert DEFAULT_CPU_MODEL == "Westmere"  # a new VM's (waymark.usecases.vms.definitions)


@pytest.mark.parametrize("model", ["Skylake-Client-IBRS", "EPYC-Rome-v2", "qemu64", "486",
                                   "max", "host", "Icelake-Server-noTSX"])
def test_qemus_model_names_pass_the_check(model: str) -> None:
    HardwareConfig(memory_mib=1, cpus=1, cpu_model=model).check(allowed)


@pytest.mark.parametrize("model", ["qemu64,+vmx", "max,migratable=off", " qemu64", "-cpu",
                                   "", "x" * 65, "qemu64\n", None, 64])
def test_anything_else_as_a_cpu_model_is_refused(model: object) -> None:
    with pytest.raises(InvalidInput, match="is not a QEMU CPU model name"):
        HardwareConfig(memory_mib=1, cpus=1, cpu_model=model).check(allowed)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["KVM", "kvm,kernel-irqchip=off", "", None, "hvf"])
def test_an_unknown_accelerator_is_refused(value: object) -> None:
    with pytest.raises(InvalidInput, match=r"accelerator .* is unknown"):
        HardwareConfig(memory_mib=1, cpus=1, accel=value).check(allowed)  # type: ignore[arg-type]


def test_the_command_line_runs_the_pinned_model_under_the_chosen_accelerator() -> None:
    hardware = HardwareConfig(memory_mib=64, cpus=1, cpu_model="Skylake-Client", accel="kvm")
    launch = cmdline.Launch("vm", "00000000-0000-0000-0000-000000000000", hardware, (),
                            cmdline.RunFiles(Path("/run/x")), "tcg")
    args = cmdline.argv(launch)
    assert args[args.index("-cpu") + 1] == "Skylake-Client"
    assert args[args.index("-machine") + 1] == "pc-q35-7.2,accel=tcg"


@pytest.fixture
def no_kvm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """This host without /dev/kvm (the device path points nowhere)."""
    monkeypatch.setattr(accel, "KVM", tmp_path / "no-kvm")


def test_tcg_asked_for_needs_no_probe(tmp_path: Path) -> None:
    chosen = accel.choose(tmp_path, "vm", vm_accel="tcg", host_accel="kvm", kernel=None)
    assert chosen == accel.Choice("tcg", "asked for by the VM's --accel")
    chosen = accel.choose(tmp_path, "vm", vm_accel="auto", host_accel="tcg", kernel=None)
    assert chosen == accel.Choice("tcg", "asked for by WAYMARK_ACCEL")
    assert not (tmp_path / "accelerator.json").exists()


@pytest.mark.usefixtures("no_kvm")
def test_without_kvm_auto_runs_tcg_and_kvm_asked_for_is_a_clear_error(tmp_path: Path) -> None:
    chosen = accel.choose(tmp_path, "vm", vm_accel="auto", host_accel="auto", kernel=None)
    assert chosen.accelerator == "tcg" and "missing or not usable" in chosen.reason
    with pytest.raises(Conflict, match=r"asks for KVM \(the VM.s --accel\)") as err:
        accel.choose(tmp_path, "vm", vm_accel="kvm", host_accel="auto", kernel=None)
    assert "waymark vm set vm --accel tcg" in (err.value.hint or "")
    with pytest.raises(Conflict, match=r"asks for KVM \(WAYMARK_ACCEL\)"):
        accel.choose(tmp_path, "vm", vm_accel="auto", host_accel="kvm", kernel=None)


def test_the_probe_kernel_is_the_given_one_else_the_newest_readable_host_kernel(
        tmp_path: Path) -> None:
    old, new = tmp_path / "vmlinuz-6.1.0-1", tmp_path / "vmlinuz-6.1.0-9"
    for path, age in ((old, 100), (new, 10)):
        path.write_bytes(b"kernel")
        os.utime(path, (time.time() - age, time.time() - age))
    (tmp_path / "vmlinuz-dir").mkdir()
    patterns = (f"{tmp_path}/vmlinuz-*",)
    assert accel.host_kernel(None, patterns) == str(new)
    assert accel.host_kernel(str(old), patterns) == str(old)
    assert accel.host_kernel(None, (f"{tmp_path}/none-*",)) is None
    with pytest.raises(InvalidInput, match=r"WAYMARK_PROBE_KERNEL=.* is not a file"):
        accel.host_kernel(str(tmp_path / "missing"), patterns)


def test_a_guest_is_silent_only_after_the_threshold_without_serial_output(
        tmp_path: Path) -> None:
    run = cmdline.RunFiles(tmp_path)
    started = time.time() - 100
    run.serial_log.write_text("--- waymark: starting vm ---\n")
    os.utime(run.serial_log, (started - 1, started - 1))  # written before the start
    seen = observe.silence(run, {"started_at": started, "accelerator": "kvm"}, "vm", 60.0)
    assert seen is not None and seen["seconds"] >= 100
    assert "nothing since it started" in seen["message"] and "under kvm" in seen["message"]
    assert str(run.serial_log) in seen["message"]
    assert "waymark vm set vm --accel tcg" in seen["hint"]
    os.utime(run.serial_log, (started + 90, started + 90))  # it printed 10 s ago
    assert observe.silence(run, {"started_at": started, "accelerator": "kvm"}, "vm", 60.0) is None
    seen = observe.silence(run, {"started_at": started, "accelerator": "tcg"}, "vm", 5.0)
    assert seen is not None and "nothing new" in seen["message"]
    assert "console=ttyS0" in seen["hint"] and "--accel tcg" not in seen["hint"]
    assert observe.silence(run, {}, "vm", 0.0) is None  # a runtime file from before: no start
