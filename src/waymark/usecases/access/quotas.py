"""Quotas: how much a user's VMs may hold, after SCVMM's user-role quotas.

An administrator sets a user's ceilings on their VMs' number, vCPUs, memory, disk (the virtual
sizes of the VMs' disks) and checkpoints (``waymark user quota``, ``PUT
/api/users/{name}/quota``), and a role's defaults (``--role``, ``PUT /api/roles/{role}/quota``)
for what a user's own quota leaves unset; unset everywhere is unlimited. What counts is what the
user *owns*: the VMs they created through the API (``vms.owner_id``) with their checkpoints,
whoever makes the change.

A change that raises usage (a VM created, its vCPUs or memory raised, a checkpoint taken,
whether by hand, before an apply or a restore, or at an automatic start; a checkpoint applied or
a backup point restored in place, which bring back their own vCPUs, memory and disks) is checked
under the owner's quota lock, which is held until the change commits: parallel requests never
pass a quota together. A change that lowers usage is always allowed, even above a quota lowered
since.

Administrators are not limited: neither the VMs they own nor their changes to others' VMs. The
API names who acts per request (:func:`request`, :func:`acting`); outside a request (the CLI,
the scheduler) the host's administrator acts. Memory beyond the host's (``MemTotal``) is refused
for everyone, administrators too, when a VM is created or its memory changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from waymark.catalog.models import Checkpoint, Disk, Image, Quota, User, Vm
from waymark.engine import locks
from waymark.engine.context import Context
from waymark.engine.journal import now
from waymark.errors import InvalidInput, NotFound, QuotaExceeded
from waymark.model import policy
from waymark.model.hardware import HardwareConfig
from waymark.model.policy import Principal
from waymark.model.units import human

MEMINFO = Path("/proc/meminfo")
SIZES = frozenset({"memory", "disk"})  # in bytes; the rest are counts
LABELS = {"vms": "VMs", "cpus": "vCPUs", "memory": "memory", "disk": "disk",
          "checkpoints": "checkpoints"}
OPTIONS = {"vms": "--vms", "cpus": "--cpus", "memory": "--memory", "disk": "--disk",
           "checkpoints": "--checkpoints"}


@dataclass(frozen=True)
class Usage:
    """What a user's VMs hold, or what a change adds to it (memory and disk in bytes)."""

    vms: int = 0
    cpus: int = 0
    memory: int = 0
    disk: int = 0
    checkpoints: int = 0


RESOURCES = tuple(f.name for f in fields(Usage))
Limits = dict[str, int | None]  # resource -> ceiling; None: not limited


# --- who acts ---------------------------------------------------------------------------------

@dataclass
class Acting:
    """Who makes an API request's changes: unknown (limited like any user) until the request is
    authenticated."""

    who: Principal | None = None


_ACTING: ContextVar[Acting | None] = ContextVar("waymark_quota_acting", default=None)


@contextmanager
def request() -> Iterator[Acting]:
    """One API request: its changes are limited unless :func:`acting` names an administrator
    (the request's threads share the returned holder)."""
    current = Acting()
    token = _ACTING.set(current)
    try:
        yield current
    finally:
        _ACTING.reset(token)


def acting(who: Principal) -> None:
    """The current request is made by ``who`` (outside a request: nothing to record)."""
    current = _ACTING.get()
    if current is not None:
        current.who = who


def _exempt() -> bool:
    current = _ACTING.get()
    if current is None:  # the CLI or the scheduler: the host's administrator
        return True
    return current.who is not None and current.who.admin


# --- the host's memory ------------------------------------------------------------------------

def host_memory() -> int | None:
    """The host's memory in bytes (``MemTotal``), or None when it cannot be read."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_memory(memory: int) -> None:
    """Refuse more memory than the host has (administrators too: QEMU could not start it)."""
    total = host_memory()
    if total is not None and memory > total:
        raise InvalidInput(f"memory of {human(memory)} is more than this host has "
                           f"({human(total)}).",
                           hint=f"Give at most {total >> 30 or 1}G (--memory, or \"memory\").")


# --- usage and limits -------------------------------------------------------------------------

def usage(session: Session, owner_id: str) -> Usage:
    """What the VMs ``owner_id`` owns hold now."""
    configs = [HardwareConfig.load(c) for c in
               session.scalars(select(Vm.config).where(Vm.owner_id == owner_id))]
    owned = select(Vm.id).where(Vm.owner_id == owner_id)
    disk = session.scalar(select(func.coalesce(func.sum(Image.virtual_size), 0))
                          .join(Disk, Disk.active_image_id == Image.id)
                          .where(Disk.vm_id.in_(owned)))
    checkpoints = session.scalar(select(func.count()).select_from(Checkpoint)
                                 .where(Checkpoint.vm_id.in_(owned)))
    return Usage(vms=len(configs), cpus=sum(c.cpus for c in configs),
                 memory=sum(c.memory_mib << 20 for c in configs), disk=int(disk or 0),
                 checkpoints=int(checkpoints or 0))


def _row(session: Session, kind: str, subject: str) -> Quota | None:
    return session.get(Quota, (kind, subject))


def _values(row: Quota | None) -> Limits:
    return {r: getattr(row, r) if row is not None else None for r in RESOURCES}


def limits(session: Session, user: User) -> Limits:
    """The user's ceilings: their own, else their role's default; None: not limited."""
    own = _values(_row(session, "user", user.id))
    default = _values(_row(session, "role", user.role))
    return {r: own[r] if own[r] is not None else default[r] for r in RESOURCES}


def view(session: Session, user: User) -> dict[str, Any]:
    """A user's quota, its role's defaults, and what their VMs hold."""
    return {"quota": limits(session, user),
            "quota_limited": user.role != "administrator",
            "usage": asdict(usage(session, user.id))}


def _shown(resource: str, value: int) -> str:
    return human(value) if resource in SIZES else str(value)


def _check(session: Session, owner_id: str, adds: Usage) -> None:
    user = session.get(User, owner_id)
    if user is None or user.role == "administrator":
        return
    ceilings, used = limits(session, user), usage(session, owner_id)
    for resource in RESOURCES:
        more, ceiling = getattr(adds, resource), ceilings[resource]
        if more <= 0 or ceiling is None or getattr(used, resource) + more <= ceiling:
            continue
        held = getattr(used, resource)
        raise QuotaExceeded(
            f"{user.name}'s quota of {_shown(resource, ceiling)} {LABELS[resource]} would be "
            f"exceeded: their VMs hold {_shown(resource, held)}, and this asks for "
            f"{_shown(resource, more)} more.",
            hint="Free some (delete a VM or checkpoints, or lower a VM's settings), or ask an "
                 f"administrator to raise it: waymark user quota {user.name} "
                 f"{OPTIONS[resource]} ...")


# How long a change waits for the owner's other changes that hold the quota lock (a VM being
# made from a template holds it for the copy): they are the owner's own requests, so waiting is
# the answer they expect, where a VM's lock gives up after 2 s in the API.
QUOTA_WAIT = 30.0


@contextmanager
def admitted(ctx: Context, owner_id: str | None, adds: Usage) -> Iterator[None]:
    """Check that ``adds`` keeps ``owner_id``'s VMs within their quota, and hold their quota
    lock until the body (which commits the change) ends."""
    with ExitStack() as stack:
        if owner_id is not None and not _exempt() and any(
                getattr(adds, r) > 0 for r in RESOURCES):
            stack.enter_context(locks.held(ctx.home, f"quota-{owner_id}",
                                           timeout=max(ctx.settings.lock_timeout, QUOTA_WAIT),
                                           label="the quota of this VM's owner"))
            with ctx.catalog.session() as session:
                _check(session, owner_id, adds)
        yield


# --- the changes that raise usage -------------------------------------------------------------

def vm_created(ctx: Context, owner_id: str | None, hardware: HardwareConfig,
               disks: list[dict[str, Any]], images: list[dict[str, Any]]
               ) -> AbstractContextManager[None]:
    """Around the commit of a new VM (:func:`waymark.usecases.vms.definitions.create`): its memory
    fits the
    host, and it fits its owner's quota (``disks`` and ``images``: its new catalog rows)."""
    memory = hardware.memory_mib << 20
    check_host_memory(memory)
    active = {d["active_image_id"] for d in disks}
    disk = sum(int(i["virtual_size"]) for i in images if i["id"] in active)
    return admitted(ctx, owner_id, Usage(vms=1, cpus=hardware.cpus, memory=memory, disk=disk))


def vm_resized(ctx: Context, vm_id: str, *, cpus: int | None, memory: int | None
               ) -> AbstractContextManager[None]:
    """Around the commit of new vCPUs or memory (bytes) for the VM (held locked)."""
    if memory is not None:
        check_host_memory(memory)
    with ctx.catalog.session() as session:
        row = session.get_one(Vm, vm_id)
        hardware, owner_id = HardwareConfig.load(row.config), row.owner_id
    adds = Usage(cpus=0 if cpus is None else cpus - hardware.cpus,
                 memory=0 if memory is None else memory - (hardware.memory_mib << 20))
    return admitted(ctx, owner_id, adds)


def checkpoint_added(ctx: Context, vm_id: str) -> AbstractContextManager[None]:
    """Around the commit of a new checkpoint of the VM (held locked)."""
    with ctx.catalog.session() as session:
        owner_id = session.get_one(Vm, vm_id).owner_id
    return admitted(ctx, owner_id, Usage(checkpoints=1))


@dataclass(frozen=True)
class Change:
    """What a change will add to its VM's owner's usage, worked out before it starts."""

    owner_id: str | None
    adds: Usage

    def admitted(self, ctx: Context) -> AbstractContextManager[None]:
        """Around the change's commit: checked, and the quota lock held until it commits."""
        return admitted(ctx, self.owner_id, self.adds)

    def check_before(self, ctx: Context, *, safety_checkpoint: bool) -> None:
        """Refuse before anything changes (with the safety checkpoint a ``checkpoint_first``
        mode takes first); the check in :meth:`admitted` stays the one that counts."""
        adds = replace(self.adds, checkpoints=self.adds.checkpoints + int(safety_checkpoint))
        with admitted(ctx, self.owner_id, adds):
            pass


def hardware_replaced(session: Session, vm_row: Vm, then_hw: HardwareConfig,
                      disks: Mapping[str, int], *, kept: Iterable[str] = (),
                      checkpoints: int = 0) -> Change:
    """A checkpoint applied or a backup point restored in place: the VM's configuration becomes
    ``then_hw`` and each disk in ``disks`` gets a new active image of that virtual size; the
    disks in ``kept`` also keep their current image (as detached disks), and ``checkpoints``
    are added. Only the growth against what the VM holds now counts: lowering is free."""
    now_hw = HardwareConfig.load(vm_row.config)
    active = {d.id: session.get(Image, d.active_image_id) if d.active_image_id else None
              for d in session.scalars(select(Disk).where(Disk.vm_id == vm_row.id))}
    current = {d: image.virtual_size if image is not None else 0 for d, image in active.items()}
    replaced = sum(current.get(d, 0) for d in disks) - sum(current.get(d, 0) for d in kept)
    return Change(vm_row.owner_id, Usage(
        cpus=then_hw.cpus - now_hw.cpus,
        memory=(then_hw.memory_mib - now_hw.memory_mib) << 20,
        disk=sum(disks.values()) - replaced, checkpoints=checkpoints))


# --- setting quotas ---------------------------------------------------------------------------

def _subject(session: Session, user: str | None, role: str | None) -> tuple[str, str, User | None]:
    """(kind, subject, the user) for a user's name or a role."""
    if (user is None) == (role is None):
        raise InvalidInput("a quota belongs to one user or one role (its default).",
                           hint="Name a user (waymark user quota NAME ...) or a role "
                                "(--role ROLE).")
    if role is not None:
        if role not in policy.ROLES:
            raise InvalidInput(f"unknown role {role!r}.",
                               hint=f"Use one of: {', '.join(policy.ROLES)}.")
        return "role", role, None
    row = session.scalars(select(User).where(User.name == user)).first()
    if row is None:
        raise NotFound(f"no user named {user!r}.", hint="List them: waymark user list")
    return "user", row.id, row


def _checked(changes: Limits) -> Limits:
    unknown = sorted(set(changes) - set(RESOURCES))
    if unknown:
        raise InvalidInput(f"unknown quota(s): {', '.join(unknown)}.",
                           hint=f"Quotas: {', '.join(RESOURCES)}.")
    negative = [r for r, v in changes.items() if v is not None and v < 0]
    if negative:
        raise InvalidInput(f"a quota cannot be negative ({', '.join(negative)}).",
                           hint="Give 0 or more, or 'none' for no limit.")
    return changes


def show(ctx: Context, *, user: str | None = None, role: str | None = None) -> dict[str, Any]:
    """A user's quota and usage, or a role's defaults."""
    with ctx.catalog.session() as session:
        kind, subject, row = _subject(session, user, role)
        if row is None:
            return {"role": subject, "quota": _values(_row(session, kind, subject))}
        return {"user_name": row.name, "role": row.role,
                "own": _values(_row(session, kind, subject)), **view(session, row)}


def set_quota(ctx: Context, changes: Limits, *, user: str | None = None,
              role: str | None = None) -> dict[str, Any]:
    """Change the named ceilings (None: unset) of a user's quota or a role's defaults; the rest
    stay. Lowering a quota below what is held removes nothing: it stops further growth."""
    changes = _checked(changes)
    with ctx.catalog.session() as session:
        kind, subject, _ = _subject(session, user, role)
        row = _row(session, kind, subject)
        if row is None:
            row = Quota(kind=kind, subject=subject)
            session.add(row)
        for resource, value in changes.items():
            setattr(row, resource, value)
        row.updated_at = now()
    return show(ctx, user=user, role=role)


def forget(session: Session, user_id: str) -> None:
    """Remove a user's quota (the user is being removed)."""
    row = _row(session, "user", user_id)
    if row is not None:
        session.delete(row)
