"""``waymark checkpoint``'s commands that change checkpoints: take, apply, rename, notes,
delete and export. Their module is loaded only when one of them runs
(:class:`waymark.cli.checkpoint.CheckpointCommands`): the use cases they need are no cost to
``waymark checkpoint list``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from waymark.cli.checkpoint import notes_lines, shown
from waymark.cli.job import ended, follow
from waymark.cli.main import face
from waymark.cli.output import (
    F,
    StepProgress,
    emit,
    interactive,
    json_option,
    warn,
)
from waymark.engine import jobs
from waymark.errors import ConsentRequired, InvalidInput
from waymark.model.units import human
from waymark.text import printable
from waymark.usecases import views
from waymark.usecases.checkpoints import deletion
from waymark.usecases.checkpoints import lifecycle as checkpoints
from waymark.usecases.vms import export_job


@click.command("create")
@click.argument("vm_ref", metavar="VM")
@click.option("--name", help="1-99 characters (default: 'VM - (date - time)').")
@click.option("--type", "wanted", type=click.Choice(["standard", "production", "productiononly"]),
              help="This checkpoint's type, instead of the VM's checkpoint type.")
@click.option("--notes", "text", metavar="TEXT",
              help="Its notes: free text, several lines, at most 4,000 characters ('-': read "
                   "them from stdin).")
@json_option
def create(vm_ref: str, name: str | None, wanted: str | None, text: str | None,
           as_json: bool) -> None:
    """Take a checkpoint of a VM (Hyper-V's Checkpoint-VM), live if it runs.

    standard: memory, devices and disks (applying it resumes the VM there). production: disks
    only, the guest's file systems quiesced through its agent (falls back to standard when
    that fails; productiononly fails instead). A VM that is off gets its disks.
    """
    text = _given(text)
    remote = face().remote
    if remote is not None:
        data = remote.checkpoint_create(vm_ref, name, wanted, text)
    else:
        ctx, vm_id = face().ctx, face().vm_id(vm_ref)
        data = views.checkpoint_show(ctx, vm_id, checkpoints.create(ctx, vm_id, name, wanted,
                                                                    text=text))
    lines = [f"Created checkpoint {data['name']!r} ({data['id'][:12]}, {data['kind']})."]
    if data["fallback_reason"]:
        lines.append(f"It is {data['kind']}, not {data['requested_type']}: "
                     f"{data['fallback_reason']}.")
    emit(as_json, data, lines)


def _choose_mode(checkpoint_first: bool, discard_current: bool, target: str
                 ) -> checkpoints.ApplyMode:
    if checkpoint_first and discard_current:
        raise InvalidInput("--checkpoint-first and --discard-current exclude each other.",
                           hint="Choose one.")
    if checkpoint_first:
        return checkpoints.ApplyMode.CHECKPOINT_FIRST
    if discard_current:
        return checkpoints.ApplyMode.DISCARD_CURRENT
    consent = ConsentRequired(
        "applying a checkpoint discards the VM's current state.",
        hint="Add --checkpoint-first (checkpoint Now, then apply) or --discard-current.")
    if not interactive():
        raise consent
    click.echo(f"Apply checkpoint {target!r}? The VM's current state will be lost.\n"
               "  [c] Create Checkpoint and Apply\n  [a] Apply (cannot be undone)\n  [x] Cancel")
    answer = click.prompt("Choice", type=click.Choice(["c", "a", "x"]), default="x")
    if answer == "x":
        raise click.exceptions.Abort()
    return (checkpoints.ApplyMode.CHECKPOINT_FIRST if answer == "c"
            else checkpoints.ApplyMode.DISCARD_CURRENT)


APPLY_OPTIONS = (
    click.option("--checkpoint-first", is_flag=True, help="Checkpoint Now first, then apply."),
    click.option("--discard-current", is_flag=True, help="Apply; the current state is lost."),
    click.option("--start", is_flag=True, help="Start the VM afterwards (a standard checkpoint "
                                                "resumes where it was taken)."),
    json_option)


def apply_options(fn: F) -> F:
    """The options apply and revert share: Hyper-V's choice, --start, --json."""
    for option in reversed(APPLY_OPTIONS):
        fn = option(fn)
    return fn


@click.command("apply")
@click.argument("vm_ref", metavar="VM")
@click.argument("ckpt_ref", metavar="CKPT")
@apply_options
def apply(vm_ref: str, ckpt_ref: str, checkpoint_first: bool, discard_current: bool,
          start: bool, as_json: bool) -> None:
    """Return the VM to a checkpoint (Hyper-V's Restore-VMSnapshot).

    A running VM is turned off first (checkpointed live first with --checkpoint-first).
    Applying a standard checkpoint leaves the VM saved (vm start resumes it exactly there);
    any other leaves it off.
    """
    _apply(shown(vm_ref, ckpt_ref), checkpoint_first, discard_current, start, as_json)


@click.command("revert")
@click.argument("vm_ref", metavar="VM")
@apply_options
def revert(vm_ref: str, checkpoint_first: bool, discard_current: bool, start: bool,
           as_json: bool) -> None:
    """Apply the VM's current checkpoint, Now's parent (Hyper-V's Revert-VMCheckpoint).

    The same choice, options and answer as apply; a VM without a current checkpoint is refused.
    """
    remote = face().remote
    if remote is not None:  # the server's POST /api/vms/{vm}/revert
        listing = remote.checkpoint_list(vm_ref)
        current = next((c for c in listing["checkpoints"]
                        if c["id"] == listing["current_checkpoint_id"]), None)
        if current is None:
            raise checkpoints.no_current(listing["vm_name"], bool(listing["checkpoints"]))
        mode = _choose_mode(checkpoint_first, discard_current, current["name"])
        data = remote.checkpoint_revert(listing["vm_id"], mode.name.lower(), start)
        emit(as_json, data, _applied_lines(current["name"], data))
        return
    vm_id = face().vm_id(vm_ref)
    target = views.checkpoint_show(face().ctx, vm_id, checkpoints.revert_target(face().ctx, vm_id))
    _apply(target, checkpoint_first, discard_current, start, as_json)


def _apply(target: dict[str, Any], checkpoint_first: bool, discard_current: bool, start: bool,
           as_json: bool) -> None:
    """Apply the checkpoint ``target`` shows, after Hyper-V's choice; print the answer."""
    mode = _choose_mode(checkpoint_first, discard_current, target["name"])
    remote = face().remote
    if remote is not None:
        data = remote.checkpoint_apply(target["vm_id"], target["id"], mode.name.lower(), start)
    else:
        data = checkpoints.apply(face().ctx, target["vm_id"], target["id"], mode,
                                 start=start).view()
    emit(as_json, data, _applied_lines(target["name"], data))


def _applied_lines(name: str, data: dict[str, Any]) -> list[str]:
    """What an apply (or revert) did, as ``checkpoint apply`` prints it."""
    lines = [f"Applied checkpoint {name!r}; the VM is {data['state']}."]
    if data["safety_checkpoint_id"]:
        lines.insert(0, f"Checkpointed Now first ({data['safety_checkpoint_id'][:12]}).")
    lines += [f"Detached disk {d[:12]} (not in the checkpoint); its files are kept."
              for d in data["detached_disk_ids"]]
    lines += [f"The re-attached disk's previous image is kept as detached disk {d[:12]}."
              for d in data["kept_disk_ids"]]
    lines += [f"Warning: {w}" for w in data.get("warnings", [])]
    return lines


@click.command("rename")
@click.argument("vm_ref", metavar="VM")
@click.argument("ckpt_ref", metavar="CKPT")
@click.argument("new_name")
@json_option
def rename(vm_ref: str, ckpt_ref: str, new_name: str, as_json: bool) -> None:
    """Rename a checkpoint (1-99 characters)."""
    remote = face().remote
    if remote is not None:
        data = remote.checkpoint_rename(vm_ref, ckpt_ref, new_name)
    else:
        ctx, vm_id = face().ctx, face().vm_id(vm_ref)
        renamed = checkpoints.rename(ctx, vm_id, ckpt_ref, new_name)
        data = {**views.checkpoint_show(ctx, vm_id, renamed.id), "warnings": renamed.warnings}
    for message in data["warnings"]:
        warn(message)
    emit(as_json, data, [f"Renamed checkpoint {data['id'][:12]} to {data['name']!r}."])


def _given(text: str | None) -> str | None:
    """Notes as given: ``-`` reads them from stdin (several lines, as a file holds them)."""
    return sys.stdin.read() if text == "-" else text


@click.command("notes")
@click.argument("vm_ref", metavar="VM")
@click.argument("ckpt_ref", metavar="CKPT")
@click.argument("text", required=False)
@click.option("--clear", is_flag=True, help="Remove the notes.")
@json_option
def notes(vm_ref: str, ckpt_ref: str, text: str | None, clear: bool, as_json: bool) -> None:
    """Show, set or clear a checkpoint's notes (Hyper-V's Notes, SCVMM's Set-SCVMCheckpoint
    -Description).

    TEXT: free text, several lines (line breaks and tabs kept), at most 4,000 characters,
    no control characters; '-' reads it from stdin. Without TEXT or --clear the notes are
    printed. Needs what rename needs.
    """
    if clear and text is not None:
        raise InvalidInput("give the notes or --clear, not both.",
                           hint="Drop --clear to set them, or TEXT to clear them.")
    if text is None and not clear:
        data = shown(vm_ref, ckpt_ref)
        emit(as_json, data, notes_lines(data["notes"], "") if data.get("notes") else [])
        return
    written = "" if clear else _given(text) or ""
    remote = face().remote
    if remote is not None:
        data = remote.checkpoint_notes(vm_ref, ckpt_ref, written)
    else:
        ctx, vm_id = face().ctx, face().vm_id(vm_ref)
        changed = checkpoints.change(ctx, vm_id, ckpt_ref, text=written)
        data = {**views.checkpoint_show(ctx, vm_id, changed.id), "warnings": changed.warnings}
    said = "Set the notes of" if data["notes"] else "Cleared the notes of"
    emit(as_json, data, [f"{said} checkpoint {data['name']!r} ({data['id'][:12]})."])


NO_WAIT = click.option("--no-wait", is_flag=True,
                       help="Return at once; a background job does the work (waymark job wait).")


@click.command("delete")
@click.argument("vm_ref", metavar="VM")
@click.argument("pattern")
@click.option("--subtree", is_flag=True, help="Also delete every checkpoint below it.")
@click.option("--yes", is_flag=True, help="Delete every match of a pattern without asking.")
@NO_WAIT
@json_option
def delete(vm_ref: str, pattern: str, subtree: bool, yes: bool, no_wait: bool,
           as_json: bool) -> None:
    """Delete checkpoints (Hyper-V's Remove-VMSnapshot); their disk layers are merged away.

    PATTERN is a name or id prefix, or a glob over names ('Experiment*'); a checkpoint named
    exactly PATTERN wins over the glob. Now's disk state is never lost, even when its parent
    goes.
    """
    if face().remote is not None:
        _delete_remote(vm_ref, pattern, subtree, yes, no_wait, as_json)
        return
    ctx, vm_id = face().ctx, face().vm_id(vm_ref)
    matches = deletion.matching(ctx, vm_id, pattern)
    if len(matches) > 1 and not yes and interactive():
        click.echo(f"{pattern!r} matches {len(matches)} checkpoints:")
        for match in matches:
            click.echo(f"  {match.id[:12]}  {printable(match.name)}")
        click.confirm("Delete them all" + (" with their subtrees" if subtree else "") + "?",
                      abort=True)
        yes = True
    done = deletion.delete_checkpoints(ctx, vm_id, pattern, subtree=subtree, yes=yes,
                                       user=jobs.host_user(),
                                       report=StepProgress(plain=as_json), wait=not no_wait)
    if no_wait:
        jobs.spawn(ctx, done.job)
    data = done.answer()
    if not no_wait:
        data.update(_freed(jobs.show(ctx, done.job)))
    lines = _deleted_lines(data, ctx.identify(vm_id)[1])
    if no_wait:
        lines.append(f"Merging in job {done.job[:12]}: waymark job wait {done.job[:12]}")
    emit(as_json, data, lines)


def _freed(job: dict[str, Any]) -> dict[str, int]:
    """``freed_bytes``: the space the delete's merge job freed, when it measured it."""
    freed = (job["result"] or {}).get("freed_bytes")
    return {"freed_bytes": freed} if isinstance(freed, int) else {}


def _deleted_lines(data: dict[str, Any], vm_name: str) -> list[str]:
    """``Deleted checkpoint 'X' (id) of VM Y; freed 1.2 GiB.`` (with several, one line each
    and the space freed last)."""
    lines = [f"Deleted checkpoint {m['name']!r} ({m['id'][:12]}) of VM {vm_name}."
             for m in data["deleted"]]
    if "freed_bytes" in data:
        freed = human(data["freed_bytes"])
        if len(lines) == 1:
            lines[0] = f"{lines[0][:-1]}; freed {freed}."
        else:
            lines.append(f"Freed {freed}.")
    return lines


def _delete_remote(vm_ref: str, pattern: str, subtree: bool, yes: bool, no_wait: bool,
                   as_json: bool) -> None:
    """Delete through the server; but with --no-wait, follow the merge job to its end as the
    local command does."""
    remote = face().remote
    assert remote is not None
    try:
        data = remote.checkpoint_delete(vm_ref, pattern, subtree, yes)
    except ConsentRequired as err:
        if not interactive():
            raise
        click.confirm(f"{err.message}\nDelete them all?", abort=True)
        data = remote.checkpoint_delete(vm_ref, pattern, subtree, True)
    if no_wait:
        job = data["job_id"][:12]
        lines = [*_deleted_lines(data, vm_ref), f"Merging in job {job}: waymark job wait {job}"]
        emit(as_json, data, lines)
        return
    done = follow(data["job_id"], plain=as_json)
    data.update(_freed(done))
    emit(as_json, data, _deleted_lines(data, done["vm_name"] or vm_ref))
    ended(done)


@click.command("export")
@click.argument("vm_ref", metavar="VM")
@click.argument("ckpt_ref", metavar="CKPT")
@click.argument("dest", metavar="DEST_DIR", type=click.Path(path_type=Path))
@NO_WAIT
@json_option
def export(vm_ref: str, ckpt_ref: str, dest: Path, no_wait: bool, as_json: bool) -> None:
    """Export a checkpoint as a standalone VM bundle (Hyper-V's Export-VMSnapshot)."""
    ctx = face().ctx
    job_id = export_job.submit_export(ctx, face().vm_id(vm_ref), ckpt_ref, dest.absolute(),
                                      run_here=not no_wait, user=jobs.host_user())
    if no_wait:
        jobs.spawn(ctx, job_id)
        emit(as_json, {"bundle": str(dest.absolute()), "job_id": job_id},
             [f"Exporting in job {job_id[:12]}: waymark job wait {job_id[:12]}"])
        return
    manifest = export_job.run_export(ctx, job_id, StepProgress(plain=as_json))
    emit(as_json, {"bundle": str(dest.absolute()), "manifest": manifest, "job_id": job_id},
         [f"Exported {manifest['source']['checkpoint_name']!r} to {dest.absolute()} "
          f"({len(manifest['disks'])} disk(s)). Import it with: waymark vm import {dest}"])
