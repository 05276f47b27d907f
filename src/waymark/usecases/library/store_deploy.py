"""Store a VM in a library share and deploy it back, its checkpoints intact (VMM's Store and
Deploy: "when you migrate, store, or deploy a virtual machine, any existing checkpoints move with
the virtual machine").

The share's layout is :mod:`waymark.external.library_share`. Both moves are one journal intent each,
so a
VM is never half in the library:

- **store** (the VM off or saved): *prepare* claims the VM's folder in the library, copies every
  file there (a hard link when the share is on the home's file system, so a move costs no copy;
  a pinned base, which the VM does not own, is flattened into a file of its own) and writes the
  manifest with every file's sha256 last. Killed before the commit: recovery deletes the library
  copy and the VM stays here, untouched. The *commit* removes the VM's rows (and records where
  it went, :class:`~waymark.catalog.models.StoredVm`) in the transaction that journals deleting
  its local files and then the claim: from then on the VM is only in the library.
- **deploy** verifies every checksum first, claims the library folder, copies the files into
  ``vms/<id>/`` (the VM keeps its id; images become files it owns) and writes its checkpoint
  descriptions. The *commit* inserts the rows and journals: delete the library manifest (the
  library no longer holds the VM), rewrite each image's backing link to its new path (a hard
  link shares the library's inode, so only now may the header change), delete the library
  files, then the claim.

Library images keep the backing links they had on the host (they are read only through the
manifest's image graph, never opened by path); boot files (kernel, initrd) move too, so a
deployed VM needs nothing of the host it came from, nor its template.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from waymark.catalog.models import Checkpoint, Disk, FrozenImage, Image, StoredVm, Vm
from waymark.engine import compaction, journal, lookup, settle
from waymark.engine.context import Context
from waymark.engine.journal import StepReport, now
from waymark.engine.params import Params
from waymark.engine.running import power, presence
from waymark.engine.steps import (
    Convert,
    CopyFile,
    DeleteFile,
    MakeDir,
    PruneDirs,
    Rebase,
    Step,
    WriteFile,
    WriteManifest,
)
from waymark.errors import Conflict, InvalidInput
from waymark.external import shares
from waymark.external.library_share import (
    CLAIM,
    FILES,
    MANIFEST,
    TPM_FILE,
    VERSION,
    VM_FORMAT,
    Entry,
    Library,
    claim_text,
)
from waymark.model import names, timing
from waymark.model.hardware import HardwareConfig
from waymark.model.timing import rfc3339
from waymark.qemu import tpm
from waymark.usecases.views import checkpoint_tree
from waymark.usecases.vms import definitions as vms

Report = Callable[[int, int, str, float], None] | None


class VmStore(Params, frozen=True, kw_only=True):
    """VM ``vm_id`` (``name``) moved into ``library``: its rows go at commit, then the
    ``finish`` steps delete its local files (journaled at commit: :class:`VmStoreFinish`)."""

    kind: ClassVar[str] = "vm_store"
    vm_id: str
    name: str
    library: str
    finish: Sequence[Step]


class VmStoreFinish(Params, frozen=True, kw_only=True):
    kind: ClassVar[str] = "vm_store_finish"


class VmDeploy(Params, frozen=True, kw_only=True):
    """A stored VM deployed here: its catalog rows (``vm``, ``images`` parents first, ``disks``,
    ``checkpoints``, ``frozen``) as the manifest lists them, its paths made local; the
    ``finish`` steps clear the library (journaled at commit: :class:`VmDeployFinish`)."""

    kind: ClassVar[str] = "vm_deploy"
    vm: dict[str, Any]
    images: list[dict[str, Any]]
    disks: list[dict[str, Any]]
    frozen: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]
    finish: Sequence[Step]


class VmDeployFinish(Params, frozen=True, kw_only=True):
    kind: ClassVar[str] = "vm_deploy_finish"


def init(path: Path) -> dict[str, Any]:
    library = Library.init(path)
    return {"library": str(library.root), "id": library.id}


# --- store ------------------------------------------------------------------------------------

def store(ctx: Context, vm_id: str, path: Path, report: Report = None) -> dict[str, Any]:
    """Move the VM (off or saved), its checkpoint tree and every file into the library."""
    library = Library.open(path)
    with ctx.locked(vm_id) as (_, vm_name):
        _require_storable(ctx, vm_id, vm_name)
        with library.locked(ctx.settings.lock_timeout):
            _require_new(library, vm_id, vm_name)
            with ctx.catalog.session() as session:
                steps, finish, count = _store_plan(ctx, session, library, vm_id)
            params = VmStore(vm_id=vm_id, name=vm_name, library=str(library.root),
                             finish=finish)
            ctx.journal.run(vm_id, params, steps, report=_describe(report))
            settle.settle_vm(ctx, vm_id)  # the commit's finish: the local files go
    files = json.loads(library.manifest_path(vm_id).read_text())["files"]
    return {"vm_name": vm_name, "vm_id": vm_id, "library": str(library.root),
            "checkpoint_count": count, "files": len(files),
            "bytes": sum(f["size"] for f in files.values())}


def _require_storable(ctx: Context, vm_id: str, vm_name: str) -> None:
    state = presence.reconcile(ctx, vm_id)
    if state in presence.LIVE_STATES:
        raise Conflict(f"VM {vm_name!r} is {state}; only a VM that is off or saved can be "
                       "stored in a library.",
                       hint=f"Save or stop it first: waymark vm save {vm_name}")
    if ctx.journal.pending(vm_id):
        raise Conflict(f"VM {vm_name!r} has an unfinished operation.",
                       hint="Finish it first: waymark check --repair")
    with ctx.catalog.session() as session:
        for disk in lookup.disks(session, vm_id).values():
            if disk.passthrough_path is not None:
                raise InvalidInput(
                    f"VM {vm_name!r} has the pass-through disk {disk.passthrough_path}: a "
                    "host's device cannot move into a library.",
                    hint=f"Detach it first: waymark vm disk remove {vm_name} {disk.id[:12]}")


def _require_new(library: Library, vm_id: str, vm_name: str) -> None:
    if library.folder(vm_id).exists():
        raise Conflict(f"the library {library.root} already has a folder for VM {vm_name!r} "
                       f"({library.folder(vm_id)}).",
                       hint="See it with: waymark library list --library "
                            f"{library.root} (remove a leftover folder by hand)")
    if any(e.manifest is not None and e.name == vm_name for e in library.entries()):
        raise Conflict(f"the library {library.root} already holds a VM named {vm_name!r}.",
                       hint=f"Rename this one first: waymark vm rename {vm_name} NEW_NAME, or "
                            "deploy the stored one.")


def _store_plan(ctx: Context, session: Session, library: Library, vm_id: str
                ) -> tuple[list[Step], list[Step], int]:
    """(prepare steps, finish steps, checkpoint count)."""
    vm_row = session.get_one(Vm, vm_id)
    folder = library.folder(vm_id)
    steps: list[Step] = [MakeDir(path=str(folder)),  # undone: gone if empty
                         WriteFile(path=str(folder / CLAIM), text=claim_text("store", ctx.home))]
    images = _images_parents_first(lookup.images(session, vm_id))
    for image in images:
        target = str(folder / _image_file(image.id))
        steps.append(Convert(path=target, src=image.path, src_fmt=image.format)
                     if image.pinned else CopyFile(path=target, src=image.path))
    checkpoints = lookup.checkpoints(session, vm_id)
    for row in checkpoints:
        if row.memory_path:
            steps.append(CopyFile(path=str(folder / _memory_file(row.id)),
                                  src=row.memory_path))
    saved = _saved(ctx, vm_row)
    if saved is not None:
        steps.append(CopyFile(path=str(folder / FILES / "saved.state"),
                              src=str(power.saved_state(ctx, vm_id).state)))
    if lookup.hardware(vm_row).tpm:  # Now's TPM state, a plain file (never a link) it is
        tpm.read_state(power.tpm_folder(ctx, vm_id))  # off: nothing changes it until the copy
        steps.append(CopyFile(path=str(folder / TPM_FILE),
                              src=str(tpm.state_file(power.tpm_folder(ctx, vm_id)))))
    configs = [vm_row.config, *(c.config for c in checkpoints)]
    boot = _boot_files([*configs, *([saved["hardware"]] if saved else [])])
    steps += [CopyFile(path=str(folder / rel), src=src) for src, rel in boot.items()]
    doc = _document(ctx, session, vm_row, images, checkpoints, saved, boot)
    steps.append(WriteManifest(path=str(folder / MANIFEST), root=str(folder / FILES), doc=doc))
    return steps, _local_files(ctx, vm_row, images, checkpoints, folder), len(checkpoints)


def _image_file(image_id: str) -> str:
    return f"{FILES}/disks/{image_id}.qcow2"


def _memory_file(checkpoint_id: str) -> str:
    return f"{FILES}/memory/{checkpoint_id}.state"


def _images_parents_first(images: dict[str, Image]) -> list[Image]:
    ordered: list[Image] = []
    placed: set[str | None] = {None}
    while len(ordered) < len(images):
        ready = [i for i in images.values() if i.id not in placed and i.parent_id in placed]
        ordered += sorted(ready, key=lambda i: i.id)
        placed |= {i.id for i in ready}
    return ordered


def _saved(ctx: Context, vm_row: Vm) -> dict[str, Any] | None:
    """A saved VM's saved-state description (its memory moves with it)."""
    if vm_row.state != "saved":
        return None
    return power.saved_state(ctx, vm_row.id).load(vm_row.name)


def _boot_files(configs: list[dict[str, Any]]) -> dict[str, str]:
    """Host path -> library name of every kernel and initrd the VM or a checkpoint boots
    (one that is gone is left out: what needed it could not boot here either)."""
    paths = sorted({p for c in configs for p in (c.get("kernel"), c.get("initrd"))
                    if p and Path(p).is_file()})
    return {p: f"{FILES}/boot/{n}-{Path(p).name}" for n, p in enumerate(paths)}


def _document(ctx: Context, session: Session, vm_row: Vm, images: list[Image],
              checkpoints: list[Checkpoint], saved: dict[str, Any] | None,
              boot: dict[str, str]) -> dict[str, Any]:
    """The manifest without its checksums (the ``write_manifest`` step adds them)."""
    ids = [c.id for c in checkpoints]
    frozen = session.scalars(select(FrozenImage).where(FrozenImage.checkpoint_id.in_(ids)))
    disks = lookup.disks(session, vm_row.id).values()
    return {
        "format": VM_FORMAT, "version": VERSION, "stored_at": rfc3339(now()),
        "source": {"host": json.loads(claim_text("store", ctx.home))["host"],
                   "home": str(ctx.home), "checkpoint_dir": vm_row.checkpoint_dir},
        "vm": {"id": vm_row.id, "name": vm_row.name, "state": vm_row.state,
               "created_at": rfc3339(vm_row.created_at), "config": vm_row.config,
               "checkpoint_type": vm_row.checkpoint_type,
               "max_checkpoints": vm_row.max_checkpoints,
               "current_checkpoint_id": vm_row.current_checkpoint_id,
               "automatic_checkpoints": vm_row.automatic_checkpoints,
               "automatic_checkpoint_id": vm_row.automatic_checkpoint_id,
               "origin": vm_row.origin, "owner_id": vm_row.owner_id},
        "images": [{"id": i.id, "file": _image_file(i.id), "parent_id": i.parent_id,
                    "virtual_size": i.virtual_size, "pinned_from": i.path if i.pinned else None}
                   for i in images],
        "disks": [{"id": d.id, "active_image_id": d.active_image_id,
                   "created_at": rfc3339(d.created_at)} for d in disks],
        "checkpoints": [_checkpoint_doc(c) for c in checkpoints],
        "frozen": [{"checkpoint_id": f.checkpoint_id, "disk_id": f.disk_id,
                    "image_id": f.image_id} for f in frozen],
        "saved": None if saved is None else {"file": f"{FILES}/saved.state", "meta": saved},
        "boot": boot,
        "tpm": TPM_FILE if lookup.hardware(vm_row).tpm else None,
    }


def _checkpoint_doc(row: Checkpoint) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "parent_id": row.parent_id,
            "created_at": rfc3339(row.created_at), "kind": row.kind,
            "requested_type": row.requested_type, "fallback_reason": row.fallback_reason,
            "config": row.config, "memory_sha256": row.memory_sha256,
            "memory_file": _memory_file(row.id) if row.memory_path else None,
            "skipped_disks": row.skipped_disks, "pause_seconds": row.pause_seconds,
            "freeze_seconds": row.freeze_seconds, "tpm_state": row.tpm_state,
            "notes": row.notes}


def _local_files(ctx: Context, vm_row: Vm, images: list[Image], checkpoints: list[Checkpoint],
                 folder: Path) -> list[Step]:
    """What the store's finish deletes here (as ``vm delete`` does), then the claim."""
    files = [i.path for i in images if not i.pinned]
    files += [str(Path(vm_row.checkpoint_dir) / f"{c.id}.json") for c in checkpoints]
    files += [c.memory_path for c in checkpoints if c.memory_path]
    here = ctx.vm_folder(vm_row.id)
    files += [str(here / "saved" / n) for n in ("state.bin", "saved.json")]
    files += [str(p) for p in presence.run_files(ctx, vm_row.id).kept()]
    files += [str(p) for p in power.tpm_files(ctx, vm_row.id, lookup.hardware(vm_row))]
    return [*(DeleteFile(path=f) for f in files), PruneDirs(path=str(here)),
            DeleteFile(path=str(folder / CLAIM))]


def commit_store(session: Session, params: VmStore) -> None:
    vm_id = params.vm_id
    owner_id = session.get_one(Vm, vm_id).owner_id
    vms.delete_rows(session, vm_id)
    session.merge(StoredVm(vm_id=vm_id, name=params.name, library=params.library,
                           stored_at=now(), owner_id=owner_id))
    journal.add(session, vm_id, VmStoreFinish(), params.finish)


# --- deploy -----------------------------------------------------------------------------------

def deploy(ctx: Context, ref: str, path: Path, report: Report = None) -> dict[str, Any]:
    """Bring a stored VM back onto this host with its id, checkpoints and saved state."""
    library = Library.open(path)
    entry = library.find(ref)
    library.require_stored(entry)
    vm_id, vm_name = entry.vm_id, entry.name
    with ctx.vm_locked(vm_id, vm_name), library.locked(ctx.settings.lock_timeout):
        manifest = library.require_stored(library.entry(vm_id))  # as it is now, under the lock
        _check_names(manifest)
        _require_absent(ctx, vm_id, vm_name)
        library.verify(vm_id, manifest)
        _require_safe(ctx, library, vm_id, manifest)
        params, steps = _deploy_plan(ctx, library, manifest, _stored_owner(ctx, vm_id))
        ctx.journal.run(vm_id, params, steps, report=_describe(report))
        settle.settle_vm(ctx, vm_id)  # the commit's finish: the library copy goes
    return {"vm_name": vm_name, "vm_id": vm_id, "library": str(library.root),
            "state": manifest["vm"]["state"], "checkpoint_count": len(manifest["checkpoints"])}


def _check_names(manifest: dict[str, Any]) -> None:
    """A library is outside storage: its names meet the grammar CLI input meets
    (:mod:`waymark.model.names`) before they enter the catalog."""
    names.clean(manifest["vm"]["name"], what="stored VM's name")
    for c in manifest["checkpoints"]:
        names.clean(c["name"], what=f"name of its checkpoint {str(c['id'])[:12]}",
                    commas=True)


def _stored_owner(ctx: Context, vm_id: str) -> str | None:
    """Whom a deployed VM belongs to: its owner when this host stored it (the catalog's record),
    else the administrators (None). Never the manifest's ``owner_id``: whoever can write the
    share could name any user there, and hand them (or take from them) a VM."""
    with ctx.catalog.session() as session:
        row = session.get(StoredVm, vm_id)
        return None if row is None else row.owner_id


def _require_absent(ctx: Context, vm_id: str, vm_name: str) -> None:
    with ctx.catalog.session() as session:
        if session.get(Vm, vm_id) is not None:
            raise Conflict(f"VM {vm_name!r} (id {vm_id[:12]}) is already on this host.",
                           hint="A VM lives in one place: delete this copy first if the "
                                "library's is the one to keep.")
        if session.scalars(select(Vm).where(Vm.name == vm_name)).first() is not None:
            raise Conflict(f"another VM here is named {vm_name!r}.",
                           hint=f"Rename it first: waymark vm rename {vm_name} NEW_NAME")
    if any(p.is_file() for p in ctx.vm_folder(vm_id).rglob("*")):
        raise Conflict(f"{ctx.vm_folder(vm_id)} holds files of a VM with this id.",
                       hint="See what they are: waymark check (--repair removes leftovers)")


def _require_safe(ctx: Context, library: Library, vm_id: str, manifest: dict[str, Any]
                  ) -> None:
    """The share may be written by others: the manifest must describe the folder it is in
    (plain ids, files inside it, images whose headers name no data file and, for a base, no
    backing file; a child's backing name is rewritten at deploy), and every configuration,
    as deployed, must pass the checks of CLI input. Refused naming the manifest."""
    where = str(library.manifest_path(vm_id))
    ids, files, configs = _manifest_parts(manifest, where)
    if manifest["vm"]["id"] != vm_id:
        raise shares.refused(where, f"it describes VM {manifest['vm']['id']!r}, not {vm_id}")
    for value in ids:
        if value is not None:
            shares.component(value, where=where, what="the id")
    for rel in files:
        library.file(vm_id, rel)
    for image in manifest["images"]:
        shares.image_chain(library.folder(vm_id), library.file(vm_id, image["file"]),
                           where=f"{where}: {image['file']}",
                           backing="replaced" if image["parent_id"] else "none")
    boot = _deployed_boot(ctx, manifest)
    try:
        deployed = [_rebooted(config, boot) for config in configs]
    except (TypeError, ValueError, AttributeError) as err:
        raise shares.refused(where, f"a configuration is not a Waymark VM configuration "
                                    f"({err})") from err
    for config in deployed:
        vms.untrusted_hardware(ctx, config, vm_id=vm_id, where=where)


def _manifest_parts(manifest: dict[str, Any], where: str
                    ) -> tuple[list[Any], list[Any], list[Any]]:
    """(every id, every file name but the images', every configuration) a library manifest
    holds; refused when it is not shaped like one."""
    try:
        ids = [manifest["vm"]["id"],
               *(i[k] for i in manifest["images"] for k in ("id", "parent_id")),
               *(c[k] for c in manifest["checkpoints"] for k in ("id", "parent_id")),
               *(d[k] for d in manifest["disks"] for k in ("id", "active_image_id")),
               *(f[k] for f in manifest["frozen"] for k in ("checkpoint_id", "disk_id",
                                                            "image_id")),
               *(Path(rel).name for rel in manifest["boot"].values())]
        files = [*(c["memory_file"] for c in manifest["checkpoints"] if c["memory_file"]),
                 *manifest["boot"].values(),
                 *([manifest["saved"]["file"]] if manifest["saved"] else [])]
        configs = [manifest["vm"]["config"], *(c["config"] for c in manifest["checkpoints"]),
                   *([manifest["saved"]["meta"]["hardware"]] if manifest["saved"] else [])]
    except (KeyError, TypeError, AttributeError) as err:
        raise shares.refused(where, f"it is not a library manifest ({err!r} is wrong)") from err
    return ids, files, configs


def _deployed_boot(ctx: Context, manifest: dict[str, Any]) -> dict[str, str]:
    """Host path the VM booted from -> the path its copy is deployed to."""
    here = ctx.vm_folder(manifest["vm"]["id"])
    return {src: str(here / "boot" / Path(rel).name) for src, rel in manifest["boot"].items()}


def _deploy_plan(ctx: Context, library: Library, manifest: dict[str, Any],
                 owner_id: str | None) -> tuple[VmDeploy, list[Step]]:
    vm_doc = manifest["vm"]
    vm_id, here, there = vm_doc["id"], ctx.vm_folder(vm_doc["id"]), library.folder(vm_doc["id"])
    ckpt_dir = here / "checkpoints"
    boot = _deployed_boot(ctx, manifest)
    steps: list[Step] = [WriteFile(path=str(there / CLAIM), text=claim_text("deploy", ctx.home)),
                         MakeDir(path=str(here))]
    paths = {i["id"]: str(ctx.disk_folder(vm_id) / f"{i['id']}.qcow2")
             for i in manifest["images"]}
    copies = [(i["file"], paths[i["id"]]) for i in manifest["images"]]
    copies += [(c["memory_file"], str(ckpt_dir / f"{c['id']}.state"))
               for c in manifest["checkpoints"] if c["memory_file"]]
    copies += [(rel, boot[src]) for src, rel in manifest["boot"].items()]
    if manifest["saved"]:
        copies.append((manifest["saved"]["file"], str(power.saved_state(ctx, vm_id).state)))
    if manifest.get("tpm"):
        copies.append((manifest["tpm"], str(tpm.state_file(power.tpm_folder(ctx, vm_id)))))
    steps += [CopyFile(src=str(library.file(vm_id, rel)), path=dst, confined_to=str(there))
              for rel, dst in copies]
    steps += _descriptions(manifest, ckpt_dir, boot)
    if manifest["saved"]:
        meta = {**manifest["saved"]["meta"],
                "hardware": _rebooted(manifest["saved"]["meta"]["hardware"], boot)}
        steps.append(WriteFile(path=str(power.saved_state(ctx, vm_id).meta),
                               text=json.dumps(meta, indent=2)))
    params = VmDeploy(
        vm={**vm_doc, "config": _rebooted(vm_doc["config"], boot),
            "checkpoint_dir": str(ckpt_dir), "owner_id": owner_id},
        images=[{"id": i["id"], "path": paths[i["id"]], "parent_id": i["parent_id"],
                 "virtual_size": i["virtual_size"]} for i in manifest["images"]],
        disks=manifest["disks"], frozen=manifest["frozen"],
        checkpoints=[{**c, "config": _rebooted(c["config"], boot),
                      "memory_path": str(ckpt_dir / f"{c['id']}.state")
                      if c["memory_file"] else None} for c in manifest["checkpoints"]],
        finish=_library_cleanup(library, manifest, paths))
    return params, steps


def _rebooted(config: dict[str, Any], boot: dict[str, str]) -> dict[str, Any]:
    """``config`` with its kernel and initrd at their deployed paths."""
    hardware = HardwareConfig.load(config)
    hardware.kernel = boot.get(hardware.kernel or "", hardware.kernel)
    hardware.initrd = boot.get(hardware.initrd or "", hardware.initrd)
    return hardware.dump()


def _descriptions(manifest: dict[str, Any], ckpt_dir: Path, boot: dict[str, str]
                  ) -> list[Step]:
    """Each checkpoint's description file, as checkpoint create writes it."""
    steps: list[Step] = []
    for c in manifest["checkpoints"]:
        frozen = [{"disk_id": f["disk_id"], "image_id": f["image_id"]}
                  for f in manifest["frozen"] if f["checkpoint_id"] == c["id"]]
        text = json.dumps({"checkpoint": c["id"], "vm": manifest["vm"]["id"],
                           "vm_name": manifest["vm"]["name"],
                           "configuration": _rebooted(c["config"], boot),
                           "frozen_images": frozen}, indent=2, sort_keys=True)
        steps.append(WriteFile(path=str(ckpt_dir / f"{c['id']}.json"), text=text))
    return steps


def _library_cleanup(library: Library, manifest: dict[str, Any], paths: dict[str, str]
                     ) -> list[Step]:
    """The deploy's finish: the manifest goes first (the library no longer holds the VM), then
    the backing links are rewritten, the library's files deleted, the claim last."""
    vm_id = manifest["vm"]["id"]
    steps: list[Step] = [DeleteFile(path=str(library.manifest_path(vm_id)))]
    steps += [Rebase(path=paths[i["id"]], backing=paths[i["parent_id"]], backing_fmt="qcow2",
                     unsafe=True) for i in manifest["images"] if i["parent_id"]]
    steps += [DeleteFile(path=str(library.file(vm_id, rel))) for rel in manifest["files"]]
    return [*steps, DeleteFile(path=str(library.claim_path(vm_id))),
            PruneDirs(path=str(library.folder(vm_id)))]


def commit_deploy(session: Session, params: VmDeploy) -> None:
    vm = params.vm
    session.add(Vm(**{**vm, "created_at": _when(vm["created_at"])}))
    session.flush()
    for image in params.images:  # parents first, as the manifest lists them
        session.add(Image(**image, vm_id=vm["id"], format="qcow2", pinned=False, chain_length=1,
                          created_at=now()))
        session.flush()
    for disk in params.disks:
        session.add(Disk(**{**disk, "created_at": _when(disk["created_at"])}, vm_id=vm["id"],
                         passthrough_path=None))
    for c in _parents_first(params.checkpoints):
        fields = {k: v for k, v in c.items() if k != "memory_file"}
        session.add(Checkpoint(**{**fields, "created_at": _when(c["created_at"])},
                               vm_id=vm["id"]))
        session.flush()
    for f in params.frozen:
        session.add(FrozenImage(**f))
    row = session.get(StoredVm, vm["id"])
    if row is not None:
        session.delete(row)
    journal.add(session, vm["id"], VmDeployFinish(), params.finish)
    compaction.mark(session, vm["id"])  # a base it pinned is its own now: merges may reach it


def _parents_first(checkpoints: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ordered: list[dict[str, Any]] = []
    placed: set[str | None] = {None}
    while len(ordered) < len(checkpoints):
        ready = [c for c in checkpoints if c["id"] not in placed and c["parent_id"] in placed]
        ordered += ready
        placed |= {c["id"] for c in ready}
    return ordered


def _when(text: str) -> datetime:
    return timing.parse_rfc3339(text)  # checked with the manifest's shape before the deploy


# --- list -------------------------------------------------------------------------------------

def listing(ctx: Context, path: Path) -> dict[str, Any]:
    """What the library holds, each VM with its checkpoint tree, and whether a VM here would
    stop it being deployed (read-only: no lock, no change; opening ``ctx`` has already settled
    this host's interrupted stores and deploys)."""
    library = Library.open(path)
    with ctx.catalog.session() as session:
        here = {(row.id, row.name) for row in session.scalars(select(Vm))}
    return {"library": str(library.root), "id": library.id,
            "vms": [_entry_view(e, here) for e in library.entries()]}


def _clash(entry: Entry, here: set[tuple[str, str]]) -> str | None:
    if any(vm_id == entry.vm_id for vm_id, _ in here):
        return "this VM is on this host too"
    if any(name == entry.name for _, name in here):
        return f"a VM here is named {entry.name!r}"
    return None


def _entry_view(entry: Entry, here: set[tuple[str, str]]) -> dict[str, Any]:
    view: dict[str, Any] = {"id": entry.vm_id, "name": entry.name, "status": entry.status,
                            "claim": entry.claim, "clash": _clash(entry, here)}
    manifest = entry.manifest
    if manifest is None:
        return view
    memory = {c["id"] for c in manifest["checkpoints"] if c["memory_file"]}
    return {**view, "state": manifest["vm"]["state"], "stored_at": manifest["stored_at"],
            "source": manifest["source"], "checkpoint_type": manifest["vm"]["checkpoint_type"],
            "bytes": sum(f["size"] for f in manifest["files"].values()),
            "current_checkpoint_id": manifest["vm"]["current_checkpoint_id"],
            "checkpoints": [{"id": c["id"], "name": c["name"], "parent_id": c["parent_id"],
                             "created_at": c["created_at"], "kind": c["kind"],
                             "has_memory": c["id"] in memory, "notes": c.get("notes")}
                            for c in manifest["checkpoints"]]}


def tree_lines(view: dict[str, Any], columns: int = 100) -> list[str]:
    """A stored VM's checkpoint tree as text lines within ``columns``."""
    return checkpoint_tree(view, columns) if "checkpoints" in view else []


def _describe(report: Report) -> StepReport | None:
    """Step progress for the CLI: what each journal step does, in words."""
    if report is None:
        return None

    def shown(number: int, total: int, step: Step, fraction: float) -> None:
        what = {"copy_file": "copying", "convert": "flattening a base image into",
                "write_manifest": "checksumming into", "write_file": "writing",
                "make_dir": "creating"}.get(step.op, step.op)
        report(number, total, f"{what} {Path(step.paths()[0]).name}", fraction)

    return shown

