"""Changing the medium in a running VM's CD drive over QMP (the drive: :func:`cmdline.cd_drive`).

Insert: the new ISO is handed over open (read-only, :func:`confine.open_image`) and added as a
read-only raw node of a name of its own first, so an ISO QEMU cannot open changes nothing; then
the tray is opened by force (a guest that locked it is overridden, as Hyper-V's eject does), the
old medium taken out (its node deleted, the fd set Waymark handed over for it released), the
new one put in and the tray closed. Eject: the same without a new medium; the guest sees an
empty drive with its tray closed.
"""

from __future__ import annotations

import secrets
from typing import Any

from waymark.errors import ToolError
from waymark.qemu import cmdline, confine, qmp

DRIVE = {"id": cmdline.CD_DRIVE}


async def eject(machine: qmp.Qmp) -> None:
    """Take the medium out (an empty drive stays empty)."""
    await machine.command("blockdev-open-tray", force=True, **DRIVE)
    await _remove(machine)
    await machine.command("blockdev-close-tray", **DRIVE)


async def insert(machine: qmp.Qmp, path: str) -> None:
    """Put the ISO at ``path`` in (replacing what is in)."""
    node = await _add(machine, path)
    await machine.command("blockdev-open-tray", force=True, **DRIVE)
    await _remove(machine)
    await machine.command("blockdev-insert-medium", **{**DRIVE, "node-name": node})
    await machine.command("blockdev-close-tray", **DRIVE)


async def inserted(machine: qmp.Qmp) -> dict[str, Any] | None:
    """The drive's medium as ``query-block`` has it (``node-name``, ``file``: the
    ``/dev/fdset/N`` QEMU reads), None when the drive is empty."""
    for device in await machine.command("query-block"):
        if device.get("qdev") in (cmdline.CD_DRIVE, f"/machine/peripheral/{cmdline.CD_DRIVE}"):
            medium: dict[str, Any] | None = device.get("inserted")
            return medium
    return None


async def _add(machine: qmp.Qmp, path: str) -> str:
    """The ISO at ``path`` as a new read-only node (not in the drive yet); its name."""
    filename = await confine.open_image(machine, path, writable=False)
    node = f"cd{secrets.token_hex(6)}"
    try:
        await machine.command("blockdev-add", **cmdline.media_node(filename, node))
    except ToolError:
        await _release(machine, filename)
        raise
    return node


async def _remove(machine: qmp.Qmp) -> None:
    """With the tray open: the medium out, its node deleted and its fd set released."""
    medium = await inserted(machine)
    await machine.command("blockdev-remove-medium", **DRIVE)
    if medium is None:
        return
    await machine.command("blockdev-del", **{"node-name": medium["node-name"]})
    await _release(machine, str(medium["file"]))


async def _release(machine: qmp.Qmp, filename: str) -> None:
    if filename.startswith(confine.FDSET):
        await machine.command("remove-fd", **{"fdset-id": int(filename[len(confine.FDSET):])})
