"""A running VM's graphical console (Hyper-V's VMConnect): a picture of its screen, and where
its VNC server listens (:mod:`waymark.qemu.display`).

Every VM has a standard VGA and a VNC server on a Unix socket in its ``run/display`` folder,
never on TCP (:func:`waymark.qemu.cmdline.display`); a VM started before Waymark had it gets
it at its next start. Nothing here takes the VM's lock: looking at a screen changes nothing.
"""

from __future__ import annotations

import socket
from pathlib import Path

from waymark.catalog.models import Vm
from waymark.engine.context import Context
from waymark.engine.running import presence
from waymark.errors import Conflict
from waymark.qemu import display, qmp


def _running(ctx: Context, vm_id: str) -> tuple[str, presence.Process]:
    """(name, QEMU process) of the VM, running or paused; Conflict when it is not."""
    with ctx.catalog.session() as session:
        row = session.get_one(Vm, vm_id)
        name, state = row.name, presence.observed_state(ctx, vm_id, row.state)
    found = presence.find(presence.run_files(ctx, vm_id)) if state in presence.LIVE_STATES \
        else None
    if found is None:
        raise Conflict(f"VM {name!r} is not running ({state}): it has no screen to show.",
                       hint=f"Start it first: waymark vm start {name}")
    return name, found


async def screenshot(ctx: Context, vm_id: str) -> bytes:
    """The VM's screen now, as a PNG."""
    name, _ = _running(ctx, vm_id)
    async with qmp.connect(presence.run_files(ctx, vm_id).qmp, name) as machine:
        return await display.screendump(machine, name)


def vnc_socket(ctx: Context, vm_id: str) -> Path:
    """Where the running VM's VNC server listens (a Unix socket only root and QEMU's user
    reach)."""
    _running(ctx, vm_id)
    return presence.run_files(ctx, vm_id).vnc


def open_vnc(ctx: Context, vm_id: str) -> socket.socket:
    """A connection to the running VM's VNC server, its own QEMU's (non-blocking)."""
    name, found = _running(ctx, vm_id)
    return display.connect(presence.run_files(ctx, vm_id).vnc, found.pid, name)
