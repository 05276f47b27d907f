"""``waymark vm``: define, inspect, change and delete VMs. The commands that change VMs are in
:mod:`waymark.cli.vm_change`, the power commands (start, stop, ...) in :mod:`waymark.cli.power`
and ``vm status`` in :mod:`waymark.cli.status`, each loaded only when one of its commands runs;
listing, showing and a status that needs nothing settled need only the read models
(:mod:`waymark.engine.reading`: no ORM, no engine)."""

from __future__ import annotations

from typing import Any, ClassVar

import click

from waymark.cli.main import LazyGroup, face
from waymark.cli.output import emit, json_option
from waymark.model.units import human
from waymark.usecases import views

CHANGE = "waymark.cli.vm_change"
POWER = "waymark.cli.power"
STATUS = "waymark.cli.status"


class VmCommands(LazyGroup):
    """The commands that change VMs and the power commands, loaded when one runs (their help
    line here; ``tests/integration/test_startup.py`` checks each against its command)."""

    COMMANDS: ClassVar[dict[str, tuple[str, str, str]]] = {
        "create": (CHANGE, "create", "Define a new VM (it is off)."),
        "set": (CHANGE, "set_", "Change a VM's settings (memory, CPUs, boot order, ...)."),
        "consolidate": (CHANGE, "consolidate", "Consolidate Now's chain now: reads of Now "
                                               "stop after two hops."),
        "rename": (CHANGE, "rename", "Give a VM a new name (its id, files and checkpoints stay)."),
        "delete": (CHANGE, "delete", "Delete a VM with its checkpoints and Waymark's files."),
        "disk": (CHANGE, "disk", "Attach and detach disks."),
        "media": (CHANGE, "media", "The CD drive: insert and eject an ISO."),
        "import": (CHANGE, "import_", "Create a new VM from an exported bundle, verified."),
        "import-libvirt": (CHANGE, "import_libvirt", "Create a VM (off) from a libvirt domain's "
                                                     "XML."),
        "store": (CHANGE, "store", "Move a VM, with its checkpoints, into a library share."),
        "deploy": (CHANGE, "deploy", "Bring a VM stored in a library back onto this host."),
        "start": (POWER, "start", "Boot the VM, or resume a saved VM exactly where it was."),
        "stop": (POWER, "stop", "Shut the guest down cleanly, or power it off (--force)."),
        "save": (POWER, "save", "Save memory and device state to a file; the VM stops."),
        "pause": (POWER, "pause", "Pause the guest's CPUs (it keeps its memory)."),
        "resume": (POWER, "resume", "Resume a paused guest."),
        "status": (STATUS, "status", "State, process, accelerator, uptime, the guest agent."),
        "console": (POWER, "console", "Attach to the serial console; detach with Ctrl-]."),
        "screenshot": (POWER, "screenshot", "Save a picture of the running VM's screen (PNG)."),
    }


@click.group(cls=VmCommands)
def vm() -> None:
    """Virtual machines: their hardware, disks and checkpoint settings."""


@vm.command("list")
@json_option
def list_(as_json: bool) -> None:
    """List VMs."""
    remote = face().remote
    rows = remote.vm_list() if remote is not None else views.vm_list(face().reading)
    lines = [f"{'NAME':<24} {'STATE':<8} {'MEMORY':>8} {'CPUS':>4} {'CHECKPOINTS':>11}  ID"]
    lines += [f"{r['name']:<24} {r['state']:<8} {r['memory_mib']:>6}M {r['cpus']:>4} "
              f"{r['checkpoint_count']:>11}  {r['id'][:12]}" for r in rows]
    emit(as_json, rows, lines if rows else ["No VMs yet. Create one with: waymark vm create"])


def _disk_line(d: dict[str, Any]) -> str:
    if d["passthrough"]:
        return f"  {d['id'][:12]}  pass-through  {d['path']}  (not captured by checkpoints)"
    base = f"  base {d['base_image']} (pinned)" if d["base_pinned"] else ""
    return (f"  {d['id'][:12]}  {human(d['virtual_size'])}  active {d['active_image']}  "
            f"depth {d['chain_depth']}{base}")


@vm.command("show")
@click.argument("vm_ref", metavar="VM")
@json_option
def show(vm_ref: str, as_json: bool) -> None:
    """Show a VM's configuration, disks and checkpoint settings."""
    remote = face().remote
    data = remote.vm_show(vm_ref) if remote is not None \
        else views.vm_show(face().reading, face().vm_id(vm_ref))
    lines = [f"VM {data['name']}  ({data['id']})", f"  state: {data['state']}",
             f"  memory: {data['memory_mib']} MiB   cpus: {data['cpus']}   "
             f"machine: {data['machine']}   CPU model: {data['cpu_model']}",
             f"  accelerator: {data['accel']}"
             f"{'' if data['accelerator'] is None else ', in use: ' + data['accelerator']}",
             f"  firmware: {data['firmware']}   TPM: {'on' if data['tpm'] else 'off'}",
             f"  checkpoint type: {data['checkpoint_type']}{_from(data, 'checkpoint_type')}"
             f"   limit: {data['max_checkpoints']}"
             f"   automatic: {'on' if data['automatic_checkpoints'] else 'off'}"
             f"   folder: {data['checkpoint_dir']}",
             f"  checkpoints: {data['checkpoint_count']}, holding "
             f"{human(data['checkpoint_space_bytes'])}",
             _consolidation_line(data["consolidation"])]
    if data["kernel"]:
        lines.append(f"  kernel: {data['kernel']}  initrd: {data['initrd']}  "
                     f"append: {data['append']}")
    lines.append(f"  cd drive: {data.get('media') or data['media_name'] or '(empty)'}   "
                 f"boot order: {','.join(data['boot_order'])}")
    lines.append("disks:")
    lines += [_disk_line(d) for d in data["disks"]] or ["  (none)"]
    if data["firmware_variables"]:
        lines += ["UEFI variable store (captured with the disks):",
                  _disk_line(data["firmware_variables"])]
    if data["detached_disks"]:
        lines.append("detached disks (files kept):")
        lines += [_disk_line(d) for d in data["detached_disks"]]
    emit(as_json, data, lines)


def _consolidation_line(shown: dict[str, Any]) -> str:
    if not shown["enabled"]:
        return "  consolidation: off"
    return (f"  consolidation: on, {shown['linked_disks']} disk(s) read through one, "
            f"holding {human(shown['bytes'])}")


def _from(data: dict[str, Any], key: str) -> str:
    source = data["settings_source"].get(key)
    return f" (from {source})" if source and source != "vm" else ""


