"""A library share: a folder (any mounted file system, NFS included) that holds stored VMs.

VMM's library: "when you migrate, store, or deploy a virtual machine, any existing checkpoints
move with the virtual machine". Layout (every path in a manifest is relative to the VM's folder,
so the share can be mounted anywhere)::

    waymark-library.json            what this folder is (format, version, id)
    lock                            held by every store and deploy, so two never interleave
    vms/<vm-id>/claim.json          a store or deploy under way (which host and home runs it)
    vms/<vm-id>/files/...           every image, memory state, saved state and boot file
    vms/<vm-id>/manifest.json       the VM, its checkpoint tree and image graph, and the sha256
                                    and size of every file; written last

A VM is *stored* when its folder has a manifest and no claim. A claim says a store or deploy
is under way (or was killed and not yet settled by the host that made it): such a VM can be
neither deployed nor stored again until that host's next ``waymark`` command settles it.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from waymark import durable
from waymark.errors import (
    Ambiguous,
    Busy,
    Conflict,
    ImageError,
    InvalidInput,
    NotFound,
    StorageError,
)
from waymark.external import shares
from waymark.model import notes, timing
from waymark.qemu import tpm

FORMAT, VERSION = "waymark-library", 1
MARKER = "waymark-library.json"
VM_FORMAT = "waymark-library-vm"
MANIFEST, CLAIM, FILES = "manifest.json", "claim.json", "files"
TPM_FILE = f"{FILES}/tpm.state"  # Now's TPM state, for a VM with a TPM


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def claim_text(action: str, home: Path) -> str:
    """What a claim file says: the operation, and the host and Waymark home running it."""
    return json.dumps({"action": action, "host": socket.gethostname(), "home": str(home),
                       "at": now()}, indent=2)


# --- what a stored VM's manifest must hold -----------------------------------------------------
# The share is written by whoever can write its storage: a manifest is checked against this
# shape (types, and no field Waymark does not know: the VM's, images', disks' and checkpoints'
# fields become catalog rows) before anything reads it. Paths, ids and configurations in it are
# checked again where they are used (``store_deploy._require_safe``).

class _Shape(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class _Source(_Shape):
    host: str
    home: str
    checkpoint_dir: str


class _Vm(_Shape):
    id: str
    name: str
    state: str
    created_at: str
    config: dict[str, Any]
    checkpoint_type: str
    max_checkpoints: int
    current_checkpoint_id: str | None
    automatic_checkpoints: bool
    automatic_checkpoint_id: str | None
    origin: dict[str, Any] | None
    owner_id: str | None = None  # only a record: a deploy never takes the owner from a share


class _Image(_Shape):
    id: str
    file: str
    parent_id: str | None
    virtual_size: int
    pinned_from: str | None


class _Disk(_Shape):
    id: str
    active_image_id: str | None
    created_at: str


class _Checkpoint(_Shape):
    id: str
    name: str
    parent_id: str | None
    created_at: str
    kind: str
    requested_type: str
    fallback_reason: str | None
    config: dict[str, Any]
    memory_sha256: str | None
    memory_file: str | None
    skipped_disks: list[Any]
    pause_seconds: float | None
    freeze_seconds: float | None
    tpm_state: str | None = None  # base64 (waymark.qemu.tpm)
    notes: str | None = None  # checked as typed notes are (waymark.model.notes)


class _Frozen(_Shape):
    checkpoint_id: str
    disk_id: str
    image_id: str


class _Saved(_Shape):
    file: str
    meta: dict[str, Any]


class _File(_Shape):
    sha256: str
    size: int


class _Manifest(_Shape):
    format: str
    version: int
    stored_at: str
    source: _Source
    vm: _Vm
    images: list[_Image]
    disks: list[_Disk]
    checkpoints: list[_Checkpoint]
    frozen: list[_Frozen]
    saved: _Saved | None
    boot: dict[str, str]
    files: dict[str, _File]
    tpm: str | None = None


def _check_tpm(shape: _Manifest) -> None:
    """Now's TPM state is the one file it may be and of a TPM state's size; each checkpoint's
    is base64 of one (InvalidInput names what is wrong)."""
    now = shape.files.get(TPM_FILE)
    if shape.tpm not in (None, TPM_FILE) or (shape.tpm and (now is None or not 0 < now.size
                                                            <= tpm.MAX_STATE)):
        raise InvalidInput(f"its TPM state {shape.tpm!r} is not a checksummed {TPM_FILE}")
    for c in shape.checkpoints:
        if c.tpm_state is not None and tpm.decoded(c.tpm_state) is None:
            raise InvalidInput(f"checkpoint {c.id}'s TPM state is not one")


def _check_notes(shape: _Manifest) -> None:
    """Each checkpoint's notes are what a user could have typed, unchanged by the check
    (InvalidInput names what is wrong): a terminal or page shows them."""
    for c in shape.checkpoints:
        if c.notes is not None and notes.clean(c.notes, what=f"checkpoint {c.id}'s notes"
                                               ) != c.notes:
            raise InvalidInput(f"checkpoint {c.id}'s notes are not as Waymark writes them")


def shape_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with a stored VM's manifest's shape (None: nothing); one of another format
    or version is left to :meth:`Library.require_stored` to name."""
    if manifest.get("format") != VM_FORMAT or manifest.get("version") != VERSION:
        return None
    try:
        shape = msgspec.convert(manifest, _Manifest, strict=True)
        for when in (shape.stored_at, shape.vm.created_at, *(d.created_at for d in shape.disks),
                     *(c.created_at for c in shape.checkpoints)):
            timing.parse_rfc3339(when)  # they become the catalog's times
        _check_tpm(shape)
        _check_notes(shape)
    except msgspec.ValidationError as err:
        return str(err)
    except InvalidInput as err:
        return err.message
    return None


@dataclass(frozen=True)
class Entry:
    """One VM folder of the library: its manifest (None while incomplete or damaged: then
    ``damaged`` says what is wrong with it) and claim."""

    vm_id: str
    manifest: dict[str, Any] | None
    claim: dict[str, Any] | None
    damaged: str | None = None

    @property
    def name(self) -> str:
        return str(self.manifest["vm"]["name"]) if self.manifest else self.vm_id

    @property
    def status(self) -> str:
        """``stored``; ``storing``/``deploying`` (claimed); ``incomplete`` (neither: files a
        killed store left on a share its host could not reach when it rolled back)."""
        if self.claim is not None:
            return "storing" if self.claim.get("action") == "store" else "deploying"
        if self.damaged is not None:
            return "damaged"
        return "stored" if self.manifest is not None else "incomplete"


@dataclass(frozen=True)
class Library(shares.Share):
    """A library share: stored VMs, each with its whole checkpoint tree."""

    MARKING = shares.Marking(
        MARKER, FORMAT, VERSION, "Waymark library",
        create_hint="Create one with: waymark library init {path}",
        use_hint="Store a VM in it: waymark vm store VM --library {path}",
        busy="another store or deploy holds the library {path}.")

    # --- paths --------------------------------------------------------------------------------

    def folder(self, vm_id: str) -> Path:
        return self.root / "vms" / vm_id

    def manifest_path(self, vm_id: str) -> Path:
        return self.folder(vm_id) / MANIFEST

    def claim_path(self, vm_id: str) -> Path:
        return self.folder(vm_id) / CLAIM

    def file(self, vm_id: str, rel: str) -> Path:
        """A file a manifest names, refused if the name leads outside the VM's folder."""
        return shares.inside(self.folder(vm_id), rel, where=str(self.manifest_path(vm_id)))

    # --- reading ------------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every VM folder, by name."""
        vms = self.root / "vms"
        found = [self.entry(p.name) for p in sorted(vms.iterdir()) if p.is_dir()] \
            if vms.is_dir() else []
        return sorted(found, key=lambda e: (e.name, e.vm_id))

    def entry(self, vm_id: str) -> Entry:
        manifest, claim = _read_json(self.manifest_path(vm_id)), _read_json(self.claim_path(vm_id))
        problem = None if manifest is None else shape_problem(manifest)
        return Entry(vm_id, None if problem else manifest, claim, problem)

    def find(self, ref: str) -> Entry:
        """The VM named ``ref`` (or whose id starts with it) in the library."""
        entries = self.entries()
        named = [e for e in entries if e.manifest is not None and e.name == ref]
        matches = named or ([e for e in entries if e.vm_id.startswith(ref.lower())] if ref else [])
        if not matches:
            raise NotFound(f"the library {self.root} holds no VM named {ref!r}.",
                           hint=f"List what it holds: waymark library list --library {self.root}")
        if len(matches) > 1:
            listing = "\n".join(f"  {e.vm_id[:12]}  {e.name}" for e in matches)
            raise Ambiguous(f"{len(matches)} VMs in the library match {ref!r}:\n{listing}",
                            hint="Name one by a longer id prefix.")
        return matches[0]

    def require_stored(self, entry: Entry) -> dict[str, Any]:
        """The manifest of a VM that is stored and not claimed by a store or deploy."""
        if entry.claim is not None:
            claim = entry.claim
            raise Busy(f"VM {entry.name!r} in the library is being {entry.status[:-3]}ed by "
                       f"{claim.get('host')} (Waymark home {claim.get('home')}) since "
                       f"{claim.get('at')}.",
                       hint="Wait for it; if that command was killed, run any waymark command "
                            "on that host to settle it.")
        if entry.damaged is not None:
            raise shares.refused(str(self.manifest_path(entry.vm_id)),
                                 f"it is not a stored VM's manifest ({entry.damaged})")
        if entry.manifest is None:
            raise NotFound(f"{self.folder(entry.vm_id)} holds no complete VM (no {MANIFEST}).",
                           hint="Store the VM again.")
        if entry.manifest.get("format") != VM_FORMAT or entry.manifest.get("version") != VERSION:
            raise Conflict(f"VM {entry.name!r} was stored in an unknown format.",
                           hint="Use a Waymark version that knows it.")
        return entry.manifest

    def verify(self, vm_id: str, manifest: dict[str, Any]) -> None:
        """Every file the manifest names is there, whole and unchanged (ImageError if not)."""
        for rel, meta in sorted(manifest["files"].items()):
            path = self.file(vm_id, rel)
            if not path.is_file():
                raise ImageError(f"the library copy of {manifest['vm']['name']!r} is missing {rel}."
                                 " Nothing was deployed.",
                                 hint="Restore the file on the share, or deploy from a backup.")
            if path.stat().st_size != meta["size"] or durable.sha256(path) != meta["sha256"]:
                raise ImageError(f"{rel} of {manifest['vm']['name']!r} in the library does not "
                                 "match its checksum: the copy is damaged. Nothing was deployed.",
                                 hint="Restore the file on the share, or deploy from a backup.")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise StorageError(f"cannot read {path}: {err}.",
                           hint="Check the library share; restore the file.") from err
    return data if isinstance(data, dict) else None
