"""``waymark vm start|stop|save|pause|resume|status|console|screenshot``: running VMs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from waymark import durable
from waymark.cli import console as terminal
from waymark.cli.main import face
from waymark.cli.output import emit, json_option
from waymark.engine.running import power, presence
from waymark.errors import InvalidInput, StorageError
from waymark.usecases.vms import display


def _console(vm_ref: str, linger: float = terminal.LINGER) -> None:
    ctx = face().ctx
    vm_id, name = ctx.identify(face().vm_id(vm_ref))
    asyncio.run(terminal.attach(presence.run_files(ctx, vm_id).console, name, linger))


def _act(vm_ref: str, action: str, **options: Any) -> dict[str, Any]:
    """The action here, or on the server given with --server."""
    remote = face().remote
    if remote is not None:
        return remote.vm_power(vm_ref, action, **options)
    return asyncio.run(power.act(face().ctx, face().vm_id(vm_ref), action, **options))


@click.command("start")
@click.argument("vm_ref", metavar="VM")
@click.option("--console", "attach", is_flag=True, help="Attach to the serial console.")
@click.option("--discard-saved-state", is_flag=True,
              help="Boot fresh, throwing the saved memory state away.")
@json_option
def start(vm_ref: str, attach: bool, discard_saved_state: bool, as_json: bool) -> None:
    """Boot the VM, or resume a saved VM exactly where it was."""
    data = _act(vm_ref, "start", fresh=discard_saved_state)
    emit(as_json, data, [f"Started {data['name']} (pid {data['pid']}, {data['accelerator']})."])
    if attach:
        _console(data["id"])


@click.command("stop")
@click.argument("vm_ref", metavar="VM")
@click.option("--force", is_flag=True,
              help="Power off at once (like pulling the plug); on a saved VM, discard its "
                   "saved state.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait.")
@json_option
def stop(vm_ref: str, force: bool, timeout: float, as_json: bool) -> None:
    """Shut the guest down cleanly (guest agent, else ACPI power button)."""
    data = _act(vm_ref, "stop", force=force, timeout=timeout)
    emit(as_json, data, [f"Stopped {vm_ref}: {data['how']}." if data["changed"]
                         else f"{vm_ref} is already off: nothing to do."])


@click.command("save")
@click.argument("vm_ref", metavar="VM")
@json_option
def save(vm_ref: str, as_json: bool) -> None:
    """Save memory and device state to a file; the VM stops (Hyper-V's Save)."""
    data = _act(vm_ref, "save")
    emit(as_json, data, [f"Saved {vm_ref} ({data['bytes'] >> 20} MiB of state, guest paused "
                         f"{data['seconds']} s). Start it to resume where it was."])


@click.command("pause")
@click.argument("vm_ref", metavar="VM")
@json_option
def pause(vm_ref: str, as_json: bool) -> None:
    """Pause the guest's CPUs (it keeps its memory)."""
    data = _act(vm_ref, "pause")
    emit(as_json, data, [f"Paused {vm_ref}." if data["changed"]
                         else f"{vm_ref} is already paused: nothing to do."])


@click.command("resume")
@click.argument("vm_ref", metavar="VM")
@json_option
def resume(vm_ref: str, as_json: bool) -> None:
    """Resume a paused guest."""
    data = _act(vm_ref, "resume")
    emit(as_json, data, [f"Resumed {vm_ref}." if data["changed"]
                         else f"{vm_ref} is already running: nothing to do."])


def settled_status(vm_id: str) -> dict[str, Any]:
    """``vm status`` after settling what is seen and asking the guest agent
    (:func:`waymark.engine.running.power.status`): what :mod:`waymark.cli.status` answers with
    when the read path cannot."""
    return asyncio.run(power.status(face().ctx, vm_id))


@click.command("console")
@click.argument("vm_ref", metavar="VM")
@click.option("--vnc", "vnc", is_flag=True,
              help="Do not attach: say where the graphical console (VNC) listens, for a "
                   "local viewer.")
@click.option("--linger", type=click.FloatRange(0, terminal.LINGER_MAX),
              default=terminal.LINGER, show_default=True, metavar="SECONDS",
              help="When the input ends (a pipe): once the guest has read all of it, keep "
                   f"printing its output until it is quiet this long (at most "
                   f"{terminal.LINGER_MAX:g} s in all).")
@json_option
def console(vm_ref: str, vnc: bool, linger: float, as_json: bool) -> None:
    """Attach to the serial console; detach with Ctrl-] (or end the input). With --vnc:
    where a viewer reaches the graphical console."""
    if not vnc:
        if as_json:
            raise InvalidInput("--json goes with --vnc: the serial console is a terminal.",
                               hint=f"waymark vm console --vnc {vm_ref} --json")
        _console(vm_ref, linger)
        return
    _local_only("vm console --vnc")
    ctx = face().ctx
    vm_id, name = ctx.identify(face().vm_id(vm_ref))
    path = display.vnc_socket(ctx, vm_id)
    emit(as_json, {"name": name, "vnc_socket": str(path)}, [
        f"The graphical console of {name} listens on the Unix socket {path}",
        "(no password: only root and QEMU's user can reach it; it is never on TCP).",
        f"  Connect here:   vncviewer {path}    or: remote-viewer vnc+unix://{path}",
        f"  From elsewhere: ssh -L 5901:{path} root@THIS-HOST, then vncviewer localhost:5901",
        "  Or in the portal: the VM's Console page."])


def _local_only(command: str) -> None:
    if face().remote is not None:
        raise InvalidInput(f"{command} works on this host only, not with --server.",
                           hint="Run it on the host the VM runs on, or use the portal's "
                                "console page.")


@click.command("screenshot")
@click.argument("vm_ref", metavar="VM")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def screenshot(vm_ref: str, file: Path, as_json: bool) -> None:
    """Save a picture of the running VM's screen as a PNG file."""
    _local_only("vm screenshot")
    ctx = face().ctx
    vm_id, name = ctx.identify(face().vm_id(vm_ref))
    picture = asyncio.run(display.screenshot(ctx, vm_id))
    target = file.expanduser().absolute()
    try:
        durable.write_bytes(target, picture)
    except OSError as err:
        raise StorageError(f"cannot write the screenshot to {target}: {err.strerror}.",
                           hint="Name a file in a folder you can write to.") from err
    emit(as_json, {"name": name, "file": str(target), "bytes": len(picture)},
         [f"Saved the screen of {name} to {target} ({len(picture)} bytes)."])


COMMANDS = (start, stop, save, pause, resume, console, screenshot)
