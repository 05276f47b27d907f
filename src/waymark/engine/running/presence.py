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
from pathlib import Path

from waymark import durable
from waymark.catalog.models import Vm
from waymark.engine.context import Context
from waymark.engine.running import observe
from waymark.errors import Conflict
from waymark.qemu.cmdline import RunFiles

# what the read models see (waymark.engine.running.observe), named here for the engine's users
LIVE_STATES = observe.LIVE_STATES
USAGE_INTERVAL = observe.USAGE_INTERVAL
Process = observe.Process
find = observe.find
uptime = observe.uptime
usage = observe.usage
last_exit = observe.last_exit
LOG_TAIL = 5


def run_files(ctx: Context, vm_id: str) -> RunFiles:
    return observe.run_files(ctx.home, vm_id)


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
    for path in (run.qmp, run.agent, run.clock_setter, run.console, run.pidfile, run.runtime,
                 run.paused_state, run.paused_meta):
        durable.remove(path)
    shutil.rmtree(run.display, ignore_errors=True)  # QEMU's user's: never followed into


def record_exit(run: RunFiles, reason: str) -> None:
    run.folder.mkdir(parents=True, exist_ok=True)
    note = {"reason": reason, "log": log_tail(run),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    durable.write_bytes(run.last_exit, json.dumps(note).encode())


def observed_state(ctx: Context, vm_id: str, recorded: str) -> str:
    """:func:`waymark.engine.running.observe.observed_state` in ``ctx``'s home."""
    return observe.observed_state(ctx.home, vm_id, recorded)


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
