"""``waymark checkpoint``: take, list, inspect, apply and rename checkpoints. The commands that
change checkpoints are in :mod:`waymark.cli.checkpoint_change`, loaded only when one of them
runs; listing and showing need only the read models."""

from __future__ import annotations

import shutil
from typing import Any, ClassVar

import click

from waymark.cli.main import LazyGroup, face
from waymark.cli.output import emit, json_option
from waymark.model import tree
from waymark.model.units import human
from waymark.usecases import views

CHANGE = "waymark.cli.checkpoint_change"


class CheckpointCommands(LazyGroup):
    """The commands that change checkpoints, loaded when one runs (their help line here)."""

    COMMANDS: ClassVar[dict[str, tuple[str, str, str]]] = {
        "create": (CHANGE, "create", "Take a checkpoint of a VM, live if it runs."),
        "apply": (CHANGE, "apply", "Return the VM to a checkpoint (Restore-VMSnapshot)."),
        "rename": (CHANGE, "rename", "Rename a checkpoint (1-99 characters)."),
        "notes": (CHANGE, "notes", "Show, set or clear a checkpoint's notes."),
        "delete": (CHANGE, "delete", "Delete checkpoints; their disk layers are merged away."),
        "export": (CHANGE, "export", "Export a checkpoint as a standalone VM bundle."),
    }


@click.group(cls=CheckpointCommands)
def checkpoint() -> None:
    """Checkpoints: a VM's disks and configuration at a point in time."""


@checkpoint.command("list")
@click.argument("vm_ref", metavar="VM")
@json_option
def list_(vm_ref: str, as_json: bool) -> None:
    """The checkpoint tree, with Now under the current checkpoint."""
    remote = face().remote
    data = remote.checkpoint_list(vm_ref) if remote is not None \
        else views.checkpoint_list(face().ctx, face().vm_id(vm_ref))
    lines = [f"Checkpoints of {data['vm_name']}:"]
    lines += views.checkpoint_tree(data, shutil.get_terminal_size().columns) \
        if data["checkpoints"] else ["Now  (no checkpoints)"]
    lines += ["", tree.LEGEND]
    emit(as_json, data, lines)


def _show_lines(d: dict[str, Any]) -> list[str]:
    lines = [f"Checkpoint {d['name']}  ({d['id']})",
             f"  VM: {d['vm_name']}   taken: {d['created_at']}   kind: {d['kind']}"
             f"   requested: {d['requested_type']}",
             f"  holds memory: {'yes' if d['has_memory'] else 'no'}   current: "
             f"{'yes' if d['is_current'] else 'no'}   parent: {d['parent_id'] or '-'}",
             f"  space: {human(d['allocated_bytes'])} own, {human(d['shared_bytes'])} shared, "
             f"chain depth {d['chain_depth']}",
             f"  configuration: {d['configuration']['memory_mib']} MiB, "
             f"{d['configuration']['cpus']} CPU(s)"]
    if d["fallback_reason"]:
        lines.append(f"  fell back: {d['fallback_reason']}")
    if d["pause_seconds"] is not None:
        lines.append(f"  guest paused: {d['pause_seconds'] * 1000:.0f} ms (taken live)")
    if d["freeze_seconds"] is not None:
        lines.append(f"  file systems frozen: {d['freeze_seconds'] * 1000:.0f} ms")
    lines += [f"  disk {x['disk_id'][:12]}: {x['frozen_image']}" for x in d["disks"]]
    lines += [f"  not captured: {s['path']} ({s['reason']})" for s in d["skipped_disks"]]
    if d.get("notes"):
        lines += ["  notes:", *notes_lines(d["notes"], "    ")]
    return lines


def notes_lines(notes: str, indent: str) -> list[str]:
    """Notes whole, each line indented (made printable by ``emit``: notes from a server are
    another's text)."""
    return [f"{indent}{line}".rstrip() for line in notes.split("\n")]


@checkpoint.command("show")
@click.argument("vm_ref", metavar="VM")
@click.argument("ckpt_ref", metavar="CKPT")
@json_option
def show(vm_ref: str, ckpt_ref: str, as_json: bool) -> None:
    """One checkpoint: when, what kind, its disks, configuration and space."""
    emit(as_json, data := shown(vm_ref, ckpt_ref), _show_lines(data))


def shown(vm_ref: str, ckpt_ref: str) -> dict[str, Any]:
    """One checkpoint's view, from the server with ``--server``."""
    remote = face().remote
    if remote is not None:
        return remote.checkpoint_show(vm_ref, ckpt_ref)
    return views.checkpoint_show(face().ctx, face().vm_id(vm_ref), ckpt_ref)


