"""Changing the medium in a running VM's CD drive over QMP (the drive: :func:`cmdline.cd_drive`).

Eject: the tray is opened by force (a guest that locked it is overridden, as Hyper-V's eject
does), the medium removed and its node deleted, the fd set Waymark handed over for it released,
and the tray closed again: the guest sees an empty drive. Insert: the same eject first, then
the new ISO handed over open (read-only, :func:`confine.open_image`), added as a read-only raw
node, put in and the tray closed.
"""

from __future__ import annotations

from waymark.qemu import cmdline, confine, qmp

DRIVE = {"id": cmdline.CD_DRIVE}


async def eject(machine: qmp.Qmp) -> None:
    """Take the medium out (nothing happens to an empty drive but the tray moving)."""
    await machine.command("blockdev-open-tray", force=True, **DRIVE)
    await _remove(machine)
    await machine.command("blockdev-close-tray", **DRIVE)


async def insert(machine: qmp.Qmp, path: str) -> None:
    """Put the ISO at ``path`` in (replacing what is in)."""
    await machine.command("blockdev-open-tray", force=True, **DRIVE)
    await _remove(machine)
    filename = await confine.open_image(machine, path, writable=False)
    await machine.command("blockdev-add", **cmdline.media_node(filename))
    await machine.command("blockdev-insert-medium", **{**DRIVE, "node-name": cmdline.MEDIA_NODE})
    await machine.command("blockdev-close-tray", **DRIVE)


async def inserted(machine: qmp.Qmp) -> str | None:
    """The filename QEMU reads the drive's medium from (``/dev/fdset/N``), None when empty."""
    for device in await machine.command("query-block"):
        if device.get("qdev") in (cmdline.CD_DRIVE, f"/machine/peripheral/{cmdline.CD_DRIVE}"):
            medium = device.get("inserted")
            return None if medium is None else str(medium["file"])
    return None


async def _remove(machine: qmp.Qmp) -> None:
    """With the tray open: the medium out, its node deleted and its fd set released."""
    filename = await inserted(machine)
    await machine.command("blockdev-remove-medium", **DRIVE)
    if filename is None:
        return
    await machine.command("blockdev-del", **{"node-name": cmdline.MEDIA_NODE})
    if filename.startswith(confine.FDSET):
        await machine.command("remove-fd", **{"fdset-id": int(filename[len(confine.FDSET):])})
