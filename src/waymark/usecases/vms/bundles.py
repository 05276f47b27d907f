"""Export a checkpoint as a standalone VM bundle, and import a bundle as a new VM.

A bundle is a folder (Hyper-V's Export-VMSnapshot)::

    manifest.json         what is in it, with the sha256 of every other file (written last);
                          its ``source`` names the VM and checkpoint, with the checkpoint's
                          notes (``checkpoint_notes``), which ``vm import`` shows
    configuration.json    the VM's hardware as the checkpoint recorded it
    disks/disk<N>.qcow2   each disk flattened to one standalone qcow2 (no backing file)
    memory.state          the memory state, for a checkpoint that holds one
    boot/<key>            the files the VM needs beyond its disks (kernel, initrd), named by
                          the manifest's ``vm_files`` (:mod:`waymark.external.vm_files`)
    tpm.state             the TPM's state at the checkpoint, for a VM with a TPM

A UEFI VM's variable store is one of its disks (``configuration.json`` names which).

A bundle without a manifest is incomplete (an export was interrupted) and is refused, as is one
whose files do not match their checksums: import verifies everything before it changes anything.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from waymark import durable, modes
from waymark.catalog.models import Vm
from waymark.engine import lookup
from waymark.engine.context import Context
from waymark.engine.steps import CopyFile, Step, WriteFile
from waymark.errors import Conflict, ImageError, InvalidInput, NotFound
from waymark.external import shares, vm_files
from waymark.images import qemu_img
from waymark.model import names, notes
from waymark.model.hardware import HardwareConfig
from waymark.qemu import tpm
from waymark.usecases.vms import definitions as vms

FORMAT, VERSION = "waymark-bundle", 1
TPM_FILE = "tpm.state"  # the checkpoint's TPM state, when the VM has a TPM
MANIFEST = "manifest.json"
BOOT = "boot"  # the folder of the files the VM needs beyond its disks


def remove_partial(dest: Path) -> None:
    """Remove the files an interrupted export wrote into ``dest`` (only the bundle's own names:
    the folder was empty when the export began), so it can be redone."""
    if not dest.is_dir() or (dest / MANIFEST).exists():
        return
    shares.no_links(dest, what="export bundle")  # a planted link would lead the removal out
    for path in [*(dest / "disks").glob("disk*.qcow2"), dest / "memory.state",
                 dest / TPM_FILE, dest / "configuration.json", *(dest / BOOT).glob("*"),
                 *(dest / BOOT).glob(".*")]:
        durable.remove(path)
        durable.remove(durable.temp_path(path))
    for folder in (dest / "disks", dest / BOOT):
        with contextlib.suppress(OSError):
            folder.rmdir()


def require_empty(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise Conflict(f"{dest} exists and is not an empty folder.",
                       hint="Give a new or empty folder to export into.")


def _empty_destination(dest: Path) -> None:
    require_empty(dest)
    dest.mkdir(parents=True, exist_ok=True)
    modes.tighten(dest)  # an empty folder given to us may be open to all


def export(ctx: Context, vm_id: str, ckpt_ref: str, dest: Path,
           on_progress: qemu_img.Progress = None) -> dict[str, Any]:
    """Write checkpoint ``ckpt_ref`` of ``vm_id`` as a bundle in ``dest``; returns the manifest."""
    with ctx.locked(vm_id) as (_, vm_name), ctx.catalog.session() as session:
        vm_row = session.get_one(Vm, vm_id)
        row = lookup.checkpoint(session, vm_row, ckpt_ref)
        images, frozen = lookup.images(session, vm_id), lookup.frozen(session, row.id)
        _empty_destination(dest)
        (dest / "disks").mkdir()
        hardware = HardwareConfig.load(row.config)
        disks, keys = [], {}
        for number, disk_id in enumerate(d for d in hardware.disks if d in frozen):
            image = images[frozen[disk_id]]
            key, rel = f"disk{number}", f"disks/disk{number}.qcow2"
            qemu_img.convert(Path(image.path), image.format, dest / rel,
                             on_progress=on_progress)
            durable.fsync_file(dest / rel)
            disks.append({"key": key, "file": rel, "virtual_size": image.virtual_size})
            keys[disk_id] = key
        if row.memory_path:
            shutil.copyfile(row.memory_path, dest / "memory.state")
            durable.fsync_file(dest / "memory.state")
        if row.tpm_state is not None:
            durable.write_bytes(dest / TPM_FILE, base64.b64decode(row.tpm_state))
        carried = vm_files.carry(vm_files.named(hardware), dest / BOOT, dest)
        hardware.rekeyed(keys)
        durable.write_bytes(dest / "configuration.json",
                            json.dumps(hardware.dump(), indent=2).encode())
        manifest = {
            "format": FORMAT, "version": VERSION,
            "exported_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "source": {"vm_id": vm_id, "vm_name": vm_name, "checkpoint_id": row.id,
                       "checkpoint_name": row.name, "kind": row.kind,
                       "checkpoint_notes": row.notes},
            "vm": {"name": vm_name, "checkpoint_type": vm_row.checkpoint_type,
                   "max_checkpoints": vm_row.max_checkpoints},
            "disks": disks, "skipped_disks": row.skipped_disks,
            "memory": "memory.state" if row.memory_path else None, "vm_files": carried,
            "tpm": TPM_FILE if row.tpm_state is not None else None,
            "files": {str(p.relative_to(dest)): durable.sha256(p)
                      for p in sorted(dest.rglob("*")) if p.is_file()},
        }
    durable.write_bytes(dest / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


def read_bundle(bundle: Path) -> dict[str, Any]:
    """The manifest of a complete, intact bundle; ImageError names any damage."""
    manifest_path = bundle / MANIFEST
    if not manifest_path.is_file():
        raise NotFound(f"{bundle} is not a complete Waymark bundle (no {MANIFEST}).",
                       hint="Export the checkpoint again: waymark checkpoint export VM CKPT DIR")
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except ValueError as err:
        raise ImageError(f"{manifest_path} is not valid JSON: {err}") from err
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ImageError(f"{bundle} is not a version {VERSION} Waymark bundle.")
    try:
        _check_files(bundle, manifest, str(manifest_path))
    except (KeyError, TypeError, AttributeError) as err:
        raise shares.refused(str(manifest_path), f"it is not a bundle manifest ({err!r} is "
                                                 "wrong)") from err
    return manifest


def _check_files(bundle: Path, manifest: dict[str, Any], where: str) -> None:
    """Every file the manifest names is inside the bundle and matches its checksum; each disk
    is a qcow2 file that stands alone (read from its header: nothing it names is opened)."""
    for rel, digest in manifest["files"].items():
        path = shares.inside(bundle, rel, where=where)
        if not path.is_file():
            raise ImageError(f"the bundle is missing {rel}.", hint="Export it again.")
        if durable.sha256(path) != digest:
            raise ImageError(f"{rel} in {bundle} does not match its checksum: the bundle is "
                             "damaged. Nothing was imported.", hint="Export it again.")
    for disk in manifest["disks"]:
        if disk["file"] not in manifest["files"]:
            raise ImageError(f"the bundle's disk {disk['file']} has no checksum.")
        shares.image_chain(bundle, shares.inside(bundle, disk["file"], where=where),
                           where=str(bundle / disk["file"]), backing="none")
    if manifest.get("memory") is not None and manifest["memory"] not in manifest["files"]:
        raise ImageError(f"the bundle's memory state {manifest['memory']} has no checksum.")
    if manifest.get("tpm") not in (None, TPM_FILE) or (
            manifest.get("tpm") is not None and TPM_FILE not in manifest["files"]):
        raise ImageError(f"the bundle's TPM state {manifest.get('tpm')!r} is not its "
                         f"checksummed {TPM_FILE}.", hint="Export it again.")
    if found := vm_files.problems(carried(bundle, manifest, where), bundle):
        raise ImageError(f"{bundle} is damaged: {'; '.join(found)}. Nothing was imported.",
                         hint="Export it again.")


def carried(bundle: Path, manifest: dict[str, Any], where: str) -> list[vm_files.Carried]:
    """The files the bundle carries beyond its disks, each inside its ``boot`` folder."""
    return vm_files.read(manifest.get("vm_files"), bundle / BOOT, base=bundle, where=where)


def source_notes(bundle: Path, manifest: dict[str, Any]) -> str | None:
    """The exported checkpoint's notes, checked as typed notes are (a bundle is outside
    storage, and a terminal shows them): ImageError when they are not what Waymark writes."""
    source = manifest.get("source")
    given = source.get("checkpoint_notes") if isinstance(source, dict) else None
    if given is None:
        return None
    try:
        if isinstance(given, str) and notes.clean(given) == given:
            return given
        problem = "they are not as Waymark writes them"
    except InvalidInput as err:
        problem = err.message
    raise ImageError(f"{bundle / MANIFEST}: the exported checkpoint's notes are refused "
                     f"({problem}). Nothing was imported.", hint="Export it again.")


@dataclass(frozen=True)
class Imported:
    """A VM made from a bundle: its id, and the exported checkpoint's notes (the new VM has no
    checkpoint to hold them: ``vm import`` shows them)."""

    vm_id: str
    checkpoint_notes: str | None


def _tpm_state(bundle: Path, manifest: dict[str, Any]) -> bytes | None:
    """The TPM state a (verified) bundle holds, or None; ImageError if it cannot be one."""
    if manifest.get("tpm") is None:
        return None
    state = (bundle / TPM_FILE).read_bytes()
    if not tpm.fits(state):
        raise ImageError(f"{bundle / TPM_FILE} is not a TPM state ({len(state)} bytes).",
                         hint="Export it again.")
    return state


def _saved_state_steps(ctx: Context, vm_id: str, bundle: Path, manifest: dict[str, Any],
                       hardware: dict[str, Any]) -> list[Step]:
    saved = ctx.vm_folder(vm_id) / "saved"
    meta = {"sha256": manifest["files"][manifest["memory"]], "hardware": hardware,
            "imported_from": manifest["source"]}
    return [CopyFile(src=str(bundle / manifest["memory"]), path=str(saved / "state.bin"),
                     confined_to=str(bundle)),
            WriteFile(path=str(saved / "saved.json"), text=json.dumps(meta, indent=2))]


def import_bundle(ctx: Context, bundle: Path, name: str | None = None,
                  on_progress: qemu_img.Progress = None) -> Imported:
    """A new VM (new id, new file names) from a verified bundle."""
    name = names.clean(name, what="VM name") if name is not None else None  # before reading
    manifest = read_bundle(bundle)
    exported = source_notes(bundle, manifest)
    config = bundle / "configuration.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise ImageError(f"cannot read {config}: {err}.", hint="Export it again.") from err
    boot = carried(bundle, manifest, str(bundle / MANIFEST))
    hardware = vms.untrusted_hardware(ctx, data, vm_id=None, where=str(config), carried=boot)
    copies = [vms.Copy(d["key"], bundle / d["file"], "qcow2", d["virtual_size"],
                       confined_to=bundle)
              for d in manifest["disks"]]

    def memory(vm_id: str, dumped: dict[str, Any]) -> list[Step]:
        if not manifest.get("memory"):
            return []
        return _saved_state_steps(ctx, vm_id, bundle, manifest, dumped)

    vm_id = vms.create_from_copies(
        ctx, name or manifest["vm"]["name"], hardware, copies, manifest["vm"], memory,
        on_progress, rename_hint="Import under another name with --name NEW_NAME.",
        carried=boot, tpm_state=_tpm_state(bundle, manifest))
    return Imported(vm_id, exported)
