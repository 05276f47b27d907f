"""Who may do what: roles, per-VM permissions, and the decision for one action (pure code).

Roles, after SCVMM user roles and Proxmox privileges:

- ``administrator``: everything, every object.
- ``self-service``: the VMs they own (created from a template granted to them: every VM
  permission) or were granted, each grant naming its permissions; VMs only from granted
  templates.
- ``backup-operator``: run and verify backups of the VMs in scope (granted, or every VM with a
  ``*`` grant); never apply, delete, prune or restore.
- ``read-only``: see everything in scope, change nothing.

A decision is one of three: ``allow``; ``deny`` (the caller sees the object but may not do
this: HTTP 403, nothing changes); ``hide`` (the object is outside the caller's scope: HTTP 404,
the same answer as for an object that does not exist, so nothing about it leaks).

Checkpoint permissions follow Hyper-V's and SCVMM's: ``checkpoint`` is create, apply, rename,
delete and export; ``checkpoint-restore-only`` is apply (of existing checkpoints) only.

A request with side effects needs the decision for each of them too (the faces ask for each:
an apply that starts or stops the VM needs ``vm.power``, one that checkpoints Now first
``checkpoint.create``; docs/api.md, "Side effects need their own permission").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

ROLES = ("administrator", "self-service", "backup-operator", "read-only")
VM_PERMISSIONS = ("start-stop", "checkpoint", "checkpoint-restore-only", "backup-run",
                  "backup-restore")
EVERY_VM = "*"


class Decision(Enum):
    ALLOW = "allow"
    DENY = "deny"  # 403
    HIDE = "hide"  # 404


# Per-VM actions, and the VM permission (self-service) that allows each; None: view only.
VM_ACTIONS: dict[str, tuple[str, ...] | None] = {
    "vm.view": None,
    "vm.power": ("start-stop",),
    "vm.set": (),  # owners and administrators
    "vm.delete": (),
    "checkpoint.view": None,
    "checkpoint.create": ("checkpoint",),
    "checkpoint.apply": ("checkpoint", "checkpoint-restore-only"),
    "checkpoint.rename": ("checkpoint",),
    "checkpoint.delete": ("checkpoint",),
    "checkpoint.export": ("checkpoint",),
    "backup.view": None,
    "backup.run": ("backup-run",),
    "backup.verify": ("backup-run",),
    "backup.restore": ("backup-restore",),
    "backup.prune": (),
    "job.view": None,
    "job.cancel": ("checkpoint",),
}
BACKUP_OPERATOR = frozenset({"backup.run", "backup.verify"})
# Actions on no single VM: administrators only, except where a role is listed.
GLOBAL_ACTIONS: dict[str, frozenset[str]] = {
    "vm.list": frozenset(ROLES),
    "vm.create": frozenset({"administrator", "self-service"}),  # (from a granted template)
    "template.view": frozenset(ROLES),
    "profile.view": frozenset({"administrator", "read-only"}),
    "job.list": frozenset(ROLES),
    "token.own": frozenset(ROLES),  # one's own tokens and password
}


@dataclass(frozen=True)
class Principal:
    user_id: str
    name: str
    role: str
    # VM id (or ``*``) -> granted permissions; template names they may create VMs from
    vm_grants: dict[str, frozenset[str]] = field(default_factory=dict)
    templates: frozenset[str] = frozenset()

    @property
    def admin(self) -> bool:
        return self.role == "administrator"


def in_scope(who: Principal, vm_id: str, owner_id: str | None) -> bool:
    """Whether the caller may see the VM at all."""
    if who.admin or (owner_id is not None and owner_id == who.user_id):
        return True
    if who.role in ("read-only", "backup-operator") and EVERY_VM in who.vm_grants:
        return True
    return vm_id in who.vm_grants


def vm_permissions(who: Principal, vm_id: str, owner_id: str | None) -> frozenset[str]:
    """What a self-service caller may do to the VM: everything on their own VM, else its grant."""
    if owner_id is not None and owner_id == who.user_id:
        return frozenset(VM_PERMISSIONS)
    return who.vm_grants.get(vm_id, frozenset()) | who.vm_grants.get(EVERY_VM, frozenset())


def decide_vm(who: Principal, action: str, vm_id: str, owner_id: str | None) -> Decision:
    """The decision for a per-VM ``action`` (a key of :data:`VM_ACTIONS`)."""
    needed = VM_ACTIONS[action]
    if not in_scope(who, vm_id, owner_id):
        return Decision.HIDE
    if who.admin or needed is None:
        return Decision.ALLOW
    if who.role == "backup-operator":
        return Decision.ALLOW if action in BACKUP_OPERATOR else Decision.DENY
    if who.role != "self-service":
        return Decision.DENY
    owner = owner_id is not None and owner_id == who.user_id
    if not needed:  # owners' and administrators' actions
        return Decision.ALLOW if owner else Decision.DENY
    granted = vm_permissions(who, vm_id, owner_id)
    return Decision.ALLOW if granted & set(needed) else Decision.DENY


def decide(who: Principal, action: str) -> Decision:
    """The decision for an action on no single VM (anything not in :data:`GLOBAL_ACTIONS` is
    an administrator's: users, grants, profiles, templates, the library, schedules)."""
    if who.admin or who.role in GLOBAL_ACTIONS.get(action, frozenset()):
        return Decision.ALLOW
    return Decision.DENY


def may_use_template(who: Principal, template: str) -> Decision:
    """Creating a VM from ``template``: administrators, and self-service users it was granted
    to; for anyone else the template is out of scope."""
    if who.admin:
        return Decision.ALLOW
    if who.role == "self-service" and template in who.templates:
        return Decision.ALLOW
    return Decision.HIDE
