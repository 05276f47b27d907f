"""What is really running: the QEMU process of a VM, reconciled with the catalog's state.

Waymark keeps no daemon. A running VM is a QEMU in a session of its own whose pid file, QMP
socket, agent socket, console socket and serial log live in ``vms/<id>/run/``. Any command can
find it again: the pid file names the process and ``/proc/<pid>/cmdline`` must name our run
folder (a recycled pid is not ours). A QEMU that vanished is reported ``off (crashed or
killed)`` with the last lines of its serial log, and its leftovers are removed.

Read models only read: ``vm list``/``vm show`` (and ``GET /api/vms``) show what they see with
:func:`observed_state` (a VM whose QEMU died reads as off) and change nothing. Correcting the
catalog and removing the run files is :func:`reconcile`'s alone, called by commands that hold
the VM's lock (through ``machines.settle`` or directly), so two readers never race to write.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waymark import durable, process
from waymark.catalog.models import Vm
from waymark.engine.context import Context
from waymark.errors import Conflict
from waymark.qemu.cmdline import RunFiles

LIVE_STATES = ("running", "paused")
LOG_TAIL = 5
USAGE_INTERVAL = 0.25  # s between the two readings a CPU use is measured over


def run_files(ctx: Context, vm_id: str) -> RunFiles:
    return RunFiles(ctx.vm_folder(vm_id) / "run")


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


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().split(") ")[-1][:1] != "Z"
    return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def log_tail(run: RunFiles, lines: int = LOG_TAIL) -> list[str]:
    try:
        data = run.serial_log.read_bytes()[-8192:]
    except OSError:
        return []
    text = data.decode(errors="replace").replace("\r", "")
    return [line for line in text.splitlines() if line.strip()][-lines:]


def clean(run: RunFiles) -> None:
    """Remove a stopped VM's sockets and pid file (the serial log stays)."""
    for path in (run.qmp, run.agent, run.console, run.pidfile, run.runtime, run.paused_state,
                 run.paused_meta):
        durable.remove(path)
    shutil.rmtree(run.display, ignore_errors=True)  # QEMU's user's: never followed into


def record_exit(run: RunFiles, reason: str) -> None:
    run.folder.mkdir(parents=True, exist_ok=True)
    note = {"reason": reason, "log": log_tail(run),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    durable.write_bytes(run.last_exit, json.dumps(note).encode())


def last_exit(run: RunFiles) -> dict[str, Any] | None:
    try:
        note: dict[str, Any] = json.loads(run.last_exit.read_text())
    except (OSError, ValueError):
        return None
    return note


def observed_state(ctx: Context, vm_id: str, recorded: str) -> str:
    """The VM's state as it is, from the catalog's ``recorded`` state, changing nothing: a
    live state whose QEMU is gone reads as off (the next command under the VM's lock
    reconciles it)."""
    if recorded in LIVE_STATES and find(run_files(ctx, vm_id)) is None:
        return "off"
    return recorded


def reconcile(ctx: Context, vm_id: str) -> str:
    """Correct the catalog when a QEMU died behind our back; returns the state.

    It writes the catalog and removes the run files: call it holding the VM's lock (read
    models use :func:`observed_state`)."""
    run = run_files(ctx, vm_id)
    with ctx.catalog.session() as session:
        row = session.get_one(Vm, vm_id)
        if row.state in LIVE_STATES and find(run) is None:
            record_exit(run, "crashed or killed")
            clean(run)
            row.state = "off"
        return row.state


def require_offline(ctx: Context, vm_id: str, action: str) -> None:
    """Refuse file operations on the images a running QEMU has open.

    Call it holding the VM's lock and outside any catalog session (it may write the state).
    """
    state = reconcile(ctx, vm_id)
    if state in LIVE_STATES:
        with ctx.catalog.session() as session:
            name = session.get_one(Vm, vm_id).name
        raise Conflict(f"VM {name!r} is {state}; {action} needs it off (live operations on "
                       "running VMs come in a later release).",
                       hint=f"Stop it first: waymark vm stop {name}")
