"""The catalog's tables (SQLAlchemy 2, portable SQL: SQLite now, PostgreSQL later).

Two layers are stored apart (docs/engine.md, "Two layers"):

- the checkpoint tree: ``vms`` (with ``current_checkpoint_id``: Now's parent), ``checkpoints``;
- the image graph: ``images`` (one row per qcow2/raw file, ``parent_id`` = backing file),
  ``disks`` (each disk's active image) and ``frozen_images`` (per checkpoint and disk, the
  image that was active when it was taken).

``intents`` is the journal: an operation's file steps are written here before any file changes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    event,
    false,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Vm(Base):
    __tablename__ = "vms"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Names are unique per owner, not host-wide (Hyper-V does not make them unique at all): a
    # self-service user's new name never clashes with, so never reveals, a VM they may not
    # see. A name is a reference only after an exact id (waymark.engine.lookup.vm).
    name: Mapped[str] = mapped_column(String(99), index=True)
    # "<owner id>/<name>" ("/<name>" when no user owns it): the rule above, kept by an event
    name_key: Mapped[str] = mapped_column(String(132), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(String(16), default="off")
    # hardware configuration (waymark.model.hardware.HardwareConfig as JSON); restored by apply
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    checkpoint_type: Mapped[str] = mapped_column(String(16))
    checkpoint_dir: Mapped[str] = mapped_column(Text)
    max_checkpoints: Mapped[int] = mapped_column(Integer)
    # Now's parent; no foreign key (checkpoints also point at vms)
    current_checkpoint_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Hyper-V's AutomaticCheckpointsEnabled: a checkpoint at each start, deleted after a clean
    # shutdown; the one taken at the last start (no foreign key: it may be deleted by hand)
    automatic_checkpoints: Mapped[bool] = mapped_column(Boolean, default=False)
    automatic_checkpoint_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # where its settings came from at creation (waymark.model.setting_sources): {"template",
    # "profile",
    # "sources": {setting: "vm" | "profile P" | "template T" | "default"}}; None: before 0007
    origin: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # the user who created it through the API (a self-service user's own VM); None: an
    # administrator's or the CLI's (no foreign key: users may be removed)
    owner_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    # whether Now's chain is kept consolidated (waymark.engine.consolidation); an
    # administrator turns it off per VM (``vm set --consolidate off``)
    consolidation: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())


def name_key(owner_id: str | None, name: str) -> str:
    return f"{owner_id or ''}/{name}"


@event.listens_for(Vm, "before_insert")
@event.listens_for(Vm, "before_update")
def _keep_name_key(_mapper: Any, _connection: Any, row: Vm) -> None:
    row.name_key = name_key(row.owner_id, row.name)


class Image(Base):
    __tablename__ = "images"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"), index=True)
    # not unique: several VMs may pin one base file
    path: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(8))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("images.id"), nullable=True)
    # a file the user brought: never written, merged into, moved or deleted
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    virtual_size: Mapped[int] = mapped_column(BigInteger)
    # for a pinned image: the length of its own backing chain (the user's files below it)
    chain_length: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Disk(Base):
    __tablename__ = "disks"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"), index=True)
    # the writable leaf the VM uses now; None for a pass-through disk
    active_image_id: Mapped[str | None] = mapped_column(ForeignKey("images.id"), nullable=True)
    passthrough_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"), index=True)
    name: Mapped[str] = mapped_column(String(99))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(16))
    requested_type: Mapped[str] = mapped_column(String(16))
    fallback_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    memory_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    memory_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    skipped_disks: Mapped[list[Any]] = mapped_column(JSON)
    # a live standard checkpoint: the guest's CPUs stopped (QMP STOP to RESUME)
    pause_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # a live production checkpoint: the guest's file systems frozen (freeze to thaw)
    freeze_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the VM's TPM state at the checkpoint's instant (base64 of swtpm's state file; None: no
    # TPM); loaded only when asked for (waymark.qemu.tpm)
    tpm_state: Mapped[str | None] = mapped_column(Text, nullable=True, deferred=True)
    # what an administrator wrote about it (Hyper-V's Notes); None: nothing
    notes: Mapped[str | None] = mapped_column(Text, nullable=True)


class FrozenImage(Base):
    __tablename__ = "frozen_images"

    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id"), primary_key=True)
    disk_id: Mapped[str] = mapped_column(ForeignKey("disks.id"), primary_key=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id"), index=True)


class Consolidation(Base):
    """A disk's consolidation (:mod:`waymark.engine.consolidation`): ``path``, a qcow2 with no
    backing file whose content is the view of the frozen image ``image_id``; while ``linked``,
    the disk's active image (whose catalog parent is that image) names it as its backing file.
    No part of the image graph: the planner never sees it. ``bytes``: what it takes on disk."""

    __tablename__ = "consolidations"

    disk_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    vm_id: Mapped[str] = mapped_column(String(32), index=True)
    path: Mapped[str] = mapped_column(Text)
    image_id: Mapped[str] = mapped_column(String(32))
    linked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Intent(Base):
    __tablename__ = "intents"
    # ids are never reused, even after a VM's history is deleted
    __table_args__ = {"sqlite_autoincrement": True}  # noqa: RUF012

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vm_id: Mapped[str] = mapped_column(String(32), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    steps: Mapped[list[Any]] = mapped_column(JSON)
    next_step: Mapped[int] = mapped_column(Integer, default=0)
    # prepare: rolled back if it did not commit; finish: driven to its end (engine/journal.py)
    shape: Mapped[str] = mapped_column(String(8), server_default="prepare")
    # pending -> committed | rolled_back
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Job(Base):
    """A long operation (a merge, an export) with its progress; see :mod:`waymark.engine.jobs`."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    vm_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    # queued -> running -> completed | failed | cancelled
    status: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[str | None] = mapped_column(Text, nullable=True)
    # the process running it, and that process's start time (a recycled pid is not it)
    worker_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    worker_start: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # the Waymark user who started it (API/portal), or the host's user for the CLI; None: older
    user: Mapped[str | None] = mapped_column(String(99), nullable=True)


class Schedule(Base):
    """A backup schedule (:mod:`waymark.usecases.backups.schedules`)."""

    __tablename__ = "schedules"

    name: Mapped[str] = mapped_column(String(99), primary_key=True)
    vms: Mapped[list[Any]] = mapped_column(JSON)  # VM ids
    repo: Mapped[str] = mapped_column(Text)
    every: Mapped[str] = mapped_column(String(8))  # daily | weekly | monthly
    at: Mapped[str] = mapped_column(String(5))  # HH:MM, the host's local time
    day: Mapped[int | None] = mapped_column(Integer, nullable=True)  # weekday 0-6 | 1-28
    full_every: Mapped[int | None] = mapped_column(Integer, nullable=True)
    keep: Mapped[dict[str, Any]] = mapped_column(JSON)  # retention after each run
    next_due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # the process running it now (pid, start time): a claim that dies with its process
    claimed_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    claimed_start: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BackupBase(Base):
    """What a VM's change-tracking bitmaps for one backup repository count from
    (:mod:`waymark.usecases.backups.points`): the point they were cleared at, or None while a run
    that
    cleared them has not finished (its next backup is then full)."""

    __tablename__ = "backup_bases"

    vm_id: Mapped[str] = mapped_column(String(32), ForeignKey("vms.id", ondelete="CASCADE"),
                                       primary_key=True)
    repo_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    point_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Profile(Base):
    """A hardware profile (VMM's ``New-SCHardwareProfile``): settings copied into the VMs
    created with it (:mod:`waymark.model.setting_sources`); None = not set by this profile."""

    __tablename__ = "profiles"

    name: Mapped[str] = mapped_column(String(99), primary_key=True)
    cpus: Mapped[int | None] = mapped_column(Integer, nullable=True)
    memory_mib: Mapped[int | None] = mapped_column(Integer, nullable=True)
    checkpoint_type: Mapped[str | None] = mapped_column(String(16), nullable=True)
    max_checkpoints: Mapped[int | None] = mapped_column(Integer, nullable=True)
    automatic_checkpoints: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Template(Base):
    """A VM template (VMM's ``New-SCVMTemplate``): a profile, boot files and read-only disk
    images in ``folder`` (``disks``: file, format, virtual_size, sha256 each)."""

    __tablename__ = "templates"

    name: Mapped[str] = mapped_column(String(99), primary_key=True)
    profile_name: Mapped[str | None] = mapped_column(ForeignKey("profiles.name"), nullable=True)
    checkpoint_type: Mapped[str | None] = mapped_column(String(16), nullable=True)
    kernel: Mapped[str | None] = mapped_column(Text, nullable=True)
    initrd: Mapped[str | None] = mapped_column(Text, nullable=True)
    append: Mapped[str | None] = mapped_column(Text, nullable=True)
    folder: Mapped[str] = mapped_column(Text)
    disks: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # the platform of VMs made from it (None: bios, no TPM); each VM gets its own new variable
    # store and TPM, never a copy of another machine's
    firmware: Mapped[str | None] = mapped_column(String(16), nullable=True)
    tpm: Mapped[bool | None] = mapped_column(Boolean, nullable=True)


class StoredVm(Base):
    """A VM this host stored in a library (:mod:`waymark.usecases.library.store_deploy`): it is no
    longer here,
    and commands that name it say where it went."""

    __tablename__ = "stored_vms"

    vm_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(99), index=True)
    library: Mapped[str] = mapped_column(Text)
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # its owner when it was stored (None: the administrators'); a deploy gives it back from here
    owner_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class User(Base):
    """A person or script using the API (:mod:`waymark.auth`): one role, a password hash
    (argon2id), grants for the VMs and templates in their scope."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    password_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Grant(Base):
    """What a user may do to one VM (or every VM: ``object_id`` ``*``) or which template they
    may create VMs from (``permissions`` empty)."""

    __tablename__ = "grants"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"),
                                         primary_key=True)
    object_kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # vm | template
    object_id: Mapped[str] = mapped_column(String(99), primary_key=True)
    permissions: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiToken(Base):
    """A script's credential: ``wm_<id>_<secret>``, shown once; only the secret's sha256 is
    kept (it is random, 256 bits: a slow hash adds nothing). It stops working at
    ``expires_at`` (none: when revoked), and when its user's password changes."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(99))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class WebSession(Base):
    """A signed-in browser: the cookie's sha256 (the cookie itself is never stored) and the
    CSRF token its writes must carry."""

    __tablename__ = "web_sessions"

    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Location(Base):
    """A folder an administrator registered under a name (a backup repository, an export
    folder, a library share), so API users choose names, never host paths."""

    __tablename__ = "locations"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # repository | export | library | media
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    """Who did what to which object, when, from where, and the result: every API request that
    changes something and every refused one (:mod:`waymark.usecases.access.audit`)."""

    __tablename__ = "audit"
    __table_args__ = {"sqlite_autoincrement": True}  # noqa: RUF012

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    user: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    role: Mapped[str | None] = mapped_column(String(20), nullable=True)
    via: Mapped[str] = mapped_column(String(16))  # token | session | password | none
    client: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method: Mapped[str] = mapped_column(String(8))
    action: Mapped[str] = mapped_column(Text)  # the route: "POST /api/vms/{vm}/checkpoints"
    target: Mapped[dict[str, Any]] = mapped_column(JSON)  # the path's parameters
    status: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(8))  # ok | denied | failed
    message: Mapped[str | None] = mapped_column(Text, nullable=True)


class Quota(Base):
    """Ceilings on what a user's VMs hold (SCVMM's user-role quotas,
    :mod:`waymark.usecases.access.quotas`):
    one user's (``kind`` user, ``subject`` their id) or a role's default (``kind`` role,
    ``subject`` the role); None = not limited here (a user's: the role's default applies)."""

    __tablename__ = "quotas"

    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    subject: Mapped[str] = mapped_column(String(64), primary_key=True)
    vms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cpus: Mapped[int | None] = mapped_column(Integer, nullable=True)
    memory: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # bytes
    disk: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # bytes, virtual sizes
    checkpoints: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
