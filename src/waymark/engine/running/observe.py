"""Whether a VM's QEMU really runs, seen without changing anything: what the read models show
(``vm list``/``vm show``, ``GET /api/vms``). It needs only the home folder, so a command that
only reads imports neither the catalog's ORM nor the engine's context
(:mod:`waymark.engine.running.presence` reconciles the catalog with what is seen here).

A running VM is a QEMU whose pid file, sockets and serial log live in ``vms/<id>/run/``: the
pid file names the process and ``/proc/<pid>/cmdline`` must name that run folder (a recycled
pid is not ours).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waymark import process
from waymark.qemu.cmdline import RunFiles

LIVE_STATES = ("running", "paused")
USAGE_INTERVAL = 0.25  # s between the two readings a CPU use is measured over


def run_files(home: Path, vm_id: str) -> RunFiles:
    """The run folder of the VM ``vm_id`` in the Waymark home ``home``."""
    return RunFiles(home / "vms" / vm_id / "run")


@dataclass(frozen=True)
class Process:
    pid: int
    runtime: dict[str, Any]


def find(run: RunFiles) -> Process | None:
    """The VM's live QEMU process, or None."""
    try:
        pid = int(run.pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if f"{run.folder}/".encode() not in cmdline:  # the serial log's fd set names it
        return None
    try:
        runtime = json.loads(run.runtime.read_text())
    except (OSError, ValueError):
        runtime = {}
    return Process(pid, runtime)


def uptime(found: Process) -> float | None:
    """Seconds since the VM's QEMU started (None: its runtime file does not say)."""
    started = found.runtime.get("started_at")
    return round(time.time() - started, 1) if started else None


def usage(found: Process, interval: float = USAGE_INTERVAL) -> dict[str, Any] | None:
    """What the VM's QEMU uses: ``cpu_percent`` over ``interval`` seconds (of one host CPU, as
    ``top`` shows it: 200 is two CPUs busy), ``cpu_seconds`` since it started and ``rss_bytes``
    (the guest's memory it touched, and QEMU's own); None when it is gone."""
    first, began = process.usage(found.pid), time.monotonic()
    time.sleep(interval)
    second, elapsed = process.usage(found.pid), time.monotonic() - began
    if first is None or second is None:
        return None
    busy = second.cpu_seconds - first.cpu_seconds
    return {"cpu_percent": round(100 * busy / elapsed, 1),
            "cpu_seconds": round(second.cpu_seconds, 2), "rss_bytes": second.rss_bytes}


def observed_state(home: Path, vm_id: str, recorded: str) -> str:
    """The VM's state as it is, from the catalog's ``recorded`` state, changing nothing: a
    live state whose QEMU is gone reads as off (the next command under the VM's lock
    reconciles it: :func:`waymark.engine.running.presence.reconcile`)."""
    if recorded in LIVE_STATES and find(run_files(home, vm_id)) is None:
        return "off"
    return recorded
