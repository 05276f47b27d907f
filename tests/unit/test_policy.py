"""Who may do what (waymark.auth.policy): every role, with every single VM permission granted,
against every per-VM action; owners; ``*`` grants; actions on no VM; templates.

The expected decisions are written out here from the rules in the module's docstring (and
docs/api.md), not computed from the module's own tables.
"""

from __future__ import annotations

import itertools

import pytest

from waymark.model import policy
from waymark.model.policy import Decision, Principal

ALLOW, DENY, HIDE = Decision.ALLOW, Decision.DENY, Decision.HIDE
VM, OTHER_VM, USER, SOMEONE_ELSE = "vm-1", "vm-2", "u-1", "u-2"

VIEWS = frozenset({"vm.view", "checkpoint.view", "backup.view", "job.view"})
# what one granted VM permission lets a self-service user do, besides viewing
GRANTS = {
    "start-stop": {"vm.power"},
    "checkpoint": {"checkpoint.create", "checkpoint.apply", "checkpoint.rename",
                   "checkpoint.delete", "checkpoint.export", "job.cancel"},
    "checkpoint-restore-only": {"checkpoint.apply"},
    "backup-run": {"backup.run", "backup.verify"},
    "backup-restore": {"backup.restore"},
}
OWNERS_ONLY = frozenset({"vm.set", "vm.delete", "backup.prune"})  # no grant allows these
BACKUP_OPERATOR = frozenset({"backup.run", "backup.verify"})
ACTIONS = sorted(policy.VM_ACTIONS)


def who(role: str, grants: dict[str, frozenset[str]] | None = None,
        templates: frozenset[str] = frozenset()) -> Principal:
    return Principal(USER, "alice", role, vm_grants=grants or {}, templates=templates)


def expected(role: str, permission: str, action: str) -> Decision:
    """The decision for ``action`` on a VM that grants ``permission`` alone (not owned)."""
    if role == "administrator" or action in VIEWS:
        return ALLOW
    if role == "backup-operator":
        return ALLOW if action in BACKUP_OPERATOR else DENY
    if role == "self-service":
        return ALLOW if action in GRANTS[permission] else DENY
    return DENY  # read-only


def test_the_tables_name_every_action_and_permission() -> None:
    assert set(GRANTS) == set(policy.VM_PERMISSIONS)
    named = VIEWS | OWNERS_ONLY | set().union(*GRANTS.values())
    assert named == set(policy.VM_ACTIONS)


@pytest.mark.parametrize(("role", "permission"),
                         list(itertools.product(policy.ROLES, policy.VM_PERMISSIONS)))
def test_every_role_with_each_permission_granted(role: str, permission: str) -> None:
    caller = who(role, {VM: frozenset({permission})})
    decisions = {a: policy.decide_vm(caller, a, VM, SOMEONE_ELSE) for a in ACTIONS}
    assert decisions == {a: expected(role, permission, a) for a in ACTIONS}


@pytest.mark.parametrize("role", policy.ROLES)
def test_a_vm_out_of_scope_is_hidden_from_all_but_administrators(role: str) -> None:
    caller = who(role, {VM: frozenset(policy.VM_PERMISSIONS)})
    decisions = {policy.decide_vm(caller, a, OTHER_VM, SOMEONE_ELSE) for a in ACTIONS}
    assert decisions == ({ALLOW} if role == "administrator" else {HIDE})
    assert policy.in_scope(caller, OTHER_VM, SOMEONE_ELSE) is (role == "administrator")


def test_a_grant_with_no_permission_lets_one_see_and_do_nothing() -> None:
    caller = who("self-service", {VM: frozenset()})
    assert policy.in_scope(caller, VM, None)
    assert {a for a in ACTIONS if policy.decide_vm(caller, a, VM, None) is ALLOW} == VIEWS


def test_permissions_granted_together_add_up() -> None:
    caller = who("self-service", {VM: frozenset({"start-stop", "backup-restore"})})
    allowed = {a for a in ACTIONS if policy.decide_vm(caller, a, VM, None) is ALLOW}
    assert allowed == VIEWS | {"vm.power", "backup.restore"}


def test_a_self_service_owner_may_do_everything_to_their_vm() -> None:
    owner = who("self-service")  # no grant at all
    assert {policy.decide_vm(owner, a, VM, USER) for a in ACTIONS} == {ALLOW}
    assert policy.vm_permissions(owner, VM, USER) == frozenset(policy.VM_PERMISSIONS)


def test_only_owners_set_delete_or_prune_even_with_every_permission_granted() -> None:
    granted = who("self-service", {VM: frozenset(policy.VM_PERMISSIONS)})
    assert {a: policy.decide_vm(granted, a, VM, SOMEONE_ELSE) for a in OWNERS_ONLY} == \
        dict.fromkeys(OWNERS_ONLY, DENY)
    assert {a: policy.decide_vm(granted, a, VM, USER) for a in OWNERS_ONLY} == \
        dict.fromkeys(OWNERS_ONLY, ALLOW)


@pytest.mark.parametrize("role", ["read-only", "backup-operator"])
def test_owning_a_vm_does_not_raise_a_narrower_role(role: str) -> None:
    owner = who(role)
    assert policy.in_scope(owner, VM, USER)
    allowed = {a for a in ACTIONS if policy.decide_vm(owner, a, VM, USER) is ALLOW}
    assert allowed == VIEWS | (BACKUP_OPERATOR if role == "backup-operator" else set())


def test_a_vm_with_no_owner_belongs_to_nobody() -> None:
    caller = Principal("", "nobody", "self-service")  # an empty id never matches a None owner
    assert not policy.in_scope(caller, VM, None)
    assert policy.decide_vm(caller, "vm.view", VM, None) is HIDE
    assert policy.vm_permissions(caller, VM, None) == frozenset()


@pytest.mark.parametrize("role", ["read-only", "backup-operator"])
def test_an_every_vm_grant_puts_every_vm_in_scope_of_a_watching_role(role: str) -> None:
    caller = who(role, {policy.EVERY_VM: frozenset()})
    assert policy.decide_vm(caller, "vm.view", OTHER_VM, SOMEONE_ELSE) is ALLOW
    assert policy.decide_vm(caller, "backup.run", OTHER_VM, SOMEONE_ELSE) is \
        (ALLOW if role == "backup-operator" else DENY)
    assert policy.decide_vm(caller, "checkpoint.apply", OTHER_VM, SOMEONE_ELSE) is DENY


def test_an_every_vm_grant_does_not_widen_a_self_service_scope() -> None:
    caller = who("self-service", {policy.EVERY_VM: frozenset(policy.VM_PERMISSIONS)})
    assert {policy.decide_vm(caller, a, OTHER_VM, SOMEONE_ELSE) for a in ACTIONS} == {HIDE}


def test_backup_operators_never_apply_delete_prune_or_restore() -> None:
    caller = who("backup-operator", {policy.EVERY_VM: frozenset(policy.VM_PERMISSIONS)})
    for action in ("checkpoint.apply", "checkpoint.delete", "backup.prune", "backup.restore",
                   "vm.power", "vm.delete"):
        assert policy.decide_vm(caller, action, VM, SOMEONE_ELSE) is DENY, action


def test_an_unknown_action_is_an_error_not_a_decision() -> None:
    with pytest.raises(KeyError):
        policy.decide_vm(who("administrator"), "vm.explode", VM, None)


GLOBAL = {
    "vm.list": set(policy.ROLES),
    "vm.create": {"administrator", "self-service"},
    "template.view": set(policy.ROLES),
    "profile.view": {"administrator", "read-only"},
    "job.list": set(policy.ROLES),
    "token.own": set(policy.ROLES),
    "user.add": {"administrator"},  # not listed: administrators only
    "grant.add": {"administrator"},
    "library.share": {"administrator"},
}


@pytest.mark.parametrize(("role", "action"), list(itertools.product(policy.ROLES, GLOBAL)))
def test_actions_on_no_vm(role: str, action: str) -> None:
    assert policy.decide(who(role), action) is (ALLOW if role in GLOBAL[action] else DENY)


@pytest.mark.parametrize("role", policy.ROLES)
def test_templates_are_for_administrators_and_the_self_service_users_granted_them(
        role: str) -> None:
    caller = who(role, templates=frozenset({"web"}))
    granted = ALLOW if role in ("administrator", "self-service") else HIDE
    assert policy.may_use_template(caller, "web") is granted
    assert policy.may_use_template(caller, "db") is (ALLOW if role == "administrator" else HIDE)
