"""Whether a VM's QEMU really runs, seen without changing anything: what the read models show
(``vm list``/``vm show``, ``vm status``, ``GET /api/vms``). It needs only the home folder, so a
command that only reads imports neither the catalog's ORM nor the engine's context, nor the
asyncio QMP stack (:mod:`waymark.engine.running.presence` reconciles the catalog with what is
seen here, :func:`waymark.engine.running.power.status` settles first).

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
from waymark.errors import ToolError
from waymark.qemu import cmdline, monitor
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


def last_exit(run: RunFiles) -> dict[str, Any] | None:
    """How the VM's QEMU last stopped (written by ``presence.record_exit``), if known."""
    try:
        note: dict[str, Any] = json.loads(run.last_exit.read_text())
    except (OSError, ValueError):
        return None
    return note


def silence(run: RunFiles, runtime: dict[str, Any], name: str, after: float,
            now: float | None = None) -> dict[str, Any] | None:
    """A running guest whose agent does not answer: how long its serial console has been
    quiet, when that is ``after`` seconds (``WAYMARK_SILENT_SECONDS``, default 60) or more
    since its start or its last output (the serial log's mtime; Waymark's own start line is
    written before ``started_at``). Cheap to measure: no QMP, nothing asked of the guest. A
    guest that prints only to a screen and runs no agent is reported too: the answer says what
    is seen, not a verdict."""
    started = runtime.get("started_at")
    if not isinstance(started, (int, float)):
        return None
    try:
        last = max(started, run.serial_log.stat().st_mtime)
    except OSError:
        last = started
    quiet = (time.time() if now is None else now) - last
    if quiet < after:
        return None
    used = runtime.get("accelerator")
    said = "nothing since it started" if last == started else "nothing new"
    message = (f"no sign of life from the guest for {quiet:.0f} s: {said} on its serial "
               f"console and its guest agent does not answer (it runs under {used}; serial "
               f"log {run.serial_log}).")
    if used == "kvm":
        hint = (f"A guest that hangs under KVM (some hosts hang Linux kernels right after the "
                f"boot loader) runs under TCG: waymark vm stop {name} --force, then "
                f"waymark vm set {name} --accel tcg.")
    else:
        hint = (f"Look at the serial log (a guest whose console is not ttyS0 prints nothing "
                f"there; a kernel needs console=ttyS0) and at {run.errors}; a hung guest: "
                f"waymark vm stop {name} --force.")
    return {"seconds": round(quiet, 1), "message": message, "hint": hint}


def described(run: RunFiles, vm_id: str, name: str, state: str, found: Process | None,
              agent: bool | None, silent_seconds: float) -> dict[str, Any]:
    """What ``vm status`` answers for the VM in ``state`` whose QEMU is ``found`` (None: none
    runs) and whose guest agent answers or not (``agent``, None: not asked; a running guest
    whose agent does not answer is checked for silence)."""
    out: dict[str, Any] = {"name": name, "id": vm_id, "state": state,
                           "serial_log": str(run.serial_log), "pid": None,
                           "accelerator": None, "accelerator_reason": None,
                           "uptime_seconds": None, "agent": False, "silence": None}
    if found is not None and state in LIVE_STATES:
        out.update(pid=found.pid, accelerator=found.runtime.get("accelerator"),
                   accelerator_reason=found.runtime.get("accelerator_reason"),
                   uptime_seconds=uptime(found), agent=bool(agent))
        if state == "running" and agent is False:
            out["silence"] = silence(run, found.runtime, name, silent_seconds)
    elif state == "off":
        out["last_exit"] = last_exit(run)
    return out


SEEN_STATES = ("off", *LIVE_STATES)  # the states :func:`status` answers for by itself


def status(home: Path, vm_id: str, name: str, recorded: str, silent_seconds: float
           ) -> dict[str, Any] | None:
    """``vm status`` of the VM whose catalog state is ``recorded``, seen without changing
    anything and without the asyncio QMP stack (two queries through
    :mod:`waymark.qemu.monitor`); None when the full path
    (:func:`waymark.engine.running.power.status`) must answer: a QEMU that is gone or that the
    guest shut down (settling them writes the catalog), a guest holding its agent's port open
    (the agent is asked), a saved VM, or a QEMU that does not answer the queries."""
    if recorded not in SEEN_STATES:
        return None
    run = run_files(home, vm_id)
    found = find(run) if recorded in LIVE_STATES else None
    if recorded in LIVE_STATES:
        if found is None:
            return None
        try:
            running, chardevs = monitor.ask(run.qmp, name, "query-status", "query-chardev")
        except ToolError:
            return None
        if running.get("status") == "shutdown" or (
                recorded == "running" and cmdline.agent_port_open(chardevs)):
            return None
    return described(run, vm_id, name, recorded, found, False, silent_seconds)
