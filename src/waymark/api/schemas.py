"""The API's success bodies, as the OpenAPI document describes them (docs/api.md).

The handlers return the dicts the use cases build (what the CLI prints with ``--json``); each
route declares one of these models as its ``response_model``, which documents the body and
checks it on the way out (:class:`Route`):

- every key a use case writes is declared: a model refuses keys it does not know
  (``extra="forbid"``), so a new key is a 500 in the tests, never silently dropped; only the
  bodies that are open by nature (a VM's stored configuration, a job's parameters and result,
  the audit entry's target) are plain objects;
- keys the answer leaves out are left out (``response_model_exclude_unset``): a caller who is
  not an administrator gets no host paths (:func:`waymark.api.security.redact` removes those
  keys), so those fields are optional here;
- the keys follow one vocabulary, the CLI's ``--json`` the same (docs/api.md, "The JSON
  vocabulary"): ``<object>_id`` and ``<object>_name`` for another object, ``*_count`` for a
  count, ``<event>_at`` for a moment (RFC 3339 in UTC, whole seconds, ``Z``: the use cases
  write it so, :func:`waymark.model.timing.rfc3339`), one delete answer (:class:`Deleted`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import msgspec
from fastapi import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field


class Route(APIRoute):
    """A route whose answer is exactly the handler's dict: its ``response_model`` documents and
    checks it, and keys the dict does not have stay absent (not ``null``)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        kwargs["response_model_exclude_unset"] = True
        super().__init__(path, endpoint, **kwargs)


def listing(rows: list[dict[str, Any]]) -> Response:
    """A long listing's body, encoded at once (msgspec, in C) instead of checked row by row
    against its route's ``response_model``, which still documents it: for ``GET /api/vms``
    (1,000 VMs) that check and pydantic's encoding cost more than the catalog's queries. Its
    rows come from one read model (:func:`waymark.usecases.views.vm_list`); Schemathesis
    checks its answers against the documented model (``tests/integration/test_api_server.py``)
    and ``test_api_load.py`` every key of it."""
    return Response(msgspec.json.encode(rows), media_type="application/json")


class Body(BaseModel):
    """A success body whose keys are all declared."""

    model_config = ConfigDict(extra="forbid")


Timestamp = str  # RFC 3339 in UTC, whole seconds, as written: "2026-12-07T03:12:21Z"
HOST_PATH = "A host path: administrators only (absent for other callers)"


# --- small answers ----------------------------------------------------------------------------

class Gone(Body):
    """One thing a delete removed (:class:`waymark.model.vocabulary.Gone`)."""

    kind: str = Field(description="vm, checkpoint, user, token, profile, template, location "
                                   "or schedule")
    id: str | None = Field(description="Its id (null for what has a name only: profiles, "
                                       "templates, locations, schedules)")
    name: str


class Deleted(Body):
    """Every delete's answer: what went."""

    deleted: list[Gone]


# --- accounts ---------------------------------------------------------------------------------

class SignedIn(Body):
    user_name: str
    csrf_token: str = Field(description="Send it as X-CSRF-Token with the session's writes")


class SignedOut(Body):
    """Whose session ended."""

    id: str = Field(description="The user's id")
    name: str
    signed_out: bool


class Me(Body):
    id: str
    name: str
    role: str
    via: str = Field(description="How this request signed in: token or session")
    csrf_token: str | None
    grants: dict[str, list[str]] = Field(description="VM id (or *) -> permissions")
    templates: list[str]


class Quota(Body):
    """Ceilings per resource (memory and disk in bytes); null: not limited."""

    vms: int | None = None
    cpus: int | None = None
    memory: int | None = None
    disk: int | None = None
    checkpoints: int | None = None


class Usage(Body):
    """What a user's VMs hold (memory and disk in bytes)."""

    vms: int
    cpus: int
    memory: int
    disk: int
    checkpoints: int


class Grant(Body):
    kind: str = Field(description="vm or template")
    object: str = Field(description="The VM's id (or *), or the template's name")
    permissions: list[str]


class User(Body):
    id: str
    name: str
    role: str
    created_at: Timestamp
    grants: list[Grant]
    quota: Quota = Field(description="The ceilings that apply: their own, else their role's")
    quota_limited: bool
    usage: Usage


class PasswordChanged(Body):
    """The user whose password changed."""

    id: str
    name: str
    sessions_ended: bool
    tokens_revoked: int


class SignInFailuresForgotten(Body):
    user_name: str
    cleared_addresses: int


class Token(Body):
    id: str
    user_name: str
    name: str
    created_at: Timestamp
    last_used_at: Timestamp | None
    expires_at: Timestamp | None


class NewToken(Body):
    id: str
    user_name: str
    name: str
    token: str = Field(description="The secret: shown in this answer only")
    expires_at: Timestamp | None


class Roles(Body):
    roles: list[str]
    vm_permissions: list[str]


class AuditEntry(Body):
    id: int
    at: Timestamp
    user_name: str | None
    role: str | None
    via: str
    client: str | None
    method: str
    action: str = Field(description="METHOD and the route's template")
    target: dict[str, Any] = Field(description="The path's parameters")
    status: int
    outcome: str = Field(description="ok, denied or failed")
    message: str | None


class UserQuota(Body):
    user_name: str
    role: str
    own: Quota = Field(description="The user's own ceilings (null: their role's applies)")
    quota: Quota
    quota_limited: bool
    usage: Usage


class RoleQuota(Body):
    role: str
    quota: Quota


# --- VMs --------------------------------------------------------------------------------------

class Nic(Body):
    mac: str
    kind: str
    bridge: str | None
    forwards: list[str]


class VmDisk(Body):
    id: str
    attached: bool
    passthrough: bool
    active_image: str | None = Field(default=None, description=HOST_PATH)
    path: str | None = Field(default=None, description="A passthrough disk's device. "
                                                       + HOST_PATH)
    virtual_size: int | None = None
    allocated_bytes: int | None = None
    chain_depth: int | None = None
    base_image: str | None = Field(default=None, description=HOST_PATH)
    base_pinned: bool | None = None


class VmConsolidation(Body):
    """What keeping Now's chain shallow costs (docs/engine.md, "Consolidation")."""

    enabled: bool = Field(description="On for this VM (vm set --consolidate)")
    bytes: int = Field(description="Space its consolidation files take on disk")
    linked_disks: int = Field(description="Disks whose Now reads through one")


class Vm(Body):
    id: str
    name: str
    state: str
    created_at: Timestamp
    memory_mib: int
    cpus: int
    machine: str
    cpu_model: str = Field(description="The QEMU CPU model, pinned (a memory state restores "
                                       "only on it)")
    accel: str = Field(description="The accelerator asked for: auto, kvm or tcg")
    accelerator: str | None = Field(description="The accelerator its QEMU runs under (kvm or "
                                                "tcg); null when it does not run")
    kernel: str | None = Field(default=None, description=HOST_PATH)
    initrd: str | None = Field(default=None, description=HOST_PATH)
    append: str | None
    nics: list[Nic]
    firmware: str = Field(description="bios | uefi | uefi-secure")
    tpm: bool = Field(description="A TPM 2.0 whose state the VM owns")
    media: str | None = Field(default=None, description="The ISO in the CD drive (null: "
                                                        "empty). " + HOST_PATH)
    media_name: str | None = Field(description="The ISO's file name (null: the drive is empty)")
    boot_order: list[Literal["disk", "cdrom", "network"]] = Field(
        description="The devices the VM boots from, in order")
    checkpoint_type: str
    checkpoint_dir: str | None = Field(default=None, description=HOST_PATH)
    max_checkpoints: int | None
    automatic_checkpoints: bool | None
    automatic_checkpoint_id: str | None
    template: str | None
    profile: str | None
    settings_source: dict[str, str] = Field(description="Setting -> where it came from at "
                                                        "creation")
    current_checkpoint_id: str | None
    checkpoint_count: int
    checkpoint_space_bytes: int
    consolidation: VmConsolidation = Field(
        description="Now's chain kept consolidated (two hops whatever the number of "
                    "checkpoints) and the space that costs")
    disks: list[VmDisk]
    firmware_variables: VmDisk | None = Field(
        description="A UEFI VM's variable store: captured by checkpoints as its disks are")
    detached_disks: list[VmDisk]


class VmRow(Body):
    id: str
    name: str
    state: str
    memory_mib: int
    cpus: int
    checkpoint_type: str
    checkpoint_count: int = Field(description="How many checkpoints it has")


class SummaryDisk(Body):
    id: str
    passthrough: bool
    virtual_size: int | None = Field(description="The size the guest sees (null: a "
                                                  "passthrough device)")
    allocated_bytes: int | None = Field(description="Space its active layer uses")
    chain_depth: int | None = Field(description="Layers a read may pass through")


class VmUsage(Body):
    """What a running VM's QEMU process uses (read from /proc)."""

    cpu_percent: float = Field(description="CPU use over the last quarter second, in percent "
                                           "of one host CPU (200: two CPUs busy)")
    cpu_seconds: float = Field(description="CPU time since it started")
    rss_bytes: int = Field(description="Resident memory: guest memory touched, and QEMU's own")


class VmSummary(Body):
    """Hyper-V Manager's Summary pane (GET /api/vms/{vm}/summary)."""

    id: str
    name: str
    state: str
    memory_mib: int
    cpus: int
    firmware: Literal["bios", "uefi", "uefi-secure"]
    secure_boot: bool
    tpm: bool
    cpu_model: str
    accel: str = Field(description="The accelerator asked for: auto, kvm or tcg")
    accelerator: str | None = Field(description="The one its QEMU runs under (null: off)")
    media_name: str | None = Field(description="The ISO in the CD drive (null: empty)")
    boot_order: list[Literal["disk", "cdrom", "network"]]
    checkpoint_type: str
    checkpoint_type_source: str = Field(description="Where the checkpoint type comes from: vm "
                                        "(the VM's own), template T, profile P or default")
    checkpoint_count: int
    checkpoint_space_bytes: int
    consolidation: VmConsolidation = Field(description="What keeping Now's chain shallow "
                                                       "costs")
    current_checkpoint: str | None = Field(description="Now's parent checkpoint's name")
    disks: list[SummaryDisk]
    uptime_seconds: float | None = Field(description="Since its QEMU started (null: off)")
    usage: VmUsage | None = Field(description="Null when its QEMU does not run")


class Silence(Body):
    """A running guest that shows no sign of life (no serial output, no agent answer)."""

    seconds: float = Field(description="Since its start or its last serial output")
    message: str = Field(description="What is seen, with the accelerator in use")
    hint: str = Field(description="What to do (under KVM: vm set --accel tcg)")


class VmStatus(Body):
    """The VM as it runs (the answer of a start, and of GET /api/vms/{vm}/status)."""

    name: str
    id: str
    state: str
    serial_log: str | None = Field(default=None, description=HOST_PATH)
    pid: int | None
    accelerator: str | None
    accelerator_reason: str | None = Field(default=None, description="Why that accelerator "
                                           "(asked for, or what the KVM probe found)")
    uptime_seconds: float | None
    agent: bool
    silence: Silence | None = Field(default=None, description="Set when the running guest "
                                    "has shown no sign of life for 60 s or more")
    last_exit: dict[str, Any] | None = None
    saved_state: str | None = Field(default=None, description=HOST_PATH)


CHANGED = "False: the VM already was in that state and nothing was done (an idempotent action)."


class VmStopped(Body):
    state: str
    how: str = Field(description="How it stopped; 'already off' when it was (nothing done).")
    changed: bool = Field(description=CHANGED)


class VmSaved(Body):
    state_file: str | None = Field(default=None, description=HOST_PATH)
    sha256: str
    bytes: int
    seconds: float


class VmState(Body):
    state: str
    changed: bool = Field(description=CHANGED)


class ConsoleSent(Body):
    sent: int = Field(description="Bytes sent")


# --- checkpoints ------------------------------------------------------------------------------

class CheckpointSummary(Body):
    """What every view of a checkpoint shows (a stored VM's in a library too)."""

    id: str
    name: str
    parent_id: str | None
    created_at: Timestamp
    kind: str
    has_memory: bool
    notes: str | None = Field(description="What an administrator wrote about it (Hyper-V's "
                                          "Notes): free text, several lines, at most 4,000 "
                                          "characters, printable; null: none")


class Checkpoint(CheckpointSummary):
    requested_type: str | None
    fallback_reason: str | None
    skipped_disks: list[Any] | None
    pause_seconds: float | None
    freeze_seconds: float | None
    allocated_bytes: int
    shared_bytes: int
    chain_depth: int


class CheckpointTree(Body):
    vm_id: str
    vm_name: str
    current_checkpoint_id: str | None = Field(description="Now's parent")
    checkpoints: list[Checkpoint]


class FrozenDisk(Body):
    disk_id: str
    frozen_image: str | None = Field(default=None, description=HOST_PATH)
    virtual_size: int = Field(description="The size the guest saw")
    allocated_bytes: int
    chain_depth: int


class CheckpointDetail(Checkpoint):
    vm_id: str
    vm_name: str
    is_current: bool
    configuration: dict[str, Any] = Field(description="The VM's hardware as it was")
    media_name: str | None = Field(description="The ISO its CD drive held (null: empty)")
    memory_state: str | None = Field(default=None, description=HOST_PATH)
    disks: list[FrozenDisk]
    child_ids: list[str]


class CheckpointRenamed(CheckpointDetail):
    warnings: list[str] = Field(description="Why the new name may surprise (another checkpoint "
                                            "of the VM has it); empty when nothing does")


class Applied(Body):
    checkpoint_id: str
    state: str
    safety_checkpoint_id: str | None
    detached_disk_ids: list[str] = Field(description="Disks the VM has now and had not then: "
                                                     "detached, their files kept")
    kept_disk_ids: list[str]
    warnings: list[str] = Field(default=[], description="What was not as at the checkpoint "
                                                        "(an ISO gone: the CD drive is empty)")


class CheckpointsDeleted(Deleted):
    job_id: str = Field(description="The merge job's id (GET /api/jobs/{id})")


class ExportStarted(Body):
    job_id: str
    location: str
    folder: str


# --- backups ----------------------------------------------------------------------------------

class PointSummary(Body):
    id: str
    vm_id: str
    vm_name: str
    created_at: Timestamp
    kind: str = Field(description="full or incremental")
    parent_id: str | None = Field(description="The point it is an increment of")
    reason: str | None
    consistency: str | None
    bytes: int
    virtual_bytes: int


class BackupPoint(PointSummary):
    repository: str = Field(description="The repository's location name")


class PointVerified(Body):
    id: str
    vm_name: str | None
    problems: list[str]


class RestoredAsNew(Body):
    restored_as: Vm


class RestoredInPlace(Body):
    point_id: str
    checkpoint_id: str = Field(description="The new root checkpoint of the restored disks")
    safety_checkpoint_id: str | None


class Pruned(Body):
    removed: list[PointSummary]
    dry_run: bool


class Schedule(Body):
    name: str
    vm_ids: list[str]
    repository: str = Field(description="The repository's folder (schedules are "
                                        "administrators')")
    every: str
    at: str
    day: int | None
    full_every: int | None
    keep: dict[str, int]
    next_due_at: Timestamp
    last_run_at: Timestamp | None
    last_result: Any = None
    running: bool


# --- jobs -------------------------------------------------------------------------------------

class Job(Body):
    id: str
    kind: str
    vm_id: str | None
    vm_name: str | None
    status: str = Field(description="queued, running, completed, failed or cancelled")
    note: str | None = Field(description="Why the status may mislead: nobody runs the job "
                                         "(the next command on its VM carries it on)")
    progress: float
    step: str | None
    error: str | None
    result: Any = None
    params: Any = Field(default=None, description="Administrators only")
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    duration_seconds: float | None = Field(description="From its start to its end (null "
                                                       "until it ended)")
    user: str | None = Field(description="Who started it: a Waymark user (API, portal), or "
                                         "the host's user for the CLI (\"root (host)\"); null "
                                         "for jobs made before this was recorded")


# --- profiles, templates, locations, libraries ------------------------------------------------

class Profile(Body):
    name: str
    cpus: int | None
    memory_mib: int | None
    checkpoint_type: str | None
    max_checkpoints: int | None
    automatic_checkpoints: bool | None


class TemplateDisk(Body):
    file: str | None = None
    format: str | None = None
    source: str | None = Field(default=None, description=HOST_PATH)
    virtual_size: int | None = None
    sha256: str | None = None


class Template(Body):
    name: str
    profile: str | None
    checkpoint_type: str | None
    kernel: str | None = Field(default=None, description=HOST_PATH)
    initrd: str | None = Field(default=None, description=HOST_PATH)
    append: str | None = None
    folder: str | None = Field(default=None, description=HOST_PATH)
    disks: list[TemplateDisk]
    firmware: str = Field(description="bios | uefi | uefi-secure: of the VMs made from it")
    tpm: bool = Field(description="VMs made from it get a TPM of their own")
    vm_names: list[str] | None = Field(default=None, description="The VMs made from it "
                                                                 "(administrators)")


class Location(Body):
    name: str
    kind: str
    path: str | None = Field(default=None, description=HOST_PATH)


class LibraryCheckpoint(CheckpointSummary):
    """A checkpoint of a VM stored in a library share."""


class LibraryVm(Body):
    id: str
    name: str
    status: str = Field(description="stored, storing, deploying or incomplete")
    claim: dict[str, Any] | None
    clash: str | None = Field(description="Why it could not be deployed here now")
    state: str | None = None
    stored_at: Timestamp | None = None
    source: dict[str, Any] | None = None
    checkpoint_type: str | None = None
    bytes: int | None = None
    current_checkpoint_id: str | None = None
    checkpoints: list[LibraryCheckpoint] | None = None


class Library(Body):
    library: str
    id: str
    vms: list[LibraryVm]


class Stored(Body):
    vm_name: str
    vm_id: str
    library: str
    checkpoint_count: int
    files: int
    bytes: int


class Deployed(Body):
    vm_name: str
    vm_id: str
    library: str
    state: str
    checkpoint_count: int


# --- event streams ----------------------------------------------------------------------------

EVENT_STREAM: dict[int | str, dict[str, Any]] = {200: {
    "description": "Server-sent events (docs/api.md, \"Event streams\")",
    "content": {"text/event-stream": {"schema": {  # (before OpenAPI 3.2: each event)
        "type": "object", "required": ["event", "data"],
        "properties": {"event": {"type": "string", "description": "The event's kind"},
                       "data": {"type": "string", "description": "Its JSON document"},
                       "id": {"type": "string"}, "retry": {"type": "integer"}}}}}}}
