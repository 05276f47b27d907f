"""``waymark checkpoint``: take, list, inspect, apply and rename checkpoints. The commands that
change checkpoints are in :mod:`waymark.cli.checkpoint_change`, loaded only when one of them
runs; listing and showing need only the read models."""

from __future__ import annotations

import shutil
from typing import Any, ClassVar

import click

from waymark.cli.main import LazyGroup, face
from waymark.cli.output import emit, json_option
from waymark.model import timing, tree
from waymark.model.units import human
from waymark.usecases import views

CHANGE = "waymark.cli.checkpoint_change"


class CheckpointCommands(LazyGroup):
    """The commands that change checkpoints, loaded when one runs (their help line here)."""

    COMMANDS: ClassVar[dict[str, tuple[str, str, str]]] = {
        "create": (CHANGE, "create", "Take a checkpoint of a VM, live if it runs."),
        "apply": (CHANGE, "apply", "Return the VM to a checkpoint (Restore-VMSnapshot)."),
        "revert": (CHANGE, "revert", "Apply the current checkpoint, Now's parent (Revert)."),
        "rename": (CHANGE, "rename", "Rename a checkpoint (1-99 characters)."),
        "notes": (CHANGE, "notes", "Show, set or clear a checkpoint's notes."),
        "delete": (CHANGE, "delete", "Delete checkpoints; their disk layers are merged away."),
        "export": (CHANGE, "export", "Export a checkpoint as a standalone VM bundle."),
    }


@click.group(cls=CheckpointCommands)
def checkpoint() -> None:
    """Checkpoints: a VM's disks and configuration at a point in time."""


TYPE_HELP = "; ".join(f"{kind}: {what}" for kind, what in views.CHECKPOINT_TYPES.items())


@checkpoint.command("list")
@click.argument("vm_ref", metavar="[VM]", required=False)
@click.option("--type", "wanted", type=click.Choice(list(views.CHECKPOINT_TYPES)),
              help=f"Only checkpoints that hold this ({TYPE_HELP}).")
@click.option("--most-recent", is_flag=True,
              help="Only each VM's current checkpoint, Now's parent (SCVMM's -MostRecent).")
@json_option
def list_(vm_ref: str | None, wanted: str | None, most_recent: bool, as_json: bool) -> None:
    """The checkpoint tree of VM, with Now under the current checkpoint; without VM, or with
    --type or --most-recent, a table of the checkpoints with their VM (every VM's without VM)."""
    if vm_ref is None or wanted is not None or most_recent:
        _list_rows(vm_ref, wanted, most_recent, as_json)
        return
    remote = face().remote
    data = remote.checkpoint_list(vm_ref) if remote is not None \
        else views.checkpoint_list(face().reading, face().vm_id(vm_ref))
    lines = [f"Checkpoints of {data['vm_name']}:"]
    lines += views.checkpoint_tree(data, shutil.get_terminal_size().columns) \
        if data["checkpoints"] else ["Now  (no checkpoints)"]
    lines += ["", tree.LEGEND]
    emit(as_json, data, lines)


def _listings(vm_ref: str | None) -> list[dict[str, Any]]:
    """The checkpoint listings of VM, or of every VM (the caller may see, with --server)."""
    remote = face().remote
    if remote is not None:
        refs = [vm_ref] if vm_ref is not None else [v["id"] for v in remote.vm_list()]
        return [remote.checkpoint_list(ref) for ref in refs]
    if vm_ref is not None:
        return [views.checkpoint_list(face().reading, face().vm_id(vm_ref))]
    return views.checkpoint_lists(face().reading)


def _row_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A table: VM, checkpoint, what it holds, when (local time), id; the current marked."""
    table = [("VM", "CHECKPOINT", "TYPE", "TAKEN", "ID")] + [
        (r["vm_name"], r["name"],
         f"{tree.MEMORY if r['has_memory'] else tree.DISK_ONLY} {r['kind']}",
         timing.parse_rfc3339(r["created_at"], what="checkpoint's time").astimezone()
         .strftime("%Y-%m-%d %H:%M:%S"),
         r["id"][:12] + ("  (current)" if r["is_current"] else "")) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)),
                       row[4]]) for row in table]


def _list_rows(vm_ref: str | None, wanted: str | None, most_recent: bool,
               as_json: bool) -> None:
    rows = views.checkpoint_rows(_listings(vm_ref), wanted, most_recent)
    asked = [f"--type {wanted}"] * bool(wanted) + ["--most-recent"] * most_recent
    empty = f"No checkpoints match {', '.join(asked)}." if asked else "No checkpoints."
    emit(as_json, rows, _row_lines(rows) if rows else [empty])


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
    return views.checkpoint_show(face().reading, face().vm_id(vm_ref), ckpt_ref)


