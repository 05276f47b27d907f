"""The REST API's permission matrix: every route of the app, for every kind of caller.

Every route: the JSON API's, and the web portal's pages (called with a signed-in session's
cookie instead of the token).

One home, built once for the module: an administrator; three VMs, all off, with 1 MiB disks
(``vm-x``, granted to several users, with checkpoints ``c1`` and ``c2``; ``vm-y``, created through
the API by ``owner`` from the template granted to them, with ``y1`` and ``y2``; ``vm-w``, in
nobody's scope but ``outsider``'s); a backup point of ``vm-x`` and of ``vm-y`` in a repository
registered as the location ``repo``; an export folder ``exports``, a library ``lib`` (holding
the stored VM ``vm-s``) and a spare location; the profiles ``small`` and ``spare``; the templates
``tpl`` and ``tpl-spare``; the schedule ``nightly``; a finished merge job on each VM; and these
users, each calling with their own API token:

==============  ===============  ========================================================
caller          role             grants
==============  ===============  ========================================================
admin           administrator    none
owner           self-service     template ``tpl``; owns ``vm-y``
granted_full    self-service     every VM permission on ``vm-x``
restore_only    self-service     checkpoint-restore-only and backup-restore on ``vm-x``
backupop        backup-operator  backup-run and backup-restore on ``vm-x``
reader          read-only        ``*`` (every VM), no permissions
outsider        self-service     start-stop on ``vm-w`` (``vm-x`` is out of their scope)
==============  ===============  ========================================================

plus ``victim``, a read-only user that administrators' cells act on (password, grants, tokens).

What is checked: ``TABLE``, written by hand from the issue's rules (not from server code), gives
for each route (method and path; a few in two variants) and each caller the answer: ``ok`` (the
route's 2xx), ``403`` (denied), ``404`` (out of the caller's scope: answered exactly as for an
object that does not exist, which each such cell compares), ``409`` (allowed, but the VM is off:
pause, resume, save, stop), ``start`` (allowed, and the start fails before QEMU runs with the 404
"kernel file does not exist", because the cell hides the VMs' kernel files: no guest ever
boots; the module's end checks that no VM was launched; a ``start`` cell with an effect to
check, an apply that starts the VM, checks that effect instead of "nothing changed"). A VM
route's target is the caller's VM: ``vm-y`` for ``owner``, ``vm-x`` for the rest. A cell where
the server is known to answer otherwise is a strict xfail naming the bug.

An allowed cell checks its effect (the checkpoint appeared, was renamed, applied or deleted and
its merge job finished; the setting changed; the token stopped working; the bundle was written;
only the VMs, jobs and templates in scope are listed or streamed; no host path reaches a
non-administrator through locations or templates). Any other cell checks that nothing changed:
every catalog table but the web sessions and the audit log (token last-use times aside), and
the files under the home, the repository, the export folders and the library, are identical
before and after. Cells that delete something get a fresh object to delete. The first test
fails when the app has a route the table lacks, or the table a route the app lacks.

Then: an export job shows a non-administrator no host path. (What the audit log records of
each request is tests/integration/test_api_events_audit.py's.)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from tests.helpers import ERROR_KEYS, Waymark, query
from waymark.api.app import create_app
from waymark.config import Settings
from waymark.engine import jobs
from waymark.engine.context import Context
from waymark.engine.running import presence
from waymark.usecases.access import users
from waymark.wiring import open_context

CALLERS = ("admin", "owner", "granted_full", "restore_only", "backupop", "reader", "outsider")
ROLES = {"admin": "administrator", "owner": "self-service", "granted_full": "self-service",
         "restore_only": "self-service", "backupop": "backup-operator", "reader": "read-only",
         "outsider": "self-service", "victim": "read-only"}
EVERY_PERMISSION = ["backup-restore", "backup-run", "checkpoint", "checkpoint-restore-only",
                    "start-stop"]
FIXED_VMS = {"vm-x", "vm-y", "vm-w"}
VISIBLE_VMS = {"admin": FIXED_VMS, "owner": {"vm-y"}, "granted_full": {"vm-x"},
               "restore_only": {"vm-x"}, "backupop": {"vm-x"}, "reader": FIXED_VMS,
               "outsider": {"vm-w"}}
FIXED_TEMPLATES = {"tpl", "tpl-spare"}
VISIBLE_TEMPLATES: dict[str, set[str]] = {
    "admin": FIXED_TEMPLATES, "owner": {"tpl"}, "granted_full": set(), "restore_only": set(),
    "backupop": set(), "reader": FIXED_TEMPLATES, "outsider": set()}
FINISHED = ("completed", "failed", "cancelled")
MISSING = "zz-missing"  # what a 404 cell's object is replaced with: a name nothing has
SUGGESTION = re.compile(r"Did you mean [^?]*\? ")  # a 404's hint: names close to the one typed
# the docs and the OpenAPI document are no routes of the table; the portal's static files
# (a mount) are public
NOT_API = {"/api/openapi.json", "/api/docs", "/api/docs/oauth2-redirect", "/docs/oauth2-redirect"}
PUBLIC_MOUNTS = {"/static", "/static/novnc/core", "/static/novnc/vendor"}  # (Debian's noVNC)
# WebSocket routes: no HTTP method, so no row of the table; each has its own test below
WEBSOCKETS = {("*", "/api/vms/{vm}/display")}
# web sessions come with each sign-in; the audit log records every refused request, by design
SKIPPED_TABLES = {"alembic_version", "web_sessions", "audit"}
VOLATILE = {("api_tokens", "last_used_at")}


# --- the home and how cells talk to it --------------------------------------------------------

@dataclass
class Req:
    """One cell's request (the row gives the method) and what to check when it is allowed."""

    url: str
    body: Any = None
    params: dict[str, Any] | None = None
    check: Callable[[httpx.Response], None] | None = None
    ref: str | None = None  # the object a 404 hides, in the URL or the body
    around: Callable[[], AbstractContextManager[None]] | None = None
    cookie: str | None = None  # the portal's pages: a session instead of the token
    form: dict[str, str] | None = None


@dataclass
class Env:
    base: Path
    wm: Waymark
    ctx: Context
    app: FastAPI
    client: TestClient
    tokens: dict[str, str]
    passwords: dict[str, str]
    user_ids: dict[str, str]
    vm_ids: dict[str, str] = field(default_factory=dict)
    ckpts: dict[str, str] = field(default_factory=dict)  # c1 c2 y1 y2 -> id
    points: dict[str, str] = field(default_factory=dict)  # vm name -> a point's id
    jobs: dict[str, str] = field(default_factory=dict)  # vm name -> a finished merge job
    kernels: list[Path] = field(default_factory=list)
    counter: Iterator[int] = field(default_factory=itertools.count)

    @property
    def home(self) -> Path:
        return self.wm.home

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{next(self.counter)}"

    def call(self, caller: str, method: str, url: str, body: Any = None,
             params: dict[str, Any] | None = None, token: str | None = None,
             cookie: str | None = None, form: dict[str, str] | None = None) -> httpx.Response:
        headers = {"Cookie": f"waymark_session={cookie}"} if cookie is not None else \
            {"Authorization": f"Bearer {token or self.tokens[caller]}"}
        resp: httpx.Response = self.client.request(method, url, json=body, params=params,
                                                   data=form, headers=headers,
                                                   follow_redirects=False)
        self.client.cookies.clear()
        return resp

    def session(self, caller: str) -> str:
        """A new signed-in session's cookie (a password change ends the older ones)."""
        resp = self.call(caller, "POST", "/api/auth/login",
                         {"name": caller, "password": self.passwords[caller]})
        assert resp.status_code == 200, resp.text
        return resp.cookies["waymark_session"]

    def admin(self, method: str, url: str, body: Any = None,
              params: dict[str, Any] | None = None, caller: str = "admin") -> Any:
        resp = self.call(caller, method, url, body, params)
        assert resp.is_success, f"setup: {method} {url} as {caller}: {resp.status_code} " \
                                f"{resp.text}"
        return resp.json()

    def target(self, caller: str) -> str:
        return "vm-y" if caller == "owner" else "vm-x"

    def pair(self, vm: str) -> tuple[str, str]:
        """Two checkpoints of the VM that cells apply, show, rename and export."""
        return (self.ckpts["y1"], self.ckpts["y2"]) if vm == "vm-y" else \
            (self.ckpts["c1"], self.ckpts["c2"])

    def tree(self, vm: str) -> dict[str, Any]:
        found: dict[str, Any] = self.admin("GET", f"/api/vms/{vm}/checkpoints")
        return found

    def new_checkpoint(self, vm: str) -> str:
        made = self.admin("POST", f"/api/vms/{vm}/checkpoints", {"name": self.unique("fresh")})
        return str(made["id"])

    def new_vm(self, caller: str) -> str:
        """A VM from ``tpl``: the owner's own for ``owner``, an administrator's otherwise."""
        name = self.unique("fresh-vm")
        self.admin("POST", "/api/vms", {"name": name, "template": "tpl"},
                   caller="owner" if caller == "owner" else "admin")
        return name

    def wait_job(self, job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while True:
            job: dict[str, Any] = self.admin("GET", f"/api/jobs/{job_id}")
            if job["status"] in FINISHED:
                return job
            assert time.monotonic() < deadline, f"job {job_id} did not finish: {job}"
            time.sleep(0.05)

    def fake_job(self, vm: str) -> str:
        """A queued export job of the VM that this process 'runs' (so no worker adopts it):
        cancelling it only sets its cancel request."""
        first = self.pair(vm)[0]
        return jobs.submit(self.ctx, self.vm_ids[vm], "export",
                           {"vm_id": self.vm_ids[vm], "checkpoint_id": first,
                            "dest": str(self.base / "never" / self.unique("job"))},
                           run_here=True, user="tests")

    def watched(self) -> dict[str, Path]:
        return {"home": self.home, "repo": self.base / "repo", "exports": self.base / "exports",
                "lib": self.base / "lib", "spare": self.base / "spare"}

    def snapshot(self) -> dict[str, list[str]]:
        """The catalog (but web sessions, the audit log and token use times) and the files
        Waymark keeps."""
        state: dict[str, list[str]] = {}
        con = sqlite3.connect(self.home / "catalog.db")
        try:
            tables = [r[0] for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            for table in tables:
                if table in SKIPPED_TABLES or table.startswith("sqlite_"):
                    continue
                cur = con.execute(f'SELECT * FROM "{table}"')
                cols = [d[0] for d in cur.description]
                state[table] = sorted(
                    repr(tuple(v for c, v in zip(cols, row, strict=True)
                               if (table, c) not in VOLATILE)) for row in cur)
        finally:
            con.close()
        for label, folder in self.watched().items():
            state[f"files in {label}"] = sorted(
                f"{p.relative_to(folder)} {p.stat().st_size if p.is_file() else 'dir'}"
                for p in folder.rglob("*")
                if p.relative_to(folder).parts[0] != "locks" and not p.name.startswith(
                    "catalog.db"))
        return state

    @contextmanager
    def kernels_hidden(self) -> Iterator[None]:
        """The VMs' kernel files are gone for a moment: a start fails before QEMU runs."""
        for path in self.kernels:
            path.rename(path.with_name(path.name + ".hidden"))
        try:
            yield
        finally:
            for path in self.kernels:
                path.with_name(path.name + ".hidden").rename(path)


def _cli_home(base: Path, wm: Waymark) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """What the CLI sets up: files, VMs, locations, users, grants and tokens."""
    (base / "vmlinuz").write_bytes(b"not a kernel: no VM here ever boots\n")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(base / "base.qcow2"), "1M"],
                   check=True, capture_output=True)
    wm("profile", "create", "small", "--memory", "128M", "--cpus", "1",
       "--automatic-checkpoints", "off")
    wm("profile", "create", "spare", "--cpus", "1")
    wm("template", "create", "tpl", "--profile", "small", "--disk", str(base / "base.qcow2"),
       "--kernel", str(base / "vmlinuz"))
    wm("template", "create", "tpl-spare", "--profile", "small", "--disk",
       str(base / "base.qcow2"))
    wm("vm", "create", "vm-x", "--disk", "1M", "--memory", "128M", "--kernel",
       str(base / "vmlinuz"), "--automatic-checkpoints", "off")
    wm("vm", "create", "vm-w", "--disk", "1M", "--memory", "128M",
       "--automatic-checkpoints", "off")
    wm("checkpoint", "create", "vm-x", "--name", "c1")
    wm("checkpoint", "create", "vm-x", "--name", "c2")
    wm("backup", "repo", "init", str(base / "repo"))
    wm("library", "init", str(base / "lib"))
    for folder in ("exports", "spare", "isos"):
        (base / folder).mkdir()
    (base / "isos" / "disc.iso").write_bytes(bytes(32769) + b"CD001" + bytes(2042))
    for name, path, kind in (("repo", "repo", "repository"), ("exports", "exports", "export"),
                             ("lib", "lib", "library"), ("spare-loc", "spare", "export"),
                             ("isos", "isos", "media")):
        wm("location", "add", name, str(base / path), "--kind", kind)
    passwords = {name: f"{name}-password-1" for name in ROLES}
    user_ids = {}
    for name, role in ROLES.items():
        made = wm.run("user", "add", name, "--role", role, "--password-stdin", "--json",
                      input=passwords[name] + "\n").ok().json()
        user_ids[name] = made["id"]
    for name, *grant in (
            ("owner", "--template", "tpl"),
            ("granted_full", "--vm", "vm-x", *(a for p in EVERY_PERMISSION
                                               for a in ("--permission", p))),
            ("restore_only", "--vm", "vm-x", "--permission", "checkpoint-restore-only",
             "--permission", "backup-restore"),
            ("backupop", "--vm", "vm-x", "--permission", "backup-run", "--permission",
             "backup-restore"),
            ("reader", "--vm", "*"),
            ("outsider", "--vm", "vm-w", "--permission", "start-stop")):
        wm("user", "grant", name, *grant)
    tokens = {name: wm.json("token", "create", "matrix", "--user", name)["token"]
              for name in CALLERS}
    return passwords, user_ids, tokens


def _api_home(env: Env) -> None:
    """What is set up through the API: the owner's VM, their checkpoints, backup points, merge
    jobs, a schedule and a stored VM."""
    env.admin("POST", "/api/vms", {"name": "vm-y", "template": "tpl"}, caller="owner")
    for name in ("y1", "y2"):
        env.ckpts[name] = env.admin("POST", "/api/vms/vm-y/checkpoints", {"name": name},
                                    caller="owner")["id"]
    for ckpt in env.tree("vm-x")["checkpoints"]:
        env.ckpts[ckpt["name"]] = ckpt["id"]
    env.vm_ids = {v["name"]: v["id"] for v in env.admin("GET", "/api/vms")}
    for outcome in env.wm.json("backup", "run", "vm-x", "vm-y", "--repo",
                               str(env.base / "repo")):
        env.points[outcome["vm"]] = outcome["point"]["id"]
    for vm in sorted(FIXED_VMS):
        doomed = env.new_checkpoint(vm)
        job = env.admin("DELETE", f"/api/vms/{vm}/checkpoints/{doomed}")["job_id"]
        assert env.wait_job(job)["status"] == "completed"
        env.jobs[vm] = job
    env.admin("POST", "/api/schedules", {"name": "nightly", "vms": ["vm-x"], "repository": "repo",
                                         "every": "daily", "at": "02:30"})
    env.admin("POST", "/api/vms", {"name": "vm-s", "template": "tpl"})
    env.admin("POST", "/api/vms/vm-s/store", {"library": "lib"})
    template = env.admin("GET", "/api/templates/tpl")
    env.kernels = [env.base / "vmlinuz", Path(template["kernel"])]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("api-matrix")
    wm = Waymark(base / "home")
    passwords, user_ids, tokens = _cli_home(base, wm)
    ctx = open_context(Settings(home=wm.home, lock_timeout=10.0))
    app = create_app(ctx)
    with TestClient(app, raise_server_exceptions=False) as client:
        made = Env(base, wm, ctx, app, client, tokens, passwords, user_ids)
        _api_home(made)
        yield made
    # the serial log gets its first line just before QEMU is launched: none, no launch
    assert sorted(wm.home.glob("vms/*/run/serial.log")) == [], "a VM was launched"


# --- the cells: each makes its request (fresh objects where a cell deletes) and its check -----

def login(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        cookie = resp.headers["set-cookie"].lower()
        assert "waymark_session=" in cookie and "httponly" in cookie
        assert resp.json()["user_name"] == caller and resp.json()["csrf_token"]

    return Req("/api/auth/login", {"name": caller, "password": env.passwords[caller]},
               check=check)


def logout(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert resp.json() == {"id": env.admin("GET", "/api/auth/me", caller=caller)["id"],
                               "name": caller, "signed_out": True}
        assert env.admin("GET", "/api/auth/me", caller=caller)["name"] == caller  # token stays

    return Req("/api/auth/logout", check=check)


def me(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        body = resp.json()
        assert (body["name"], body["role"], body["via"]) == (caller, ROLES[caller], "token")

    return Req("/api/auth/me", check=check)


def user_names(env: Env) -> set[str]:
    return {u["name"] for u in env.admin("GET", "/api/users")}


def user_list(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert {u["name"] for u in resp.json()} >= set(ROLES)

    return Req("/api/users", check=check)


def user_add(env: Env, caller: str, allowed: bool) -> Req:
    name = env.unique("new-user")

    def check(resp: httpx.Response) -> None:
        assert resp.json()["role"] == "read-only" and name in user_names(env)

    return Req("/api/users", {"name": name, "role": "read-only", "password": "pw-matrix-1"},
               check=check)


def user_remove(env: Env, caller: str, allowed: bool) -> Req:
    name = "victim"
    if allowed:
        name = env.unique("doomed-user")
        env.admin("POST", "/api/users", {"name": name, "role": "read-only",
                                         "password": "pw-matrix-1"})

    def check(resp: httpx.Response) -> None:
        assert name not in user_names(env)

    return Req(f"/api/users/{name}", check=check)


def _password(env: Env, whose: str, current: str | None = None) -> Req:
    new = env.unique(f"{whose}-password")

    def check(resp: httpx.Response) -> None:
        users.by_password(env.ctx, whose, new)  # raises when the password did not change
        env.passwords[whose] = new
        if whose in env.tokens:  # a password change revokes the user's tokens
            assert whoami(env, env.tokens[whose]).status_code == 401
            env.tokens[whose] = users.create_token(env.ctx, whose, env.unique("token"))["token"]

    body = {"password": new} | ({"current_password": current} if current else {})
    return Req(f"/api/users/{whose}/password", body, check=check)


def password_own(env: Env, caller: str, allowed: bool) -> Req:
    return _password(env, caller, env.passwords[caller])


def sign_in_failures(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert resp.json() == {"user_name": "victim", "cleared_addresses": 0}

    return Req("/api/users/victim/sign-in-failures", check=check)


def password_other(env: Env, caller: str, allowed: bool) -> Req:
    return _password(env, "victim")


def grants_of(env: Env, name: str) -> dict[str, list[str]]:
    [row] = [u for u in env.admin("GET", "/api/users") if u["name"] == name]
    return {g["object"]: g["permissions"] for g in row["grants"] if g["kind"] == "vm"}


def _grant(env: Env, whose: str, permissions: list[str]) -> Req:
    if env.vm_ids["vm-w"] in grants_of(env, whose) and whose != "outsider":
        env.admin("DELETE", f"/api/users/{whose}/grants", params={"vm": "vm-w"})

    def check(resp: httpx.Response) -> None:
        assert grants_of(env, whose)[env.vm_ids["vm-w"]] == permissions

    return Req(f"/api/users/{whose}/grants", {"vm": "vm-w", "permissions": permissions},
               check=check)


def grant_other(env: Env, caller: str, allowed: bool) -> Req:
    return _grant(env, "victim", ["backup-run"])


def grant_self(env: Env, caller: str, allowed: bool) -> Req:
    """Raising one's own scope: only an administrator may grant (here, to themself)."""
    return _grant(env, caller, EVERY_PERMISSION)


def grant_remove(env: Env, caller: str, allowed: bool) -> Req:
    env.admin("POST", "/api/users/victim/grants", {"vm": "vm-w", "permissions": ["start-stop"]})

    def check(resp: httpx.Response) -> None:
        assert env.vm_ids["vm-w"] not in grants_of(env, "victim")

    return Req("/api/users/victim/grants", params={"vm": "vm-w"}, check=check)


def whoami(env: Env, token: str) -> httpx.Response:
    return env.call("admin", "GET", "/api/auth/me", token=token)


def token_list(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        owners = {t["user_name"] for t in resp.json()}
        assert owners >= set(CALLERS) if caller == "admin" else owners == {caller}, owners
        assert all("token" not in t for t in resp.json())  # never the secrets

    return Req("/api/tokens", check=check)


def _token_create(env: Env, caller: str, whose: str | None) -> Req:
    def check(resp: httpx.Response) -> None:
        made = resp.json()
        assert made["user_name"] == (whose or caller)
        assert whoami(env, made["token"]).json()["name"] == (whose or caller)

    body = {"name": env.unique("token")} | ({"user": whose} if whose else {})
    return Req("/api/tokens", body, check=check)


def token_create_own(env: Env, caller: str, allowed: bool) -> Req:
    return _token_create(env, caller, None)


def token_create_other(env: Env, caller: str, allowed: bool) -> Req:
    return _token_create(env, caller, "victim")


def _token_revoke(env: Env, made: dict[str, Any]) -> Req:
    def check(resp: httpx.Response) -> None:
        assert whoami(env, made["token"]).status_code == 401

    return Req(f"/api/tokens/{made['id']}", check=check, ref=made["id"])


def token_revoke_own(env: Env, caller: str, allowed: bool) -> Req:
    return _token_revoke(env, env.admin("POST", "/api/tokens", {"name": env.unique("token")},
                                        caller=caller))


def token_revoke_other(env: Env, caller: str, allowed: bool) -> Req:
    return _token_revoke(env, env.admin("POST", "/api/tokens", {"name": env.unique("token"),
                                                                "user": "victim"}))


def role_list(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert resp.json() == {"roles": ["administrator", "self-service", "backup-operator",
                                         "read-only"],
                               "vm_permissions": ["start-stop", "checkpoint",
                                                  "checkpoint-restore-only", "backup-run",
                                                  "backup-restore"]}

    return Req("/api/roles", check=check)


def _quota_read(whose: str) -> Callable[[Env, str, bool], Req]:
    def cell(env: Env, caller: str, allowed: bool) -> Req:
        name = caller if whose == "own" else "victim"

        def check(resp: httpx.Response) -> None:
            assert resp.json()["user_name"] == name and set(resp.json()["usage"]) == {
                "vms", "cpus", "memory", "disk", "checkpoints"}

        return Req(f"/api/users/{name}/quota", check=check)

    return cell


def _quota_set(whose: str) -> Callable[[Env, str, bool], Req]:
    """Raising a quota (one's own, or another user's): administrators only."""
    def cell(env: Env, caller: str, allowed: bool) -> Req:
        name = caller if whose == "own" else "victim"
        body = {"vms": 1000 + next(env.counter), "memory": "1T"}

        def check(resp: httpx.Response) -> None:
            own = env.admin("GET", f"/api/users/{name}/quota")["own"]
            assert (own["vms"], own["memory"]) == (body["vms"], 1 << 40)

        return Req(f"/api/users/{name}/quota", body, check=check)

    return cell


def role_quota(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert resp.json()["role"] == "read-only"

    return Req("/api/roles/read-only/quota", check=check)


def role_quota_set(env: Env, caller: str, allowed: bool) -> Req:
    """A role's default quota (read-only users own no VMs: no other cell is affected)."""
    body = {"checkpoints": 100 + next(env.counter)}

    def check(resp: httpx.Response) -> None:
        assert env.admin("GET", "/api/roles/read-only/quota")["quota"]["checkpoints"] == \
            body["checkpoints"]

    return Req("/api/roles/read-only/quota", body, check=check)


def audit_list(env: Env, caller: str, allowed: bool) -> Req:
    assert env.call("reader", "GET", "/api/users").status_code == 403  # one refusal at least

    def check(resp: httpx.Response) -> None:
        ids = [e["id"] for e in resp.json()]
        assert ids and ids == sorted(ids, reverse=True)  # newest first
        assert ("reader", "GET /api/users", 403, "denied") in {
            (e["user_name"], e["action"], e["status"], e["outcome"]) for e in resp.json()}

    return Req("/api/audit", params={"limit": 50}, check=check)


def vm_list(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert {v["name"] for v in resp.json()} & FIXED_VMS == VISIBLE_VMS[caller]

    return Req("/api/vms", check=check)


def vm_create(env: Env, caller: str, allowed: bool) -> Req:
    name = env.unique("new-vm")

    def check(resp: httpx.Response) -> None:
        assert resp.json()["name"] == name
        assert query(env.home, "SELECT owner_id FROM vms WHERE name = ?", name) == \
            [(env.user_ids[caller],)]

    return Req("/api/vms", {"name": name, "template": "tpl"}, check=check, ref="tpl")


def vm_show(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)

    def check(resp: httpx.Response) -> None:
        assert resp.json()["id"] == env.vm_ids[vm]

    return Req(f"/api/vms/{vm}", check=check, ref=vm)


def vm_status(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)

    def check(resp: httpx.Response) -> None:
        assert resp.json()["id"] == env.vm_ids[vm] and resp.json()["silence"] is None

    return Req(f"/api/vms/{vm}/status", check=check, ref=vm)


def vm_summary(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)

    def check(resp: httpx.Response) -> None:
        summary = resp.json()
        assert summary["id"] == env.vm_ids[vm] and summary["disks"], summary

    return Req(f"/api/vms/{vm}/summary", check=check, ref=vm)


def vm_set(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)
    cpus = 2 if env.admin("GET", f"/api/vms/{vm}")["cpus"] == 1 else 1

    def check(resp: httpx.Response) -> None:
        assert env.admin("GET", f"/api/vms/{vm}")["cpus"] == cpus

    return Req(f"/api/vms/{vm}", {"cpus": cpus}, check=check, ref=vm)


def media_insert(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)
    env.admin("DELETE", f"/api/vms/{vm}/media")

    def check(resp: httpx.Response) -> None:
        assert env.admin("GET", f"/api/vms/{vm}")["media"] == str(env.base / "isos/disc.iso")

    return Req(f"/api/vms/{vm}/media", {"location": "isos", "file": "disc.iso"}, check=check,
               ref=vm)


def media_eject(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)
    env.admin("POST", f"/api/vms/{vm}/media", {"path": str(env.base / "isos/disc.iso")})

    def check(resp: httpx.Response) -> None:
        assert env.admin("GET", f"/api/vms/{vm}")["media"] is None

    return Req(f"/api/vms/{vm}/media", check=check, ref=vm)


def vm_delete(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.new_vm(caller) if allowed else env.target(caller)

    def check(resp: httpx.Response) -> None:
        assert env.call("admin", "GET", f"/api/vms/{vm}").status_code == 404

    return Req(f"/api/vms/{vm}", params={"yes": "true"}, check=check, ref=vm)


def power(action: str) -> Callable[[Env, str, bool], Req]:
    def cell(env: Env, caller: str, allowed: bool) -> Req:
        vm = env.target(caller)
        return Req(f"/api/vms/{vm}/{action}", ref=vm,
                   around=env.kernels_hidden if action == "start" else None)

    return cell


def tree(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)

    def check(resp: httpx.Response) -> None:
        assert resp.json()["vm_id"] == env.vm_ids[vm]
        assert set(env.pair(vm)) <= {c["id"] for c in resp.json()["checkpoints"]}

    return Req(f"/api/vms/{vm}/checkpoints", check=check, ref=vm)


def ckpt_create(env: Env, caller: str, allowed: bool) -> Req:
    vm, name = env.target(caller), env.unique("made")

    def check(resp: httpx.Response) -> None:
        made = resp.json()
        assert made["name"] == name
        assert {(c["id"], c["name"]) for c in env.tree(vm)["checkpoints"]} >= {(made["id"], name)}

    return Req(f"/api/vms/{vm}/checkpoints", {"name": name}, check=check, ref=vm)


def ckpt_show(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)
    ckpt = env.pair(vm)[0]

    def check(resp: httpx.Response) -> None:
        assert resp.json()["id"] == ckpt

    return Req(f"/api/vms/{vm}/checkpoints/{ckpt}", check=check, ref=vm)


def ckpt_apply(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)
    current = env.tree(vm)["current_checkpoint_id"]
    ckpt = next(c for c in env.pair(vm) if c != current)

    def check(resp: httpx.Response) -> None:
        assert resp.json()["checkpoint_id"] == ckpt
        assert env.tree(vm)["current_checkpoint_id"] == ckpt

    return Req(f"/api/vms/{vm}/checkpoints/{ckpt}/apply", {"mode": "discard_current"},
               check=check, ref=vm)


def ckpt_revert(env: Env, caller: str, allowed: bool) -> Req:
    """Hyper-V's Revert: apply the current checkpoint (Now's parent), as an apply is allowed."""
    vm = env.target(caller)
    current = env.tree(vm)["current_checkpoint_id"]

    def check(resp: httpx.Response) -> None:
        assert resp.json()["checkpoint_id"] == current
        assert env.tree(vm)["current_checkpoint_id"] == current

    return Req(f"/api/vms/{vm}/revert", {"mode": "discard_current"}, check=check, ref=vm)


def ckpt_apply_start(env: Env, caller: str, allowed: bool) -> Req:
    """An apply that starts the VM afterwards: the start is a side effect that needs
    start-stop; allowed, the apply is done and the start fails for want of a kernel."""
    vm = env.target(caller)
    current = env.tree(vm)["current_checkpoint_id"]
    ckpt = next(c for c in env.pair(vm) if c != current)

    def check(resp: httpx.Response) -> None:
        assert env.tree(vm)["current_checkpoint_id"] == ckpt

    return Req(f"/api/vms/{vm}/checkpoints/{ckpt}/apply",
               {"mode": "discard_current", "start": True}, check=check, ref=vm,
               around=env.kernels_hidden)


def ckpt_apply_first(env: Env, caller: str, allowed: bool) -> Req:
    """Hyper-V's "Create Checkpoint and Apply": a new checkpoint of Now, then the apply."""
    vm = env.target(caller)
    current = env.tree(vm)["current_checkpoint_id"]
    ckpt = next(c for c in env.pair(vm) if c != current)

    def check(resp: httpx.Response) -> None:
        safety = resp.json()["safety_checkpoint_id"]
        listing = env.tree(vm)
        assert listing["current_checkpoint_id"] == ckpt
        assert {c["id"]: c["parent_id"] for c in listing["checkpoints"]}[safety] == current

    return Req(f"/api/vms/{vm}/checkpoints/{ckpt}/apply", {"mode": "checkpoint_first"},
               check=check, ref=vm)


def ckpt_rename(env: Env, caller: str, allowed: bool) -> Req:
    vm, name = env.target(caller), env.unique("renamed")
    ckpt = env.pair(vm)[1]

    def check(resp: httpx.Response) -> None:
        assert {c["id"]: c["name"] for c in env.tree(vm)["checkpoints"]}[ckpt] == name

    return Req(f"/api/vms/{vm}/checkpoints/{ckpt}", {"name": name}, check=check, ref=vm)


def ckpt_delete(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)
    ckpt = env.new_checkpoint(vm) if allowed else env.pair(vm)[0]

    def check(resp: httpx.Response) -> None:
        assert [d["id"] for d in resp.json()["deleted"]] == [ckpt]
        assert env.wait_job(resp.json()["job_id"])["status"] == "completed"
        assert ckpt not in {c["id"] for c in env.tree(vm)["checkpoints"]}

    return Req(f"/api/vms/{vm}/checkpoints/{ckpt}", check=check, ref=vm)


def ckpt_delete_matching(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)
    ckpt = env.new_checkpoint(vm) if allowed else env.pair(vm)[0]
    name = {c["id"]: c["name"] for c in env.tree(vm)["checkpoints"]}[ckpt]

    def check(resp: httpx.Response) -> None:
        assert [d["id"] for d in resp.json()["deleted"]] == [ckpt]
        assert env.wait_job(resp.json()["job_id"])["status"] == "completed"
        assert ckpt not in {c["id"] for c in env.tree(vm)["checkpoints"]}

    return Req(f"/api/vms/{vm}/checkpoints", params={"match": name}, check=check, ref=vm)


def ckpt_export(env: Env, caller: str, allowed: bool) -> Req:
    vm, folder = env.target(caller), env.unique("bundle")
    ckpt = env.pair(vm)[0]

    def check(resp: httpx.Response) -> None:
        mine = folder if caller == "admin" else f"{caller}/{folder}"  # others': their own
        assert resp.json()["folder"] == mine
        assert env.wait_job(resp.json()["job_id"])["status"] == "completed"
        assert any((env.base / "exports" / mine).iterdir())

    return Req(f"/api/vms/{vm}/checkpoints/{ckpt}/export",
               {"location": "exports", "folder": folder}, check=check, ref=vm)


def point_ids(env: Env, vm: str) -> list[str]:
    return [p["id"] for p in env.admin("GET", f"/api/vms/{vm}/backups",
                                       params={"repository": "repo"})]


def backup_list(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)

    def check(resp: httpx.Response) -> None:
        assert env.points[vm] in {p["id"] for p in resp.json()}
        assert {p["repository"] for p in resp.json()} == {"repo"}  # its name, not its path
        assert {p["vm_id"] for p in resp.json()} == {env.vm_ids[vm]}

    return Req(f"/api/vms/{vm}/backups", params={"repository": "repo"}, check=check, ref=vm)


def backup_run(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)

    def check(resp: httpx.Response) -> None:
        assert resp.json()["repository"] == "repo"
        assert resp.json()["id"] in point_ids(env, vm)

    return Req(f"/api/vms/{vm}/backups", {"repository": "repo"}, check=check, ref=vm)


def backup_verify(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)
    point = env.points[vm]

    def check(resp: httpx.Response) -> None:
        assert point in {p["id"] for p in resp.json()}
        assert all(p["problems"] == [] for p in resp.json())

    return Req(f"/api/vms/{vm}/backups/{point}/verify", {"repository": "repo"}, check=check,
               ref=vm)


def backup_restore(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)
    point = env.points[vm]

    def check(resp: httpx.Response) -> None:
        restored = resp.json()["checkpoint_id"]
        listing = env.tree(vm)
        assert listing["current_checkpoint_id"] == restored
        assert {c["id"]: c["name"] for c in listing["checkpoints"]}[restored] == \
            f"Restored from {point}"

    return Req(f"/api/vms/{vm}/backups/{point}/restore",
               {"repository": "repo", "mode": "discard_current"}, check=check, ref=vm)


def backup_restore_first(env: Env, caller: str, allowed: bool) -> Req:
    """A restore that checkpoints Now first: that checkpoint needs the checkpoint permission."""
    vm = env.target(caller)
    point = env.points[vm]
    before = env.tree(vm)["current_checkpoint_id"]

    def check(resp: httpx.Response) -> None:
        listing = env.tree(vm)
        parents = {c["id"]: c["parent_id"] for c in listing["checkpoints"]}
        assert listing["current_checkpoint_id"] == resp.json()["checkpoint_id"]
        assert parents[resp.json()["safety_checkpoint_id"]] == before

    return Req(f"/api/vms/{vm}/backups/{point}/restore",
               {"repository": "repo", "mode": "checkpoint_first"}, check=check, ref=vm)


def backup_restore_as_new(env: Env, caller: str, allowed: bool) -> Req:
    vm, name = env.target(caller), env.unique("restored-vm")
    point = env.points[vm]

    def check(resp: httpx.Response) -> None:
        assert resp.json()["restored_as"]["name"] == name
        assert query(env.home, "SELECT owner_id FROM vms WHERE name = ?", name) == \
            [(env.user_ids[caller],)]

    return Req(f"/api/vms/{vm}/backups/{point}/restore",
               {"repository": "repo", "mode": "as_new", "new_name": name}, check=check, ref=vm)


def prune(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert resp.json()["dry_run"] is True
        assert env.points["vm-x"] in point_ids(env, "vm-x")  # a dry run removes nothing

    return Req("/api/backups/prune", {"repository": "repo", "keep_last": 1, "dry_run": True},
               check=check)


def schedule_names(env: Env) -> set[str]:
    return {s["name"] for s in env.admin("GET", "/api/schedules")}


def schedule_list(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert "nightly" in {s["name"] for s in resp.json()}

    return Req("/api/schedules", check=check)


def _schedule(name: str) -> dict[str, Any]:
    return {"name": name, "vms": ["vm-x"], "repository": "repo", "every": "daily",
            "at": "03:15"}


def schedule_add(env: Env, caller: str, allowed: bool) -> Req:
    name = env.unique("schedule")

    def check(resp: httpx.Response) -> None:
        assert name in schedule_names(env)

    return Req("/api/schedules", _schedule(name), check=check)


def schedule_remove(env: Env, caller: str, allowed: bool) -> Req:
    name = "nightly"
    if allowed:
        name = env.unique("doomed-schedule")
        env.admin("POST", "/api/schedules", _schedule(name))

    def check(resp: httpx.Response) -> None:
        assert name not in schedule_names(env)

    return Req(f"/api/schedules/{name}", check=check)


def schedule_edit(env: Env, caller: str, allowed: bool) -> Req:
    name = "nightly"
    if allowed:
        name = env.unique("edited-schedule")
        env.admin("POST", "/api/schedules", _schedule(name))

    def check(resp: httpx.Response) -> None:
        [edited] = [s for s in env.admin("GET", "/api/schedules") if s["name"] == name]
        assert edited["at"] == "04:45"

    return Req(f"/api/schedules/{name}", {**_schedule(name), "at": "04:45"}, check=check)


def console_events(env: Env, caller: str, allowed: bool) -> Req:
    """The VM is off: no output; the stream ends by itself after its quiet time."""
    vm = env.target(caller)

    def check(resp: httpx.Response) -> None:
        assert "event: end" in resp.text

    return Req(f"/api/vms/{vm}/console/events", check=check, ref=vm)


def console_input(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)
    return Req(f"/api/vms/{vm}/console/input", {"text": "ls\n"}, ref=vm)


def page_console(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)

    def check(resp: httpx.Response) -> None:
        assert 'id="console-output"' in resp.text

    return Req(f"/vms/{vm}/console", cookie=env.session(caller), check=check, ref=vm)


def page_display(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)

    def check(resp: httpx.Response) -> None:  # (the VM is off: no viewer, the reason why)
        assert "start it to see its screen" in resp.text

    return Req(f"/vms/{vm}/display", cookie=env.session(caller), check=check, ref=vm)


def job_list(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        shown = {j["id"] for j in resp.json()}
        assert shown & set(env.jobs.values()) == {env.jobs[vm] for vm in VISIBLE_VMS[caller]}
        assert caller == "admin" or all("params" not in j for j in resp.json())

    return Req("/api/jobs", params={"everything": "true"}, check=check)


def job_show(env: Env, caller: str, allowed: bool) -> Req:
    job = env.jobs[env.target(caller)]

    def check(resp: httpx.Response) -> None:
        assert resp.json()["id"] == job
        assert ("params" in resp.json()) == (caller == "admin")

    return Req(f"/api/jobs/{job}", check=check, ref=job)


def parse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Server-sent events: (event name, its JSON data) each; comments skipped."""
    found = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if line and not line.startswith(":"))
        if fields:
            found.append((fields["event"], json.loads(fields["data"])))
    return found


def first_events(env: Env, caller: str, url: str, seconds: float = 0.5) -> tuple[int, str]:
    """The status and what an endless event stream sent in its first ``seconds``: the app
    called as ASGI directly (a test client waits for a response's end), then disconnected."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": url, "raw_path": url.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
             "server": ("testserver", 80),
             "headers": [(b"authorization", f"Bearer {env.tokens[caller]}".encode())]}

    async def run() -> tuple[int, str]:
        asked, gone = False, asyncio.Event()
        status: list[int] = []
        body: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))

        served = asyncio.create_task(env.app(scope, receive, send))
        await asyncio.sleep(seconds)
        gone.set()
        await asyncio.wait_for(served, 10)
        return status[0], b"".join(body).decode()

    return asyncio.run(run())


def job_events_all(env: Env, caller: str, allowed: bool) -> Req:
    """An unfinished job on each VM first, so that each VM in scope has one to show."""
    for vm in sorted(FIXED_VMS):
        env.fake_job(vm)
    status, text = first_events(env, caller, "/api/jobs/events")
    assert status == 200, text
    events = parse_events(text)
    assert {kind for kind, _ in events} == {"job"}, events
    assert {job["vm_name"] for _, job in events} & FIXED_VMS == VISIBLE_VMS[caller]
    assert caller == "admin" or all("params" not in job for _, job in events)
    return Req("/api/jobs")  # what the stream showed is checked: this only lists them again


def job_events(env: Env, caller: str, allowed: bool) -> Req:
    job = env.jobs[env.target(caller)]

    def check(resp: httpx.Response) -> None:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = parse_events(resp.text)
        assert [kind for kind, _ in events] == ["job", "end"], events
        assert events[0][1]["id"] == job and events[1][1] == {"id": job, "status": "completed"}
        assert ("params" in events[0][1]) == (caller == "admin")

    return Req(f"/api/jobs/{job}/events", check=check, ref=job)


def job_cancel(env: Env, caller: str, allowed: bool) -> Req:
    job = env.fake_job(env.target(caller))

    def check(resp: httpx.Response) -> None:
        assert query(env.home, "SELECT cancel_requested FROM jobs WHERE id = ?", job) == [(1,)]

    return Req(f"/api/jobs/{job}/cancel", check=check, ref=job)


def profiles(env: Env) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in env.admin("GET", "/api/profiles")}


def profile_list(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert {"small", "spare"} <= {p["name"] for p in resp.json()}

    return Req("/api/profiles", check=check)


def profile_create(env: Env, caller: str, allowed: bool) -> Req:
    name = env.unique("profile")

    def check(resp: httpx.Response) -> None:
        assert profiles(env)[name]["cpus"] == 2

    return Req("/api/profiles", {"name": name, "cpus": 2}, check=check)


def profile_set(env: Env, caller: str, allowed: bool) -> Req:
    cpus = 3 if profiles(env)["spare"]["cpus"] != 3 else 2

    def check(resp: httpx.Response) -> None:
        assert profiles(env)["spare"]["cpus"] == cpus

    return Req("/api/profiles/spare", {"cpus": cpus}, check=check)


def profile_delete(env: Env, caller: str, allowed: bool) -> Req:
    name = "spare"
    if allowed:
        name = env.unique("doomed-profile")
        env.admin("POST", "/api/profiles", {"name": name})

    def check(resp: httpx.Response) -> None:
        assert name not in profiles(env)

    return Req(f"/api/profiles/{name}", check=check)


def no_host_paths(env: Env, resp: httpx.Response, caller: str) -> None:
    """Non-administrators learn names, never the host's folders."""
    assert caller == "admin" or str(env.base) not in resp.text, resp.text


def template_list(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert {t["name"] for t in resp.json()} & FIXED_TEMPLATES == VISIBLE_TEMPLATES[caller]
        no_host_paths(env, resp, caller)

    return Req("/api/templates", check=check)


def template_show(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert resp.json()["name"] == "tpl"
        no_host_paths(env, resp, caller)

    return Req("/api/templates/tpl", check=check, ref="tpl")


def template_names(env: Env) -> set[str]:
    return {t["name"] for t in env.admin("GET", "/api/templates")}


def template_create(env: Env, caller: str, allowed: bool) -> Req:
    name = env.unique("new-template")

    def check(resp: httpx.Response) -> None:
        assert name in template_names(env)

    return Req("/api/templates", {"name": name, "disks": [str(env.base / "base.qcow2")]},
               check=check)


def template_set(env: Env, caller: str, allowed: bool) -> Req:
    wanted = "standard" if env.admin("GET", "/api/templates/tpl-spare")["checkpoint_type"] \
        != "standard" else "production"

    def check(resp: httpx.Response) -> None:
        assert env.admin("GET", "/api/templates/tpl-spare")["checkpoint_type"] == wanted

    return Req("/api/templates/tpl-spare", {"checkpoint_type": wanted}, check=check)


def template_delete(env: Env, caller: str, allowed: bool) -> Req:
    name = "tpl-spare"
    if allowed:
        name = env.unique("doomed-template")
        env.admin("POST", "/api/templates", {"name": name,
                                             "disks": [str(env.base / "base.qcow2")]})

    def check(resp: httpx.Response) -> None:
        assert name not in template_names(env)

    return Req(f"/api/templates/{name}", check=check)


def location_names(env: Env) -> set[str]:
    return {loc["name"] for loc in env.admin("GET", "/api/locations")}


def location_list(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert {"repo", "exports", "lib", "spare-loc"} <= {loc["name"] for loc in resp.json()}
        assert all(("path" in loc) == (caller == "admin") for loc in resp.json())
        no_host_paths(env, resp, caller)

    return Req("/api/locations", check=check)


def location_add(env: Env, caller: str, allowed: bool) -> Req:
    name = env.unique("location")
    (env.base / name).mkdir()

    def check(resp: httpx.Response) -> None:
        assert name in location_names(env)

    return Req("/api/locations", {"name": name, "kind": "export", "path": str(env.base / name)},
               check=check)


def location_remove(env: Env, caller: str, allowed: bool) -> Req:
    name = "spare-loc"
    if allowed:
        name = env.unique("doomed-location")
        (env.base / name).mkdir()
        env.admin("POST", "/api/locations", {"name": name, "kind": "export",
                                             "path": str(env.base / name)})

    def check(resp: httpx.Response) -> None:
        assert name not in location_names(env)

    return Req(f"/api/locations/{name}", check=check)


def library_list(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert "vm-s" in resp.text

    return Req("/api/library/lib", check=check)


def vm_store(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.new_vm(caller) if allowed else env.target(caller)

    def check(resp: httpx.Response) -> None:
        assert env.call("admin", "GET", f"/api/vms/{vm}").status_code == 404
        assert vm in json.dumps(env.admin("GET", "/api/library/lib"))

    return Req(f"/api/vms/{vm}/store", {"library": "lib"}, check=check)


def vm_deploy(env: Env, caller: str, allowed: bool) -> Req:
    vm = "vm-s"
    if allowed:
        vm = env.new_vm(caller)
        env.admin("POST", f"/api/vms/{vm}/store", {"library": "lib"})

    def check(resp: httpx.Response) -> None:
        assert env.admin("GET", f"/api/vms/{vm}")["name"] == vm

    return Req("/api/library/lib/deploy", {"vm": vm}, check=check)


def page_home(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert resp.headers["location"] == "/vms"

    return Req("/", cookie=env.session(caller), check=check)


def page_login(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert 'name="password"' in resp.text

    return Req("/login", check=check)


def page_sign_in(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert resp.headers["location"] == "/vms"
        cookie = resp.cookies["waymark_session"]
        shown = env.call(caller, "GET", "/api/auth/me", cookie=cookie)
        assert (shown.json()["name"], shown.json()["via"]) == (caller, "session")

    return Req("/login", form={"name": caller, "password": env.passwords[caller],
                               "next": "/vms"}, check=check)


def page_sign_out(env: Env, caller: str, allowed: bool) -> Req:
    cookie = env.session(caller)

    def check(resp: httpx.Response) -> None:
        assert resp.headers["location"] == "/login"
        assert env.call(caller, "GET", "/api/auth/me", cookie=cookie).status_code == 401

    return Req("/logout", cookie=cookie, check=check)


def page_vms(env: Env, caller: str, allowed: bool) -> Req:
    def check(resp: httpx.Response) -> None:
        assert {vm for vm in FIXED_VMS if f'href="/vms/{vm}"' in resp.text} == \
            VISIBLE_VMS[caller]

    return Req("/vms", cookie=env.session(caller), check=check)


def page_tasks(env: Env, caller: str, allowed: bool) -> Req:
    """The task history: the jobs of the VMs the caller may see, as GET /api/jobs."""
    def check(resp: httpx.Response) -> None:
        shown = {job for job in env.jobs.values() if f'data-job="{job}"' in resp.text}
        assert shown == {env.jobs[vm] for vm in VISIBLE_VMS[caller]}

    return Req("/tasks", cookie=env.session(caller), check=check)


def page_vm(env: Env, caller: str, allowed: bool) -> Req:
    vm = env.target(caller)

    def check(resp: httpx.Response) -> None:
        assert f'data-vm-id="{env.vm_ids[vm]}"' in resp.text

    return Req(f"/vms/{vm}", cookie=env.session(caller), check=check, ref=vm)


def admin_page(url: str, shows: str) -> Callable[[Env, str, bool], Req]:
    def cell(env: Env, caller: str, allowed: bool) -> Req:
        def check(resp: httpx.Response) -> None:
            assert shows in resp.text

        return Req(url, cookie=env.session(caller), check=check)

    return cell


# --- the table --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    method: str
    path: str
    expect: dict[str, str]
    cell: Callable[[Env, str, bool], Req]
    variant: str = ""
    ok: int = 200  # the status of an allowed cell
    bugs: dict[str, str] = field(default_factory=dict)  # caller -> a known server bug

    def label(self) -> str:
        return f"{self.method} {self.path}" + (f" [{self.variant}]" if self.variant else "")


def row(method: str, path: str, answers: str, cell: Callable[[Env, str, bool], Req], *,
        variant: str = "", ok: int = 200, bugs: dict[str, str] | None = None) -> Row:
    """``bugs``: the cells where the server is known to answer otherwise (strict xfails)."""
    tokens = answers.split()
    assert len(tokens) == len(CALLERS) and set(tokens) <= {"ok", "403", "404", "409", "start"}
    return Row(method, path, dict(zip(CALLERS, tokens, strict=True)), cell, variant, ok,
               bugs or {})


V = "/api/vms/{vm}"
C = "/api/vms/{vm}/checkpoints/{ckpt}"
TABLE = [
    #                                                 admin owner full rest  bop  read  out
    row("POST", "/api/auth/login",                    "ok   ok   ok   ok   ok   ok   ok", login),
    row("POST", "/api/auth/logout",                   "ok   ok   ok   ok   ok   ok   ok", logout),
    row("GET", "/api/auth/me",                        "ok   ok   ok   ok   ok   ok   ok", me),
    # users, grants and others' tokens: administrators only
    row("GET", "/api/users",                          "ok  403  403  403  403  403  403",
        user_list),
    row("POST", "/api/users",                         "ok  403  403  403  403  403  403",
        user_add, ok=201),
    row("DELETE", "/api/users/{name}",                "ok  403  403  403  403  403  403",
        user_remove),
    # every user changes their own password
    row("PUT", "/api/users/{name}/password",          "ok   ok   ok   ok   ok   ok   ok",
        password_own, variant="own"),
    row("PUT", "/api/users/{name}/password",          "ok  403  403  403  403  403  403",
        password_other, variant="another user's"),
    row("DELETE", "/api/users/{name}/sign-in-failures", "ok  403  403  403  403  403  403",
        sign_in_failures),
    row("POST", "/api/users/{name}/grants",           "ok  403  403  403  403  403  403",
        grant_other, variant="another user"),
    row("POST", "/api/users/{name}/grants",           "ok  403  403  403  403  403  403",
        grant_self, variant="oneself"),
    row("DELETE", "/api/users/{name}/grants",         "ok  403  403  403  403  403  403",
        grant_remove),
    # every user lists, creates and revokes their own tokens; others' are out of their sight
    row("GET", "/api/tokens",                         "ok   ok   ok   ok   ok   ok   ok",
        token_list),
    row("POST", "/api/tokens",                        "ok   ok   ok   ok   ok   ok   ok",
        token_create_own, variant="own", ok=201),
    row("POST", "/api/tokens",                        "ok  403  403  403  403  403  403",
        token_create_other, variant="another user's", ok=201),
    row("DELETE", "/api/tokens/{token_id}",           "ok   ok   ok   ok   ok   ok   ok",
        token_revoke_own, variant="own"),
    row("DELETE", "/api/tokens/{token_id}",           "ok  404  404  404  404  404  404",
        token_revoke_other, variant="another user's"),
    row("GET", "/api/roles",                          "ok   ok   ok   ok   ok   ok   ok",
        role_list),
    # quotas: every user reads their own; administrators read and set anyone's, and roles'
    row("GET", "/api/users/{name}/quota",             "ok   ok   ok   ok   ok   ok   ok",
        _quota_read("own"), variant="own"),
    row("GET", "/api/users/{name}/quota",             "ok  403  403  403  403  403  403",
        _quota_read("other"), variant="another user's"),
    row("PUT", "/api/users/{name}/quota",             "ok  403  403  403  403  403  403",
        _quota_set("own"), variant="own"),
    row("PUT", "/api/users/{name}/quota",             "ok  403  403  403  403  403  403",
        _quota_set("other"), variant="another user's"),
    row("GET", "/api/roles/{role}/quota",             "ok  403  403  403  403  403  403",
        role_quota),
    row("PUT", "/api/roles/{role}/quota",             "ok  403  403  403  403  403  403",
        role_quota_set),
    # the audit log: administrators only
    row("GET", "/api/audit",                          "ok  403  403  403  403  403  403",
        audit_list),
    # VMs: everyone lists their scope; self-service users create from templates granted to
    # them (to others the template does not exist); backup operators and readers create none
    row("GET", "/api/vms",                            "ok   ok   ok   ok   ok   ok   ok", vm_list),
    row("POST", "/api/vms",                           "ok   ok  404  404  403  403  404",
        vm_create, ok=201),
    row("GET", V,                                     "ok   ok   ok   ok   ok   ok  404", vm_show),
    row("GET", f"{V}/status",                         "ok   ok   ok   ok   ok   ok  404",
        vm_status),
    row("GET", f"{V}/summary",                        "ok   ok   ok   ok   ok   ok  404",
        vm_summary),
    # a VM's settings and deletion: its owner's and administrators' (no grant gives them)
    row("PATCH", V,                                   "ok   ok  403  403  403  403  404", vm_set),
    row("DELETE", V,                                  "ok   ok  403  403  403  403  404",
        vm_delete),
    # the CD drive's media: a change of the VM's settings (a media location's ISO)
    row("POST", V + "/media",                         "ok   ok  403  403  403  403  404",
        media_insert),
    row("DELETE", V + "/media",                       "ok   ok  403  403  403  403  404",
        media_eject),
    # power: start-stop (the VMs are off: start cannot find its kernel, stop is a no-op, the
    # rest are 409)
    row("POST", V + "/start",                      "start start start 403 403 403 404",
        power("start")),
    row("POST", V + "/stop",                          "ok   ok   ok  403  403  403  404",
        power("stop")),
    row("POST", V + "/save",                          "409  409  409  403  403  403  404",
        power("save")),
    row("POST", V + "/pause",                         "409  409  409  403  403  403  404",
        power("pause")),
    row("POST", V + "/resume",                        "409  409  409  403  403  403  404",
        power("resume")),
    # checkpoints: checkpoint (create, apply, rename, delete, export); restore-only: apply
    row("GET", V + "/checkpoints",                    "ok   ok   ok   ok   ok   ok  404", tree),
    row("POST", V + "/checkpoints",                   "ok   ok   ok  403  403  403  404",
        ckpt_create, ok=201),
    row("GET", C,                                     "ok   ok   ok   ok   ok   ok  404",
        ckpt_show),
    row("POST", C + "/apply",                         "ok   ok   ok   ok  403  403  404",
        ckpt_apply, variant="discard Now"),
    row("POST", V + "/revert",                        "ok   ok   ok   ok  403  403  404",
        ckpt_revert),
    # "Create Checkpoint and Apply" creates a checkpoint: not restore-only's
    row("POST", C + "/apply",                         "ok   ok   ok  403  403  403  404",
        ckpt_apply_first, variant="checkpoint first"),
    # an apply that starts the VM afterwards: start-stop too, so not restore-only's
    row("POST", C + "/apply",                      "start start start 403 403 403 404",
        ckpt_apply_start, variant="and start"),
    row("PATCH", C,                                   "ok   ok   ok  403  403  403  404",
        ckpt_rename),
    row("DELETE", C,                                  "ok   ok   ok  403  403  403  404",
        ckpt_delete, ok=202),
    row("DELETE", V + "/checkpoints",                 "ok   ok   ok  403  403  403  404",
        ckpt_delete_matching, ok=202),
    row("POST", C + "/export",                        "ok   ok   ok  403  403  403  404",
        ckpt_export, ok=202),
    # backups: backup-run (run, verify), backup-restore; backup operators never restore
    row("GET", V + "/backups",                        "ok   ok   ok   ok   ok   ok  404",
        backup_list),
    row("POST", V + "/backups",                       "ok   ok   ok  403   ok  403  404",
        backup_run, ok=201),
    row("POST", V + "/backups/{point}/verify",        "ok   ok   ok  403   ok  403  404",
        backup_verify),
    row("POST", V + "/backups/{point}/restore",       "ok   ok   ok   ok  403  403  404",
        backup_restore, variant="into the VM"),
    # checkpointing Now first needs the checkpoint permission too: not backup-restore's alone
    row("POST", V + "/backups/{point}/restore",       "ok   ok   ok  403  403  403  404",
        backup_restore_first, variant="checkpoint first"),
    # a new VM: self-service users create VMs only from templates granted to them
    row("POST", V + "/backups/{point}/restore",       "ok  403  403  403  403  403  404",
        backup_restore_as_new, variant="as a new VM"),
    # prune and schedules: administrators only
    row("POST", "/api/backups/prune",                 "ok  403  403  403  403  403  403", prune),
    row("GET", "/api/schedules",                      "ok  403  403  403  403  403  403",
        schedule_list),
    row("POST", "/api/schedules",                     "ok  403  403  403  403  403  403",
        schedule_add, ok=201),
    row("PUT", "/api/schedules/{name}",               "ok  403  403  403  403  403  403",
        schedule_edit),
    row("DELETE", "/api/schedules/{name}",            "ok  403  403  403  403  403  403",
        schedule_remove),
    # the serial console: start-stop (the VM is off: the stream ends, input is 409)
    row("GET", V + "/console/events",                 "ok   ok   ok  403  403  403  404",
        console_events),
    row("POST", V + "/console/input",                 "409  409  409  403  403  403  404",
        console_input),
    # jobs: seen in the VM's scope; cancelled by those who may make them (checkpoint)
    row("GET", "/api/jobs",                           "ok   ok   ok   ok   ok   ok   ok",
        job_list),
    row("GET", "/api/jobs/{job_id}",                  "ok   ok   ok   ok   ok   ok  404",
        job_show),
    row("GET", "/api/jobs/events",                    "ok   ok   ok   ok   ok   ok   ok",
        job_events_all),
    row("GET", "/api/jobs/{job_id}/events",           "ok   ok   ok   ok   ok   ok  404",
        job_events),
    row("POST", "/api/jobs/{job_id}/cancel",          "ok   ok   ok  403  403  403  404",
        job_cancel),
    # profiles: administrators write, readers read; templates: administrators write, the
    # rest see those in scope (self-service: granted; read-only: all); locations: names
    row("GET", "/api/profiles",                       "ok  403  403  403  403   ok  403",
        profile_list),
    row("POST", "/api/profiles",                      "ok  403  403  403  403  403  403",
        profile_create, ok=201),
    row("PATCH", "/api/profiles/{name}",              "ok  403  403  403  403  403  403",
        profile_set),
    row("DELETE", "/api/profiles/{name}",             "ok  403  403  403  403  403  403",
        profile_delete),
    row("GET", "/api/templates",                      "ok   ok   ok   ok   ok   ok   ok",
        template_list),
    row("GET", "/api/templates/{name}",               "ok   ok  404  404  404   ok  404",
        template_show),
    row("POST", "/api/templates",                     "ok  403  403  403  403  403  403",
        template_create, ok=201),
    row("PATCH", "/api/templates/{name}",             "ok  403  403  403  403  403  403",
        template_set),
    row("DELETE", "/api/templates/{name}",            "ok  403  403  403  403  403  403",
        template_delete),
    row("GET", "/api/locations",                      "ok   ok   ok   ok   ok   ok   ok",
        location_list),
    row("POST", "/api/locations",                     "ok  403  403  403  403  403  403",
        location_add, ok=201),
    row("DELETE", "/api/locations/{name}",            "ok  403  403  403  403  403  403",
        location_remove),
    # the library: administrators only (403 before any VM is looked up: nothing leaks)
    row("GET", "/api/library/{name}",                 "ok  403  403  403  403  403  403",
        library_list),
    row("POST", V + "/store",                         "ok  403  403  403  403  403  403",
        vm_store),
    row("POST", "/api/library/{name}/deploy",         "ok  403  403  403  403  403  403",
        vm_deploy, ok=201),
    # the portal's pages (a session cookie): they show what the user may see; every action on
    # them is a call of the JSON API above
    row("GET", "/",                                   "ok   ok   ok   ok   ok   ok   ok",
        page_home, ok=303),
    row("GET", "/login",                              "ok   ok   ok   ok   ok   ok   ok",
        page_login),
    row("POST", "/login",                             "ok   ok   ok   ok   ok   ok   ok",
        page_sign_in, ok=303),
    row("POST", "/logout",                            "ok   ok   ok   ok   ok   ok   ok",
        page_sign_out, ok=303),
    row("GET", "/vms",                                "ok   ok   ok   ok   ok   ok   ok",
        page_vms),
    row("GET", "/vms/{vm}",                           "ok   ok   ok   ok   ok   ok  404",
        page_vm),
    row("GET", "/tasks",                              "ok   ok   ok   ok   ok   ok   ok",
        page_tasks),
    # administration (users, grants, tokens, the audit log) and the library: administrators
    row("GET", "/admin",                              "ok  403  403  403  403  403  403",
        admin_page("/admin", "victim")),
    row("GET", "/library",                            "ok  403  403  403  403  403  403",
        admin_page("/library", "tpl-spare")),
    row("GET", "/library/{name}",                     "ok  403  403  403  403  403  403",
        admin_page("/library/lib", "vm-s")),
    row("GET", "/backups",                            "ok  403  403  403  403  403  403",
        admin_page("/backups", "nightly")),
    row("GET", "/vms/{vm}/console",                   "ok   ok   ok  403  403  403  404",
        page_console),
    row("GET", "/vms/{vm}/display",                   "ok   ok   ok  403  403  403  404",
        page_display),
]
CELLS = [pytest.param(r, c, id=f"{r.label()} as {c}", marks=[
    pytest.mark.xfail(strict=True, reason=f"server bug: {r.bugs[c]}")] if c in r.bugs else [])
    for r in TABLE for c in CALLERS]


# --- the tests --------------------------------------------------------------------------------

def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves: its routes, walked through included
    routers, and the OpenAPI document's operations."""
    found: set[tuple[str, str]] = set()

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            inner = getattr(route, "original_router", None)
            if inner is not None:  # FastAPI keeps an included router whole
                walk(inner.routes, prefix + route.include_context.prefix)
            elif getattr(route, "methods", None):
                found.update((m, prefix + route.path) for m in route.methods if m != "HEAD")
            elif prefix + route.path not in PUBLIC_MOUNTS:  # a mounted app: whatever it serves
                found.add(("*", prefix + route.path))

    walk(app.routes, "")
    for path, operations in app.openapi()["paths"].items():
        found.update((method.upper(), path) for method in operations)
    return {(m, p) for m, p in found if p not in NOT_API}


def test_every_route_is_in_the_table(env: Env) -> None:
    served = app_routes(env.app)
    assert len(served) > 40, served
    table = {(r.method, r.path) for r in TABLE} | WEBSOCKETS
    assert sorted(served - table) == [], "routes the permission table lacks"
    assert sorted(table - served) == [], "table rows for routes the app does not serve"


def error_of(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


def swapped(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return new if value == old else value
    if isinstance(value, dict):
        return {k: swapped(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [swapped(v, old, new) for v in value]
    return value


def assert_like_missing(env: Env, caller: str, method: str, req: Req,
                        hidden: httpx.Response) -> None:
    """The 404 for an object out of scope is the 404 for one that does not exist."""
    assert req.ref is not None
    url = "/".join(MISSING if part == req.ref else part for part in req.url.split("/"))
    missing = env.call(caller, method, url, swapped(req.body, req.ref, MISSING), req.params,
                       cookie=req.cookie)
    assert missing.status_code == 404, missing.text
    assert_alike(env, caller, hidden.text, req.ref, missing.text)


def assert_alike(env: Env, caller: str, hidden: str, ref: str, missing: str) -> None:
    """The answer about ``ref`` (out of the caller's scope) is the answer about a name that
    does not exist but for a "did you mean", which depends on the name typed, among the names
    the caller may see (never others): the rest is word for word the same."""
    assert SUGGESTION.sub("", hidden).replace(ref, "<ref>") == \
        SUGGESTION.sub("", missing).replace(MISSING, "<ref>")
    offered = re.findall(r"'([^']*)'", " ".join(SUGGESTION.findall(hidden + missing)))
    if offered:
        seen = {vm["name"] for vm in env.call(caller, "GET", "/api/vms").json()}
        assert set(offered) <= seen, (offered, seen)


def diff(before: dict[str, list[str]], after: dict[str, list[str]]) -> str:
    lines = []
    for key in sorted(set(before) | set(after)):
        old, new = set(before.get(key, [])), set(after.get(key, []))
        lines += [f"{key}: - {x}" for x in sorted(old - new)]
        lines += [f"{key}: + {x}" for x in sorted(new - old)]
    return "\n".join(lines)


@pytest.mark.parametrize(("spec", "caller"), CELLS)
def test_cell(env: Env, spec: Row, caller: str) -> None:
    expect = spec.expect[caller]
    req = spec.cell(env, caller, expect == "ok")
    before = env.snapshot() if expect != "ok" else {}
    with req.around() if req.around else nullcontext():
        resp = env.call(caller, spec.method, req.url, req.body, req.params, cookie=req.cookie,
                        form=req.form)
    where = f"{spec.method} {req.url} {json.dumps(req.body)} as {caller}: " \
            f"{resp.status_code} {resp.text[:2000]}"
    if expect == "ok":
        assert resp.status_code == spec.ok, where
        if req.check is not None:
            req.check(resp)
        return
    assert resp.status_code == (404 if expect == "start" else int(expect)), where
    if spec.path.startswith("/api/"):  # (a page answers with a page)
        error = error_of(resp)
        if expect == "start":  # allowed: it got as far as the VM's files
            assert "--kernel file" in error["message"], where
            if req.check is not None:  # what the request did before it started the VM
                req.check(resp)
                return
    changes = diff(before, env.snapshot())
    assert not changes, f"{where}\nchanged:\n{changes}"
    if expect == "404" and req.ref is not None:
        assert_like_missing(env, caller, spec.method, req, resp)


# the graphical console's WebSocket: start-stop, as the serial console (the VMs are off: 409)
DISPLAY = dict(zip(CALLERS, (409, 409, 409, 403, 403, 403, 404), strict=True))


@pytest.mark.parametrize("caller", CALLERS)
def test_the_display_websocket(env: Env, caller: str) -> None:
    """Refused before it opens, with the error envelope; a VM out of scope is a 404 like a VM
    that does not exist."""
    vm = env.target(caller)
    answers = []
    for name in (vm, MISSING):
        with pytest.raises(WebSocketDenialResponse) as refused:
            env.client.websocket_connect(f"/api/vms/{name}/display", headers={
                "Authorization": f"Bearer {env.tokens[caller]}"}).__enter__()
        answers.append(refused.value)
    assert answers[0].status_code == DISPLAY[caller], answers[0].text
    assert error_of(answers[0])["exit_code"] > 0
    if DISPLAY[caller] == 404:
        assert_alike(env, caller, answers[0].text, vm, answers[1].text)


# --- host paths -------------------------------------------------------------------------------

def test_jobs_show_non_administrators_no_location_path(env: Env) -> None:
    """Non-administrators name locations, never host paths, and are shown none: an export
    job they started says where by the location's name only."""
    made = env.admin("POST", f"/api/vms/vm-x/checkpoints/{env.ckpts['c1']}/export",
                     {"location": "exports", "folder": env.unique("bundle")},
                     caller="granted_full")
    env.wait_job(made["job_id"])
    exports = str(env.base / "exports")
    for url, params in ((f"/api/jobs/{made['job_id']}", None), ("/api/jobs", {"everything": "1"}),
                        (f"/api/jobs/{made['job_id']}/events", None)):
        resp = env.call("granted_full", "GET", url, params=params)
        assert resp.status_code == 200, resp.text
        assert exports not in resp.text, f"GET {url}: {resp.text}"


# --- side effects -----------------------------------------------------------------------------

def set_state(env: Env, vm_id: str, state: str) -> None:
    with sqlite3.connect(env.home / "catalog.db") as con:
        con.execute("UPDATE vms SET state = ? WHERE id = ?", (state, vm_id))
    con.close()


def test_an_apply_that_turns_a_running_vm_off_needs_start_stop(env: Env) -> None:
    """Applying a checkpoint to a running VM turns it off first (as Hyper-V does): that is a
    stop, which ``checkpoint-restore-only`` does not give. A stand-in for QEMU (a process whose
    command line names the VM's QMP socket) makes the VM running; the apply is refused, nothing
    changed, the stand-in still runs."""
    vm = env.vm_ids["vm-x"]
    run = presence.run_files(env.ctx, vm)
    run.folder.mkdir(parents=True, exist_ok=True)
    stand_in = subprocess.Popen(["sh", "-c", "sleep 600", str(run.qmp)])
    try:
        run.pidfile.write_text(str(stand_in.pid))
        set_state(env, vm, "running")
        current = env.tree("vm-x")["current_checkpoint_id"]
        ckpt = next(c for c in env.pair("vm-x") if c != current)
        before = env.snapshot()
        resp = env.call("restore_only", "POST", f"/api/vms/vm-x/checkpoints/{ckpt}/apply",
                        {"mode": "discard_current"})
        assert resp.status_code == 403, resp.text
        assert "vm.power" in error_of(resp)["message"]
        assert not diff(before, env.snapshot())
        assert stand_in.poll() is None
    finally:
        stand_in.kill()
        stand_in.wait()
        run.pidfile.unlink(missing_ok=True)
        set_state(env, vm, "off")
