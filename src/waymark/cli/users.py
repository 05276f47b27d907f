"""``waymark user`` and ``waymark token``: who may use the API, and their scripts' tokens
(:mod:`waymark.usecases.access.users`). Local commands: whoever runs the CLI on the host owns the
catalog."""

from __future__ import annotations

import sys
from typing import Any

import click

from waymark.cli.main import face
from waymark.cli.output import emit, json_option
from waymark.errors import InvalidInput
from waymark.model.policy import ROLES, VM_PERMISSIONS
from waymark.model.units import human, parse_duration, parse_size
from waymark.text import printable
from waymark.usecases.access import audit as audit_ops
from waymark.usecases.access import quotas, users


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline().rstrip("\n")
        if not line:
            raise InvalidInput("no password on standard input.",
                               hint="Pipe it in: printf '%s\\n' \"$PASSWORD\" | waymark ...")
        return line
    if not sys.stdin.isatty():
        raise InvalidInput("a password is needed and there is no terminal to ask on.",
                           hint="Give it on standard input with --password-stdin.")
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))


PASSWORD_STDIN = click.option("--password-stdin", is_flag=True,
                              help="Read the password from standard input (one line).")


def _user_lines(u: dict[str, Any]) -> list[str]:
    lines = [f"{u['name']:<24} {u['role']:<16} {u['id'][:12]}"]
    lines += [f"    {g['kind']} {g['object'][:12] if g['kind'] == 'vm' else g['object']}: "
              f"{', '.join(g['permissions']) or '(use)'}" for g in u["grants"]]
    return lines


@click.group()
def user() -> None:
    """API users: add, passwd, unlock, remove, list, show, grant, revoke, quota."""


@user.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), required=True)
@PASSWORD_STDIN
@json_option
def user_add(name: str, role: str, password_stdin: bool, as_json: bool) -> None:
    """Add a user (the first one is usually an administrator)."""
    made = users.add(face().ctx, name, role, _password(password_stdin))
    emit(as_json, made, [f"Added user {made['name']} ({made['role']})."])


@user.command("passwd")
@click.argument("name")
@PASSWORD_STDIN
@click.option("--keep-tokens", is_flag=True,
              help="Keep the user's API tokens working (by default they are revoked).")
def user_passwd(name: str, password_stdin: bool, keep_tokens: bool) -> None:
    """Set a user's password: their web sessions end and their API tokens are revoked.

    On the host no current password is asked (whoever runs the CLI here owns the catalog).
    With --server, changing your own password needs your current one: asked first, or the
    first line on standard input (the new one the second)."""
    remote = face().remote
    if remote is None:
        done = users.set_password(face().ctx, name, _password(password_stdin),
                                  keep_tokens=keep_tokens)
    else:
        current = _current_password(password_stdin) if remote.me()["name"] == name else None
        done = remote.set_password(name, _password(password_stdin), current, keep_tokens)
    click.echo(f"Changed the password of {name}; their sessions were signed out"
               + ("." if keep_tokens else f" and {done['tokens_revoked']} API token(s) "
                  "revoked."))


def _current_password(from_stdin: bool) -> str:
    if from_stdin:
        return _password(True)
    if not sys.stdin.isatty():
        raise InvalidInput("your current password is needed and there is no terminal to ask "
                           "on.", hint="Give it on standard input with --password-stdin (the "
                                       "current password first, the new one second).")
    return str(click.prompt("Current password", hide_input=True))


@user.command("unlock")
@click.argument("name")
def user_unlock(name: str) -> None:
    """Forget a user's failed sign-ins from every address (after 429s), on a running server:
    the counts live in its memory (restarting it also clears them)."""
    remote = face().remote
    if remote is None:
        raise InvalidInput("failed sign-ins are counted in the running server's memory, not in "
                           "the home.",
                           hint="Run it through the server as an administrator: waymark "
                                "--server URL --token TOKEN user unlock NAME")
    done = remote.forget_sign_in_failures(name)
    click.echo(f"Forgot the failed sign-ins of {name} from {done['cleared_addresses']} "
               "address(es).")


@user.command("remove")
@click.argument("name")
@json_option
def user_remove(name: str, as_json: bool) -> None:
    """Remove a user with their tokens, sessions and grants."""
    emit(as_json, users.remove(face().ctx, name), [f"Removed user {name}."])


@user.command("list")
@json_option
def user_list(as_json: bool) -> None:
    """Users, their roles and grants."""
    rows = users.listing(face().ctx)
    emit(as_json, rows, [line for u in rows for line in _user_lines(u)] or
         ["No users yet. Add the first: waymark user add NAME --role administrator"])


def _quota_lines(shown: dict[str, Any]) -> list[str]:
    limits, held = shown["quota"], shown.get("usage")
    lines = []
    for resource in quotas.RESOURCES:
        limit = limits[resource]
        text = "unlimited" if limit is None else \
            (human(limit) if resource in quotas.SIZES else str(limit))
        if held is not None:
            used = held[resource]
            text = f"{human(used) if resource in quotas.SIZES else used} of {text}"
        lines.append(f"    {quotas.LABELS[resource]:<12} {text}")
    return lines


@user.command("show")
@click.argument("name")
@json_option
def user_show(name: str, as_json: bool) -> None:
    """A user: role, grants, quota and what their VMs hold."""
    shown = users.show(face().ctx, name)
    emit(as_json, shown, [*_user_lines(shown), "  quota (used of limit):",
                          *_quota_lines(shown)])


def _ceiling(resource: str, text: str | None) -> tuple[str, int | None] | None:
    """A --vms/--memory/... option: None when not given; (resource, None) for 'none'."""
    if text is None:
        return None
    if text.lower() in ("none", "unlimited"):
        return resource, None
    if resource in quotas.SIZES:
        return resource, parse_size(text, what=f"{resource} quota")
    if not text.isdigit():
        raise InvalidInput(f"invalid {quotas.OPTIONS[resource]} {text!r}.",
                           hint="Give a whole number (0 or more), or 'none' for no limit.")
    return resource, int(text)


@user.command("quota")
@click.argument("name", required=False)
@click.option("--role", type=click.Choice(ROLES), help="Set the role's default instead.")
@click.option("--vms", metavar="N|none", help="How many VMs they may own.")
@click.option("--cpus", metavar="N|none", help="vCPUs of all their VMs together.")
@click.option("--memory", metavar="SIZE|none", help="Memory of all their VMs (e.g. 8G).")
@click.option("--disk", metavar="SIZE|none",
              help="Disk of all their VMs (virtual sizes, e.g. 200G).")
@click.option("--checkpoints", metavar="N|none", help="Checkpoints of all their VMs.")
@json_option
def user_quota(name: str | None, role: str | None, as_json: bool, **given: str | None) -> None:
    """Show or set a user's quota (or with --role, a role's default for what a user's own
    leaves unset); 'none' removes a limit. Administrators are never limited."""
    changes = dict(c for c in (_ceiling(r, given[r]) for r in quotas.RESOURCES) if c)
    ctx = face().ctx
    shown = quotas.set_quota(ctx, changes, user=name, role=role) if changes \
        else quotas.show(ctx, user=name, role=role)
    title = f"Quota of {name}" if name is not None else f"Default quota of role {role}"
    title += " (used of limit):" if "usage" in shown else ":"
    emit(as_json, shown, [title, *_quota_lines(shown)])


@user.command("grant")
@click.argument("name")
@click.option("--vm", metavar="VM", help="A VM (name or id), or '*' for every VM.")
@click.option("--template", metavar="T", help="A template they may create VMs from.")
@click.option("--permission", "permissions", multiple=True, type=click.Choice(VM_PERMISSIONS))
@json_option
def user_grant(name: str, vm: str | None, template: str | None, permissions: tuple[str, ...],
               as_json: bool) -> None:
    """Grant permissions on a VM, or the use of a template (replaces an earlier grant)."""
    shown = users.grant(face().ctx, name, vm=vm, template=template, permissions=list(permissions))
    emit(as_json, shown, _user_lines(shown))


@user.command("revoke")
@click.argument("name")
@click.option("--vm", metavar="VM")
@click.option("--template", metavar="T")
@json_option
def user_revoke(name: str, vm: str | None, template: str | None, as_json: bool) -> None:
    """Take back a grant."""
    shown = users.revoke(face().ctx, name, vm=vm, template=template)
    emit(as_json, shown, _user_lines(shown))


@click.group()
def token() -> None:
    """API tokens for scripts: create (shown once), revoke, list."""


@token.command("create")
@click.argument("name")
@click.option("--user", "user_name", required=True, help="Whose token it is.")
@click.option("--expires-in", metavar="DURATION",
              help="How long it works: 30m, 12h, 90d, 8w (default: until revoked).")
@json_option
def token_create(name: str, user_name: str, expires_in: str | None, as_json: bool) -> None:
    """A new token; it is shown now and never again (only its hash is kept)."""
    span = parse_duration(expires_in, what="--expires-in") if expires_in else None
    made = users.create_token(face().ctx, user_name, name, span)
    emit(as_json, made, [made["token"],
                         f"(token {made['id']} for {user_name}"
                         + (f", until {made['expires_at']}" if made["expires_at"] else "")
                         + ": keep it now, it is not shown again)"])


@token.command("revoke")
@click.argument("token_id")
@json_option
def token_revoke(token_id: str, as_json: bool) -> None:
    """Revoke a token by its id: it stops working at once."""
    emit(as_json, users.revoke_token(face().ctx, token_id), [f"Revoked token {token_id}."])


@token.command("list")
@click.option("--user", "user_name")
@json_option
def token_list(user_name: str | None, as_json: bool) -> None:
    """Tokens (ids, owners, last use; never the secrets)."""
    rows = users.tokens(face().ctx, user_name)
    emit(as_json, rows, [f"{t['id']}  {t['user_name']:<20} {t['name']:<20} last used "
                         f"{t['last_used_at'] or 'never'}, expires {t['expires_at'] or 'never'}"
                         for t in rows] or ["No tokens."])


@click.command()
@click.option("--user", "user_name", help="Only this user's entries.")
@click.option("--outcome", type=click.Choice(["ok", "denied", "failed"]))
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True)
@json_option
def audit(user_name: str | None, outcome: str | None, limit: int, as_json: bool) -> None:
    """The API's audit log, newest first: who did what to which object, from where, and how
    it ended."""
    rows = audit_ops.listing(face().ctx, user=user_name, outcome=outcome, limit=limit)
    emit(as_json, rows, [_audit_line(r) for r in rows] or ["The audit log is empty."])


def _audit_line(row: dict[str, Any]) -> str:
    """One entry on one line: what anonymous clients sent (the path, a sign-in's user name,
    the path's parameters) is made printable field by field, so it can neither forge lines
    nor drive the terminal."""
    target = " ".join(f"{printable(str(k))}={printable(str(v))}"
                      for k, v in row["target"].items())
    message = f"  ({printable(row['message'])})" if row["message"] else ""
    return (f"{row['at']}  {printable(row['user_name'] or '-'):<16} "
            f"{printable(row['client'] or '-'):<15} {row['status']} {row['outcome']:<6} "
            f"{printable(row['action'])} {target}{message}")
