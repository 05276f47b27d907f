"""KVM when it works, TCG otherwise: decided by a bounded probe, cached per host boot.

``/dev/kvm`` existing proves nothing: on some hosts (nested virtualization) the firmware and even
a long-mode test run fine under KVM while a Linux kernel hangs right after its setup code. So:

- a VM that boots a kernel directly is probed with *that kernel*: it must print ``Linux version``
  (earlyprintk on a serial file) under ``-accel kvm`` within the timeout;
- a VM that boots from its disk is probed with the firmware: SeaBIOS must run to its last words
  (no boot device) on an ``isa-debugcon`` port within the timeout.

Answers are cached per host boot (and per kernel file), so the probe costs once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

from waymark import durable, process
from waymark.qemu import cmdline

log = logging.getLogger(__name__)

PROBE_SECONDS = 5.0
FIRMWARE_DONE = b"No bootable device"
KERNEL_STARTED = b"Linux version"
QEMU = "qemu-system-x86_64"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _probe(argv: list[str], out: Path, marker: bytes, timeout: float) -> bool:
    log.debug("kvm probe: %s", " ".join(argv))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def _kvm_runs(kernel: str | None, timeout: float) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.log"
        argv = [process.which(QEMU), "-accel", "kvm", "-machine", "pc-q35-7.2", "-cpu",
                "qemu64", "-nodefaults", "-display", "none", "-m", "256", "-no-reboot"]
        if kernel is None:
            argv += ["-chardev", f"file,id=dbg,path={cmdline.escaped(str(out))}",
                     "-device", "isa-debugcon,iobase=0x402,chardev=dbg"]
            return _probe(argv, out, FIRMWARE_DONE, timeout)
        argv += ["-kernel", kernel, "-append", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1",
                 "-serial", f"file:{out}"]
        return _probe(argv, out, KERNEL_STARTED, timeout)


def _kernel_key(kernel: str | None) -> str:
    if kernel is None:
        return "firmware"
    stat = os.stat(kernel)
    return f"{kernel}:{stat.st_size}:{stat.st_mtime_ns}"


def accelerator(cache_dir: Path, kernel: str | None = None) -> str:
    """``kvm`` or ``tcg`` for a VM booting ``kernel`` (None: its disk) on this host."""
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
        answers[key] = "kvm" if _kvm_runs(kernel, PROBE_SECONDS) else "tcg"
        log.info("accelerator for %s on this boot: %s", key, answers[key])
        cache_dir.mkdir(parents=True, exist_ok=True)
        durable.write_bytes(cache, json.dumps({"boot_id": boot, "answers": answers}).encode())
    return answers[key]
