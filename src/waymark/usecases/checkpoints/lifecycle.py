"""Checkpoint use cases: create, apply, rename and notes (this issue: VMs that are off)."""

from __future__ import annotations

import base64
import enum
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import msgspec
from sqlalchemy import select
from sqlalchemy.orm import Session

from waymark.catalog.models import Checkpoint, Disk, FrozenImage, Image, Vm
from waymark.engine import compaction, journal, lookup, settle
from waymark.engine.context import Context
from waymark.engine.journal import now
from waymark.engine.params import Params
from waymark.engine.running import live_checkpoint, power, presence
from waymark.engine.running.live_checkpoint import CheckpointCreate
from waymark.engine.steps import (
    ClaimFile,
    CopyFile,
    CreateImage,
    DeleteFile,
    Step,
    WriteFile,
    WriteTpmState,
)
from waymark.errors import Conflict, InvalidInput, LimitReached, NotFound
from waymark.images import iso
from waymark.model import names, notes, tree
from waymark.model.hardware import HardwareConfig
from waymark.qemu import qmp, tpm
from waymark.usecases.access import quotas
from waymark.usecases.vms.definitions import new_id

DISK_ONLY = live_checkpoint.DISK_ONLY


def _refuse_disabled(vm_row: Vm) -> None:
    if vm_row.checkpoint_type == "disabled":
        raise Conflict(f"checkpoints are disabled for VM {vm_row.name!r}.",
                       hint=f"Enable them with: waymark vm set {vm_row.name} "
                            "--checkpoint-type production")


def require_room(session: Session, vm_row: Vm, adding: int = 1) -> None:
    count = lookup.checkpoint_count(session, vm_row.id)
    if count + adding > vm_row.max_checkpoints:
        raise LimitReached(
            f"VM {vm_row.name!r} has {count} checkpoints, its limit is {vm_row.max_checkpoints}.",
            hint=f"Delete some, or raise the limit: waymark vm set {vm_row.name} "
                 f"--max-checkpoints {vm_row.max_checkpoints + 10}")


def create(ctx: Context, vm_id: str, name: str | None = None,
           wanted: str | None = None, *, text: str | None = None) -> str:
    """Checkpoint the VM; returns the checkpoint id. Costs O(1) whatever the disk sizes.

    ``wanted`` overrides the VM's checkpoint type for this one checkpoint; ``text`` gives it
    notes (:mod:`waymark.model.notes`, checked before anything changes). A running or paused
    VM is checkpointed live (:mod:`waymark.engine.running.live_checkpoint`); an off one gets its
    disks; a saved one its disks and its saved memory.
    """
    with ctx.locked(vm_id):
        return create_locked(ctx, vm_id, name, wanted, text=text)


def create_locked(ctx: Context, vm_id: str, name: str | None, wanted: str | None, *,
                  text: str | None = None) -> str:
    """:func:`create`, for a caller that holds the VM's lock."""
    given = names.clean(name, what="checkpoint name", commas=True) if name is not None else None
    written = notes.clean(text)
    state = qmp.run_sync(power.settle(ctx, vm_id, ctx.identify(vm_id)[1]))
    created = now()
    with ctx.catalog.session() as session:
        vm_row = session.get_one(Vm, vm_id)
        _refuse_disabled(vm_row)
        require_room(session, vm_row)
        label = given if given is not None else tree.default_name(vm_row.name, created)
        wanted = wanted or vm_row.checkpoint_type
        params, steps = _plan_create(ctx, session, vm_row, label, state)
        params.checkpoint["requested_type"] = wanted
        params.checkpoint["notes"] = written
    with quotas.checkpoint_added(ctx, vm_id):
        if state not in presence.LIVE_STATES:
            ctx.journal.run(vm_id, params, steps)
        else:
            with ctx.journal.prepared(vm_id, params, steps) as intent:
                qmp.run_sync(live_checkpoint.capture(intent, wanted))
    return str(params.checkpoint["id"])


def _plan_create(ctx: Context, session: Session, vm_row: Vm, label: str, state: str
                 ) -> tuple[CheckpointCreate, list[Step]]:
    checkpoint_id = new_id()
    hardware = lookup.hardware(vm_row)
    disks = lookup.disks(session, vm_row.id)
    frozen, overlays, skipped = [], [], []
    steps: list[Step] = []
    for disk_id in hardware.disks:
        disk = disks[disk_id]
        if disk.active_image_id is None:
            skipped.append({"id": disk.id, "path": disk.passthrough_path,
                            "reason": "pass-through disks are not captured"})
            continue
        active = session.get_one(Image, disk.active_image_id)
        frozen.append({"disk_id": disk_id, "image_id": active.id})
        row, step = _overlay(ctx, disk_id, active, shallow=True)
        overlays.append(row)
        if state not in presence.LIVE_STATES:  # (live: in QEMU's switch transaction)
            # backup change tracking follows Now
            step = msgspec.structs.replace(step, bitmaps_from=active.path)
        steps.append(step)
    if state not in presence.LIVE_STATES:  # (live: QEMU holds every file of them open)
        _require_chains(session, vm_row.id, [f["image_id"] for f in frozen])
    record = {"id": checkpoint_id, "vm_id": vm_row.id, "name": label,
              "parent_id": vm_row.current_checkpoint_id, "kind": DISK_ONLY,
              "requested_type": vm_row.checkpoint_type, "fallback_reason": None,
              "config": hardware.dump(), "memory_path": None, "memory_sha256": None,
              "skipped_disks": skipped}
    live: dict[str, Any] | None = None
    if state == "saved":
        steps.append(_keep_saved_memory(ctx, vm_row, record))
    elif state in presence.LIVE_STATES:
        memory = Path(vm_row.checkpoint_dir) / f"{checkpoint_id}.state"
        steps.append(ClaimFile(path=str(memory)))
        live = live_checkpoint.plan(presence.run_files(ctx, vm_row.id), vm_row.name, state,
                                    frozen, overlays, memory,
                                    power.tpm_folder(ctx, vm_row.id) if hardware.tpm else None)
    elif hardware.tpm:  # off or saved: the state swtpm left is the checkpoint's
        record["tpm_state"] = base64.b64encode(
            tpm.read_state(power.tpm_folder(ctx, vm_row.id))).decode()
    description = {"checkpoint": checkpoint_id, "vm": vm_row.id, "vm_name": vm_row.name,
                   "configuration": hardware.dump(), "frozen_images": frozen}
    steps.append(WriteFile(path=str(Path(vm_row.checkpoint_dir) / f"{checkpoint_id}.json"),
                           text=json.dumps(description, indent=2, sort_keys=True)))
    return CheckpointCreate(checkpoint=record, frozen=frozen, overlays=overlays,
                            live=live), steps


def _keep_saved_memory(ctx: Context, vm_row: Vm, record: dict[str, Any]) -> CopyFile:
    """A saved VM's checkpoint holds its saved memory state (Hyper-V's green triangle): it is
    a standard checkpoint, whatever type was asked for. Returns the copy step."""
    meta = power.saved_state(ctx, vm_row.id).load(vm_row.name)
    memory = Path(vm_row.checkpoint_dir) / f"{record['id']}.state"
    record.update(kind="standard", memory_path=str(memory), memory_sha256=meta["sha256"],
                  config=meta["hardware"])
    if vm_row.checkpoint_type != "standard":
        record["fallback_reason"] = "the VM was saved: the checkpoint holds its saved memory"
    return CopyFile(src=str(power.saved_state(ctx, vm_row.id).state), path=str(memory))


def _require_chains(session: Session, vm_id: str, tops: list[str]) -> None:
    """Refuse, before anything changes, when a file of the chains under the images ``tops``
    is missing (one catalog query and a ``stat`` per layer: qemu-img does not open them, see
    :func:`_overlay`)."""
    layers = {image_id: (parent_id, path) for image_id, parent_id, path in session.execute(
        select(Image.id, Image.parent_id, Image.path).where(Image.vm_id == vm_id))}
    for top in tops:
        image: str | None = top
        while image is not None:
            parent_id, path = layers[image]
            if not os.path.exists(path):
                raise NotFound(f"disk image {path} is missing.",
                               hint="Run: waymark check (it says what needs the file)")
            image = parent_id


def _overlay(ctx: Context, disk_id: str, base: Image, shallow: bool = False
             ) -> tuple[dict[str, Any], CreateImage]:
    """A new active image for ``disk_id`` on ``base``: its catalog row and its file step.
    ``shallow``: qemu-img does not open ``base``'s chain (``-u``, with the size the catalog
    holds), so the overlay costs the same whatever the chain's depth, and a running QEMU may
    hold ``base`` locked; otherwise qemu-img opens the whole chain (a missing layer fails)."""
    overlay_id = new_id()
    path = ctx.disk_folder(base.vm_id) / f"{overlay_id}.qcow2"
    row = {"id": overlay_id, "vm_id": base.vm_id, "path": str(path), "format": "qcow2",
           "parent_id": base.id, "pinned": False, "virtual_size": base.virtual_size,
           "chain_length": 1, "disk_id": disk_id}
    return row, CreateImage(path=str(path), backing=base.path, backing_fmt=base.format,
                            unsafe=shallow, size=base.virtual_size if shallow else None)


def _add_overlays(session: Session, overlays: list[dict[str, Any]]) -> None:
    """New active images: insert them and make each its disk's active image."""
    for row in overlays:
        fields = {k: v for k, v in row.items() if k != "disk_id"}
        session.add(Image(**fields, created_at=now()))
        session.flush()
        session.get_one(Disk, row["disk_id"]).active_image_id = row["id"]


def commit_create(session: Session, params: CheckpointCreate) -> None:
    record = params.checkpoint
    session.add(Checkpoint(**record, created_at=now()))
    session.flush()
    for row in params.frozen:
        session.add(FrozenImage(checkpoint_id=record["id"], **row))
    _add_overlays(session, params.overlays)
    session.get_one(Vm, record["vm_id"]).current_checkpoint_id = record["id"]


class ApplyMode(enum.Enum):
    CHECKPOINT_FIRST = "checkpoint-first"
    DISCARD_CURRENT = "discard-current"


@dataclass
class ApplyResult:
    checkpoint_id: str
    safety_checkpoint_id: str | None = None
    detached_disks: list[str] = field(default_factory=list)
    kept_disks: list[str] = field(default_factory=list)
    state: str = "off"
    warnings: list[str] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        """What ``checkpoint apply --json`` and the API answer."""
        return {"checkpoint_id": self.checkpoint_id, "state": self.state,
                "safety_checkpoint_id": self.safety_checkpoint_id,
                "detached_disk_ids": self.detached_disks, "kept_disk_ids": self.kept_disks,
                "warnings": self.warnings}


def apply(ctx: Context, vm_id: str, ckpt_ref: str, mode: ApplyMode,
          start: bool = False) -> ApplyResult:
    """Return the VM to checkpoint ``ckpt_ref``: its disks and configuration as they were.

    A running or paused VM is turned off first (Hyper-V does the same), after the safety
    checkpoint with ``CHECKPOINT_FIRST``, which is taken live. A standard checkpoint leaves the
    VM saved, any other off; ``start`` then starts (resumes) it at once.
    """
    with ctx.locked(vm_id) as (_, name):
        state = qmp.run_sync(power.settle(ctx, vm_id, name))
        with ctx.catalog.session() as session:
            vm_row = session.get_one(Vm, vm_id)
            target_row = lookup.checkpoint(session, vm_row, ckpt_ref)
            target, target_name = target_row.id, target_row.name
            if mode is ApplyMode.CHECKPOINT_FIRST:
                _can_checkpoint_first(session, vm_row)
            change = _quota_change(session, vm_row, target)
        change.check_before(ctx, safety_checkpoint=mode is ApplyMode.CHECKPOINT_FIRST)
        safety = create_locked(ctx, vm_id, None, None, text=safety_notes(
            f"applying checkpoint {target_name!r}")) \
            if mode is ApplyMode.CHECKPOINT_FIRST else None
        if state in presence.LIVE_STATES:
            qmp.run_sync(power.power_off(ctx, vm_id, name, "turned off to apply a checkpoint"))
        with ctx.catalog.session() as session:
            params, steps, result = _plan_apply(ctx, session, vm_id, target)
        result.safety_checkpoint_id = safety
        with change.admitted(ctx):
            ctx.journal.run(vm_id, params, steps)
        settle.settle_vm(ctx, vm_id)
        if start:
            qmp.run_sync(power.start_locked(ctx, vm_id, name))
            result.state = "running"
        return result


def safety_notes(before: str) -> str:
    """The notes of a checkpoint of Now taken first (Hyper-V's "Create Checkpoint and Apply"),
    which say what it was taken before: ``before`` ("applying checkpoint 'X'")."""
    return f"Now as it was before {before} (taken first, to go back to)."


def revert_target(ctx: Context, vm_id: str) -> str:
    """The checkpoint a revert applies (Hyper-V's Revert-VMCheckpoint): the VM's current one,
    Now's parent; a VM without one is refused (:func:`no_current`)."""
    with ctx.catalog.snapshot() as session:
        vm_row = lookup.vm_by_id(session, vm_id)
        if vm_row.current_checkpoint_id is None:
            raise no_current(vm_row.name, lookup.checkpoint_count(session, vm_id) > 0)
        return vm_row.current_checkpoint_id


def no_current(vm_name: str, has_checkpoints: bool) -> Conflict:
    """The refusal of a revert: Now has no parent to go back to."""
    hint = (f"Apply one of its checkpoints instead: waymark checkpoint list {vm_name}"
            if has_checkpoints else f"Take one first: waymark checkpoint create {vm_name}")
    return Conflict(f"VM {vm_name!r} has no current checkpoint (Now has no parent): there is "
                    "nothing to revert to.", hint=hint)


def _install_memory(saved: power.SavedState, target: Checkpoint, config: dict[str, Any]
                    ) -> list[Step]:
    """Steps that make a standard checkpoint's memory the VM's saved state (start resumes it
    on the hardware ``config``)."""
    if not target.memory_path:
        return []
    meta = {"sha256": target.memory_sha256, "hardware": config,
            "from_checkpoint": target.id}
    return [CopyFile(src=target.memory_path, path=str(saved.state)),
            WriteFile(path=str(saved.meta), text=json.dumps(meta, indent=2))]


def _media_present(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint's configuration with its ISO in the CD drive, or with the drive empty
    and a warning when that ISO is gone (Hyper-V's apply does the same: never a failed apply
    for a missing ISO)."""
    media = config.get("media")
    if not media or iso.is_iso(media):
        return config, []
    return {**config, "media": None}, [f"The ISO {media} that was in the CD drive is gone (or "
                                       "is no ISO any more): the drive is empty."]


def _can_checkpoint_first(session: Session, vm_row: Vm) -> None:
    """Fail before anything changes when the safety checkpoint could not be taken whole."""
    _refuse_disabled(vm_row)
    require_room(session, vm_row)


def _quota_change(session: Session, vm_row: Vm, target_id: str) -> quotas.Change:
    """What applying the checkpoint adds to the owner's usage: its vCPUs, memory and disks
    (a disk detached since keeps its current data too, as :func:`_plan_apply` does)."""
    target = session.get_one(Checkpoint, target_id)
    attached = lookup.hardware(vm_row).disks
    disks, images = lookup.disks(session, vm_row.id), lookup.images(session, vm_row.id)
    frozen = lookup.frozen(session, target_id)
    kept = [d for d in frozen if d not in attached and disks[d].active_image_id is not None]
    return quotas.hardware_replaced(
        session, vm_row, HardwareConfig.load(target.config),
        {d: images[image_id].virtual_size for d, image_id in frozen.items()}, kept=kept)


class CheckpointApply(Params, frozen=True, kw_only=True):
    """Applying checkpoint ``checkpoint`` to VM ``vm``: its hardware ``config``, the new active
    images (``overlays``), the disks detached since that keep their data (``kept``), the VM's
    new ``state``; the saved-state files to ``discard`` and the steps that ``install`` the
    checkpoint's memory as the saved state (each journaled at commit, *commit, then finish*)."""

    kind: ClassVar[str] = "checkpoint_apply"
    vm: str
    checkpoint: str
    config: dict[str, Any]
    overlays: list[dict[str, Any]]
    kept: list[dict[str, Any]]
    state: str
    discard: Sequence[str] = ()
    install: Sequence[Step] = ()
    tpm: WriteTpmState | None = None


class SavedStateDiscard(Params, frozen=True, kw_only=True):
    kind: ClassVar[str] = "saved_state_discard"


class SavedStateInstall(Params, frozen=True, kw_only=True):
    kind: ClassVar[str] = "saved_state_install"


class TpmStateInstall(Params, frozen=True, kw_only=True):
    """Now's TPM state made the applied checkpoint's (its one step, redone after a crash)."""

    kind: ClassVar[str] = "tpm_state_install"


def _plan_apply(ctx: Context, session: Session, vm_id: str, target_id: str
                ) -> tuple[CheckpointApply, list[Step], ApplyResult]:
    vm_row = session.get_one(Vm, vm_id)
    target = session.get_one(Checkpoint, target_id)
    now_hw, then_hw = lookup.hardware(vm_row), HardwareConfig.load(target.config)
    frozen = lookup.frozen(session, target_id)
    disks, images = lookup.disks(session, vm_id), lookup.images(session, vm_id)
    result = ApplyResult(target_id, state="saved" if target.memory_path else "off")
    result.detached_disks = [d for d in now_hw.disks if d not in then_hw.disks]
    overlays, kept = [], []
    steps: list[Step] = []
    for disk_id, image_id in frozen.items():
        base = images[image_id]
        current = disks[disk_id].active_image_id
        if disk_id not in now_hw.disks and current is not None:
            kept.append({"id": new_id(), "vm_id": vm_id, "active_image_id": current,
                         "passthrough_path": None})
        row, step = _overlay(ctx, disk_id, base)
        overlays.append(row)
        steps.append(step)
    result.kept_disks = [str(k["id"]) for k in kept]
    saved = power.saved_state(ctx, vm_id)  # Now's saved memory no longer fits its disks
    discard = [str(saved.state), str(saved.meta)] \
        if vm_row.state == "saved" and not target.memory_path else []
    config, result.warnings = _media_present(target.config)
    params = CheckpointApply(vm=vm_id, checkpoint=target_id, config=config,
                             overlays=overlays, kept=kept, state=result.state, discard=discard,
                             install=_install_memory(saved, target, config),
                             tpm=None if target.tpm_state is None else WriteTpmState(
                                 path=str(power.tpm_folder(ctx, vm_id)),
                                 state=target.tpm_state))
    return params, steps, result


def commit_apply(session: Session, params: CheckpointApply) -> None:
    for row in params.kept:  # a detached disk's own data stays, as a detached disk
        session.add(Disk(**row, created_at=now()))
    _add_overlays(session, params.overlays)
    vm_row = session.get_one(Vm, params.vm)
    vm_row.config = params.config
    vm_row.current_checkpoint_id = params.checkpoint
    vm_row.state = params.state
    if params.discard:
        journal.add(session, params.vm, SavedStateDiscard(),
                    [DeleteFile(path=path) for path in params.discard])
    if params.install:
        journal.add(session, params.vm, SavedStateInstall(), params.install)
    if params.tpm is not None:
        journal.add(session, params.vm, TpmStateInstall(), [params.tpm])
    compaction.mark(session, params.vm)


@dataclass(frozen=True)
class Renamed:
    id: str
    warnings: list[str]


def rename(ctx: Context, vm_id: str, ckpt_ref: str, new_name: str) -> Renamed:
    """Rename a checkpoint (:func:`change`)."""
    return change(ctx, vm_id, ckpt_ref, name=new_name)


def change(ctx: Context, vm_id: str, ckpt_ref: str, *, name: str | None = None,
           text: str | None = None) -> Renamed:
    """Rename a checkpoint and/or set its notes (``text``; "" clears them, None keeps them),
    both checked before either changes. A name and notes are one row: changing them needs no
    VM lock, so it never waits for a merge. As in Hyper-V, names need not be unique; a name
    another checkpoint of the VM has is taken with a warning (a reference by that name is then
    ambiguous)."""
    label = names.clean(name, what="checkpoint name", commas=True) if name is not None else None
    written = notes.clean(text) if text is not None else None
    if label is None and text is None:
        raise InvalidInput("nothing to change: give a new name or notes.",
                           hint="Give the checkpoint's new name, its notes, or both.")
    with ctx.catalog.session() as session:
        vm_row = lookup.vm_by_id(session, vm_id)
        row = lookup.checkpoint(session, vm_row, ckpt_ref)
        if text is not None:
            row.notes = written
        if label is None:
            return Renamed(row.id, [])
        row.name = label
        return Renamed(row.id, _same_name(session, vm_row, row))


def _same_name(session: Session, vm_row: Vm, renamed: Checkpoint) -> list[str]:
    """A warning when other checkpoints of the VM have ``renamed``'s name."""
    others = [c.id[:12] for c in lookup.checkpoints(session, vm_row.id)
              if c.name == renamed.name and c.id != renamed.id]
    if not others:
        return []
    return [f"{len(others)} other checkpoint(s) of {vm_row.name!r} named {renamed.name!r} too "
            f"({', '.join(others)}): refer to them by id prefix, a reference by this name is "
            "ambiguous."]
