"""Waymark's own settings, read once at the edge (the CLI, later the server)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from waymark.errors import InvalidInput

DEFAULT_LOCK_TIMEOUT = 10.0
DEFAULT_QEMU_USER = "waymark-qemu"
# seconds a running guest may show no sign of life (no serial output, no agent answer) before
# vm status says so (a Linux kernel hung under KVM shows nothing at all)
DEFAULT_SILENT_SECONDS = 60.0
# How a VM's QEMU accelerates: ``auto`` probes (waymark.qemu.accel), ``kvm`` and ``tcg`` are
# asked for. A VM's own setting wins; its ``auto`` takes this host's (``WAYMARK_ACCEL``).
ACCELERATORS = ("auto", "kvm", "tcg")


def default_home() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "waymark"


@dataclass(frozen=True)
class Settings:
    home: Path
    # seconds a command waits for another command holding the same VM
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    # the unprivileged user QEMU runs as when Waymark runs as root (waymark.qemu.confine)
    qemu_user: str = DEFAULT_QEMU_USER
    # what a VM whose --accel is auto runs under on this host: auto (the probe), kvm or tcg
    accel: str = "auto"
    # a Linux kernel the KVM probe boots for a VM that boots none itself (else /boot/vmlinuz-*)
    probe_kernel: str | None = None
    silent_seconds: float = DEFAULT_SILENT_SECONDS
    # whether a command whose VM's chain grew deep leaves a ``consolidate`` job behind
    # (waymark.engine.consolidation.schedule); off: only ``waymark vm consolidate`` does it.
    # The faces read it from the environment (on unless ``WAYMARK_BACKGROUND_CONSOLIDATION=
    # off``, the test suite's default, for determinism); a library caller asks for it.
    background_consolidation: bool = False

    @staticmethod
    def _seconds(name: str, default: float) -> float:
        raw = os.environ.get(name, str(default))
        try:
            return float(raw)
        except ValueError as err:
            raise InvalidInput(f"{name}={raw!r} is not a number of seconds.") from err

    @classmethod
    def from_env(cls, home: str | None = None) -> Settings:
        chosen = home or os.environ.get("WAYMARK_HOME") or str(default_home())
        timeout = cls._seconds("WAYMARK_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT)
        accel = os.environ.get("WAYMARK_ACCEL") or "auto"
        if accel not in ACCELERATORS:
            raise InvalidInput(f"WAYMARK_ACCEL={accel!r} is not an accelerator.",
                               hint=f"Use one of: {', '.join(ACCELERATORS)}.")
        background = os.environ.get("WAYMARK_BACKGROUND_CONSOLIDATION") or "on"
        if background not in ("on", "off"):
            raise InvalidInput(f"WAYMARK_BACKGROUND_CONSOLIDATION={background!r} is not on or "
                               "off.", hint="Use on (the default) or off.")
        return cls(home=Path(chosen).expanduser().absolute(), lock_timeout=timeout,
                   qemu_user=os.environ.get("WAYMARK_QEMU_USER") or DEFAULT_QEMU_USER,
                   accel=accel, probe_kernel=os.environ.get("WAYMARK_PROBE_KERNEL") or None,
                   silent_seconds=cls._seconds("WAYMARK_SILENT_SECONDS", DEFAULT_SILENT_SECONDS),
                   background_consolidation=background == "on")
