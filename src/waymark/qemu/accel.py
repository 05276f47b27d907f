"""KVM when it works, TCG otherwise: decided by a bounded probe, cached per host boot.

``/dev/kvm`` existing proves nothing: on some hosts (nested virtualization) the firmware and even
a long-mode test run fine under KVM while a Linux kernel hangs right after its setup code. So
the probe always boots a *Linux kernel* under ``-accel kvm`` (earlyprintk on a serial file) and
asks it to print ``Linux version`` within the timeout, never only the firmware (SeaBIOS and OVMF
run fine under KVM on such hosts, then the guest's kernel hangs after GRUB):

- a VM that boots a kernel directly is probed with *that kernel*;
- a VM that boots from its disk or an installation medium (BIOS or UEFI) is probed with a kernel
  of this host: ``WAYMARK_PROBE_KERNEL``, else the newest readable ``/boot/vmlinuz-*`` (or
  ``/vmlinuz``). A host with no kernel file at all (a container) cannot be probed: ``auto``
  answers ``tcg`` and says why (``WAYMARK_ACCEL=kvm`` or ``--accel kvm`` asks for KVM anyway).

What a VM asks for (:func:`choose`): its own ``--accel kvm|tcg``, else this host's
``WAYMARK_ACCEL``, else ``auto`` (the probe). ``tcg`` always works; ``kvm`` where the probe
fails (or ``/dev/kvm`` is missing) is a clear error at start, never a silent hang.

Answers are cached per host boot (and per kernel file), so the probe costs once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from waymark import durable
from waymark.errors import Conflict, InvalidInput
from waymark.qemu import cmdline, confine

log = logging.getLogger(__name__)

PROBE_SECONDS = 5.0
KERNEL_STARTED = b"Linux version"
QEMU = "qemu-system-x86_64"
KVM = Path("/dev/kvm")
# where a host keeps its own kernels (Debian, Ubuntu, Fedora: /boot/vmlinuz-<version>)
HOST_KERNELS = ("/boot/vmlinuz-*", "/vmlinuz", "/boot/vmlinuz")


@dataclass(frozen=True)
class Choice:
    """The accelerator a VM runs under, and why (in words without host paths: the serial
    log's start line, ``vm status``)."""

    accelerator: str  # kvm | tcg
    reason: str


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _probe(proc: subprocess.Popen[bytes], out: Path, marker: bytes, timeout: float) -> bool:
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and marker in out.read_bytes():
                return True
            time.sleep(0.05)
        return False
    finally:
        proc.kill()
        proc.wait()


def kvm_usable() -> bool:
    return os.access(KVM, os.R_OK | os.W_OK)


def _kvm_runs(kernel: str, timeout: float, owner: confine.Identity | None) -> bool:
    """The probe, confined as the VM's QEMU will be (its user, the sandbox, files handed over
    open): does ``kernel`` print its first line under KVM?"""
    if not kvm_usable():
        return False
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.log"
        given = confine.Handoff(owner)
        try:
            given.log(str(out))
            argv = [QEMU, "-accel", "kvm", "-machine", "pc-q35-7.2", "-cpu", "qemu64",
                    "-nodefaults", "-display", "none", "-m", "256", "-no-reboot",
                    "-sandbox", cmdline.SANDBOX, *given.args,
                    "-chardev", f"file,id=out,path={given.files[str(out)]}"]
            given.boot_file(kernel)
            argv += ["-kernel", given.files[kernel], "-serial", "chardev:out",
                     "-append", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1"]
            log.debug("kvm probe: %s", " ".join(argv))
            proc = confine.spawn(argv, given, Path(tmp) / "probe.err", what="probing KVM")
        finally:
            given.close()
        return _probe(proc, out, KERNEL_STARTED, timeout)


def _kernel_key(kernel: str) -> str:
    stat = os.stat(kernel)
    return f"{kernel}:{stat.st_size}:{stat.st_mtime_ns}"


def host_kernel(given: str | None = None, patterns: tuple[str, ...] = HOST_KERNELS
                ) -> str | None:
    """A Linux kernel of this host for the probe: ``given`` (``WAYMARK_PROBE_KERNEL``; one
    that is no file is an error), else the newest readable file ``patterns`` match."""
    if given is not None:
        if not Path(given).is_file():
            raise InvalidInput(f"WAYMARK_PROBE_KERNEL={given!r} is not a file.",
                               hint="Name a Linux kernel (bzImage), e.g. /boot/vmlinuz-6.1.0, "
                                    "or unset it.")
        return given
    found = [path for pattern in patterns for path in Path("/").glob(pattern.lstrip("/"))
             if path.is_file() and os.access(path, os.R_OK)]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def choose(cache_dir: Path, name: str, *, vm_accel: str, host_accel: str, kernel: str | None,
           probe_kernel: str | None = None, owner: confine.Identity | None = None) -> Choice:
    """The accelerator VM ``name`` runs under: ``vm_accel`` (its ``--accel``), whose ``auto``
    takes ``host_accel`` (``WAYMARK_ACCEL``), whose ``auto`` probes with ``kernel`` (the VM's
    own) or else this host's (:func:`host_kernel`). KVM asked for where it does not run Linux
    is a Conflict naming the way out."""
    wanted, by = ((vm_accel, "the VM's --accel") if vm_accel != "auto"
                  else (host_accel, "WAYMARK_ACCEL") if host_accel != "auto" else ("auto", ""))
    if wanted == "tcg":
        return Choice("tcg", f"asked for by {by}")
    if not kvm_usable():
        _refuse_kvm(wanted, name, by, f"{KVM} is missing or not usable")
        return Choice("tcg", f"auto: {KVM} is missing or not usable")
    subject = kernel or host_kernel(probe_kernel)
    whose = "the VM's kernel" if kernel else "this host's kernel"
    if subject is None:
        if wanted == "kvm":
            return Choice("kvm", f"asked for by {by} (this host has no kernel to probe it with)")
        return Choice("tcg", "auto: this host has no Linux kernel to probe KVM with "
                             "(WAYMARK_PROBE_KERNEL; WAYMARK_ACCEL=kvm asks for KVM unprobed)")
    if accelerator(cache_dir, subject, owner) == "kvm":
        return Choice("kvm", f"{'auto' if wanted == 'auto' else f'asked for by {by}'}: "
                             f"{whose} booted under KVM")
    failed = f"{whose} printed nothing under KVM within {PROBE_SECONDS:g} s"
    _refuse_kvm(wanted, name, by, failed)
    return Choice("tcg", f"auto: {failed}")


def _refuse_kvm(wanted: str, name: str, by: str, why: str) -> None:
    if wanted == "kvm":
        raise Conflict(f"VM {name!r} asks for KVM ({by}), but KVM does not work on this host: "
                       f"{why}.", hint=f"Run it under TCG: waymark vm set {name} --accel tcg "
                                       "(or auto, or unset WAYMARK_ACCEL).")


def accelerator(cache_dir: Path, kernel: str, owner: confine.Identity | None = None) -> str:
    """``kvm`` or ``tcg``: whether the Linux ``kernel`` prints its first line under KVM on this
    host, probed by a QEMU running as ``owner``."""
    cache = cache_dir / "accelerator.json"
    boot, key = _boot_id(), _kernel_key(kernel)
    try:
        known = json.loads(cache.read_text())
        if known.get("boot_id") != boot:
            known = {}
    except (OSError, ValueError):
        known = {}
    answers: dict[str, str] = known.get("answers", {})
    if key not in answers:
        answers[key] = "kvm" if _kvm_runs(kernel, PROBE_SECONDS, owner) else "tcg"
        log.info("accelerator for %s on this boot: %s", key, answers[key])
        cache_dir.mkdir(parents=True, exist_ok=True)
        durable.write_bytes(cache, json.dumps({"boot_id": boot, "answers": answers}).encode())
    return answers[key]
