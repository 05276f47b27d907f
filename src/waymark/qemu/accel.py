"""KVM when it works, TCG otherwise: decided by a bounded probe, cached per host boot.

``/dev/kvm`` existing proves nothing (on some hosts guests hang under it). The probe starts the
firmware under ``-accel kvm`` with an ``isa-debugcon`` port, where SeaBIOS logs its progress: only
if it runs all the way to its last words (no boot device) within the timeout does KVM count as
working here.
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

log = logging.getLogger(__name__)

PROBE_SECONDS = 5.0
FIRMWARE_DONE = b"No bootable device"
QEMU = "qemu-system-x86_64"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _kvm_prints(timeout: float) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "debugcon.log"
        argv = [process.which(QEMU), "-accel", "kvm", "-machine", "pc-q35-7.2",
                "-nodefaults", "-display", "none", "-m", "64",
                "-chardev", f"file,id=dbg,path={out}",
                "-device", "isa-debugcon,iobase=0x402,chardev=dbg"]
        log.debug("kvm probe: %s", " ".join(argv))
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if out.exists() and FIRMWARE_DONE in out.read_bytes():
                    return True
                time.sleep(0.05)
            return False
        finally:
            proc.kill()
            proc.wait()


def accelerator(cache_dir: Path) -> str:
    """``kvm`` or ``tcg`` for this host, probed once per boot and cached in ``cache_dir``."""
    cache = cache_dir / "accelerator.json"
    boot = _boot_id()
    try:
        cached = json.loads(cache.read_text())
        if cached.get("boot_id") == boot:
            return str(cached["accelerator"])
    except (OSError, ValueError, KeyError):
        pass
    chosen = "kvm" if _kvm_prints(PROBE_SECONDS) else "tcg"
    cache_dir.mkdir(parents=True, exist_ok=True)
    durable.write_bytes(cache, json.dumps({"boot_id": boot, "accelerator": chosen}).encode())
    log.info("accelerator for this boot: %s", chosen)
    return chosen
