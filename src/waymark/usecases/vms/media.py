"""A VM's CD drive: insert and eject an ISO, while the VM is off, running or paused.

Every VM has one CD drive (:func:`waymark.qemu.cmdline.cd_drive`). Which ISO is in it is part of
the VM's hardware (``HardwareConfig.media``): a checkpoint records it and applying the
checkpoint puts that ISO back, as Hyper-V does. The ISO itself is never written and never one of
the VM's disks: no checkpoint, backup or export copies it (they record its path).

Who may name which file: the CLI and administrators name any ISO on the host; everyone else
(the VM's owner, through the API) names a file in a ``media`` location an administrator
registered (:func:`in_location`), the rule for boot files and host folders alike.

A saved VM's drive does not change: its saved memory resumes with the drive it was saved with.
"""

from __future__ import annotations

from pathlib import Path

from waymark.catalog.models import Vm
from waymark.engine import lookup
from waymark.engine.context import Context
from waymark.engine.running import presence
from waymark.errors import Conflict, InvalidInput, NotFound
from waymark.images import iso
from waymark.model.hardware import check_media
from waymark.qemu import media, qmp
from waymark.usecases.access import locations
from waymark.usecases.vms.definitions import given_by_admin

LOCATION_KIND = locations.MEDIA


def insert(ctx: Context, vm_id: str, path: str) -> str:
    """Put the ISO at ``path`` in the VM's CD drive (replacing what is in); returns its absolute
    path. A path that is not there is NotFound, a file that is no ISO ImageError: nothing
    changes."""
    checked = iso.checked(path)
    check_media(checked, given_by_admin)
    with ctx.locked(vm_id) as (_, name):
        if _live(ctx, vm_id, name):
            qmp.run_sync(_in_running(ctx, vm_id, name, checked))
        _record(ctx, vm_id, checked)
    return checked


def eject(ctx: Context, vm_id: str) -> None:
    """Empty the VM's CD drive (a running guest's locked tray is opened by force)."""
    with ctx.locked(vm_id) as (_, name):
        if _live(ctx, vm_id, name):
            qmp.run_sync(_out_of_running(ctx, vm_id, name))
        _record(ctx, vm_id, None)


def in_location(ctx: Context, location: str, file: str) -> str:
    """The path of ISO ``file`` in the ``media`` location named ``location``: a plain file
    name, inside that folder (a link out of it is refused)."""
    with ctx.catalog.session() as session:
        folder = Path(locations.get(session, location, LOCATION_KIND).path)
    if not file or "/" in file or file in (".", ".."):
        raise InvalidInput(f"{file!r} is not a file name.",
                           hint=f"Name an ISO in the media location {location!r}.")
    path = folder / file
    if not path.exists():
        raise NotFound(f"the media location {location!r} has no file {file!r}.",
                       hint="Ask an administrator which ISOs it offers.")
    if folder.resolve() not in path.resolve().parents:
        raise InvalidInput(f"{file!r} leads out of the media location {location!r}.",
                           hint=f"Name an ISO in the media location {location!r}.")
    return str(path)


def _live(ctx: Context, vm_id: str, name: str) -> bool:
    """Whether the VM's QEMU runs (its drive changes now); a saved VM is refused."""
    state = presence.reconcile(ctx, vm_id)
    if state == "saved":
        raise Conflict(f"VM {name!r} is saved, and its saved memory resumes with the CD drive "
                       "it was saved with.",
                       hint=f"Start it and change the media while it runs: waymark vm start "
                            f"{name}")
    return state in presence.LIVE_STATES


def _record(ctx: Context, vm_id: str, path: str | None) -> None:
    with ctx.catalog.session() as session:
        row = session.get_one(Vm, vm_id)
        hardware = lookup.hardware(row)
        hardware.media = path
        row.config = hardware.dump()


async def _in_running(ctx: Context, vm_id: str, name: str, path: str) -> None:
    async with qmp.connect(presence.run_files(ctx, vm_id).qmp, name) as machine:
        await media.insert(machine, path)


async def _out_of_running(ctx: Context, vm_id: str, name: str) -> None:
    async with qmp.connect(presence.run_files(ctx, vm_id).qmp, name) as machine:
        await media.eject(machine)
