"""Job progress as server-sent events, and the audit log, against a real ``waymark serve``.

One home for the module, served once (``tests.helpers.served``: the administrator
``root-admin`` with an API token), all VMs off:

- ``v`` (2 GiB disk) whose checkpoints ``a`` <- ``b`` <- ``c`` freeze: nothing, a layer U of
  448 MiB, a layer K of 384 MiB (qemu-io writes, VM off); deleting ``b`` leaves U unreferenced
  with the one child K, and K, the smaller, is committed into U (``qemu-img commit -p``): a merge
  that copies 384 MiB from files dropped from the page cache, so it takes long enough for its
  progress to be seen moving;
- ``w`` (1 MiB disk) with the checkpoint ``w1``, which the audited requests act on;
- a backup repository registered as the location ``repo``; an image file for a template;
- ``alice``, self-service with no grant (``v`` and ``w`` are out of her scope), and ``gina``,
  self-service granted ``checkpoint`` on ``v``; each has a password and an API token.

Checked, events: ``DELETE /api/vms/v/checkpoints/b`` answers 202 with its merge job; the job's
stream ``/api/jobs/{id}/events`` (read with ``waymark.client.Client.job_events``) sends ``job``
events in order, each a change of status, progress or step, statuses never going back, progress
never decreasing, at least 3 distinct progress values with some strictly between 0 and 1 while
the step says ``v: merging ...`` (the VM and checkpoints, not image files), the last
``job`` event completed at 1.0, then ``end``; meanwhile the all-jobs stream
``/api/jobs/events`` (opened before the delete, read in a thread) shows the same job reaching
completed. For ``alice`` that job does not exist: 404 on its events, on the job and
the same answer as for a job id nobody has, and her job list and her all-jobs stream (with
``until_idle``: it ends at once) never mention it; ``gina``, granted on ``v``, follows it.

Checked, audit: for each endpoint family (sign-in ok and failed, sign-out, users, grants,
passwords, tokens, VM settings, checkpoint create/rename/delete, backup run, job cancel,
profiles, templates, locations) one request writes exactly one entry, the newest, with the
expected user, role, how they signed in (token, session, password, none), client, action (the
route's template), target (the path's parameters), status, outcome and message; refusals (401
without or with a bad token, 403 by role, 403 without the CSRF token, 429 after five failed
sign-ins, 404 for an object outside the caller's scope: a VM, a job, its events, its cancel, a
template, a VM from a template, someone else's token) are ``denied``, a 404 for a VM that truly
does not exist and a 409 are ``failed``; GETs that succeed write nothing; ``waymark audit
--json`` on the host lists the same entries as ``GET /api/audit``; a non-administrator gets 403
on ``GET /api/audit``, itself recorded.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Waymark, qemu_io_write, served
from waymark.client import Client

MIB = 1 << 20
U_MIB, K_MIB = 448, 384  # K, the smaller, is committed into U
ADMIN = "root-admin"  # made by tests.helpers.served
ALICE_PASSWORD = "alice-password-1"
GINA_PASSWORD = "gina-password-1"
COOKIE = "waymark_session"
STATUS_RANK = {"queued": 0, "running": 1, "completed": 2, "failed": 2, "cancelled": 2}
STREAM_TIMEOUT = 120.0


@dataclass
class Home:
    wm: Waymark
    base: Path
    url: str
    tokens: dict[str, str]  # user name -> API token
    ckpt: dict[str, str] = field(default_factory=dict)  # checkpoint name -> id

    def http(self, user: str | None = ADMIN, **headers: str) -> httpx.Client:
        """A client calling as ``user`` with their token (None: no credentials)."""
        if user is not None:
            headers["Authorization"] = f"Bearer {self.tokens[user]}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def audit(self, limit: int = 20) -> list[dict[str, Any]]:
        with self.http() as http:
            resp = http.get("/api/audit", params={"limit": limit})
        assert resp.status_code == 200, resp.text
        entries: list[dict[str, Any]] = resp.json()
        return entries

    def mark(self) -> int:
        """The id of the newest audit entry (0: none yet)."""
        newest = self.audit(1)
        return int(newest[0]["id"]) if newest else 0

    def since(self, mark: int) -> list[dict[str, Any]]:
        """The entries written after ``mark``, newest first (reading them writes none)."""
        return [e for e in self.audit() if e["id"] > mark]

    def one_since(self, mark: int) -> dict[str, Any]:
        written = self.since(mark)
        assert len(written) == 1, written
        return written[0]


def active_image(wm: Waymark, vm: str) -> Path:
    return Path(wm.json("vm", "show", vm)["disks"][0]["active_image"])


def drop_cached(home: Path) -> None:
    """Write back, then evict from the page cache, every image of the home (as for layers
    written long ago: the merge then reads them from the disk)."""
    for path in (home / "vms").rglob("*.qcow2"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def add_user(wm: Waymark, name: str, role: str, password: str) -> str:
    wm.run("user", "add", name, "--role", role, "--password-stdin", input=password + "\n").ok()
    return str(wm.json("token", "create", "tests", "--user", name)["token"])


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    base = tmp_path_factory.mktemp("events-audit")
    wm = Waymark(base / "home")
    ckpt: dict[str, str] = {}
    wm("vm", "create", "v", "--disk", "2G")
    ckpt["a"] = wm.json("checkpoint", "create", "v", "--name", "a")["id"]
    qemu_io_write(active_image(wm, "v"), "qcow2", 0, U_MIB * MIB, 0x11)
    ckpt["b"] = wm.json("checkpoint", "create", "v", "--name", "b")["id"]
    qemu_io_write(active_image(wm, "v"), "qcow2", 0, K_MIB * MIB, 0x22)
    ckpt["c"] = wm.json("checkpoint", "create", "v", "--name", "c")["id"]
    wm("vm", "create", "w", "--disk", "1M")
    ckpt["w1"] = wm.json("checkpoint", "create", "w", "--name", "w1")["id"]
    wm("backup", "repo", "init", str(base / "repo"))
    wm("location", "add", "repo", str(base / "repo"), "--kind", "repository")
    (base / "spare").mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base / "tpl.qcow2"), "1M"],
                   check=True)
    wm("template", "create", "tpl", "--disk", str(base / "tpl.qcow2"))  # granted to nobody
    tokens = {"alice": add_user(wm, "alice", "self-service", ALICE_PASSWORD),
              "gina": add_user(wm, "gina", "self-service", GINA_PASSWORD)}
    wm("user", "grant", "gina", "--vm", "v", "--permission", "checkpoint")
    with served(wm) as (url, token):
        tokens[ADMIN] = token
        yield Home(wm, base, url, tokens, ckpt)


# --- server-sent events -----------------------------------------------------------------------

class AllJobs(threading.Thread):
    """Reads ``GET /api/jobs/events`` as ``user`` until a ``job`` event says ``job_id`` (once it
    is known) finished, or until ``deadline`` (seconds) passes, or ``quiet`` seconds bring no
    data; keeps every event it read."""

    def __init__(self, home: Home, user: str, deadline: float, quiet: float,
                 until_idle: bool = False) -> None:
        super().__init__(daemon=True)
        self.home, self.user, self.until_idle = home, user, until_idle
        self.deadline, self.quiet = deadline, quiet
        self.job_id: str | None = None
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.connected = threading.Event()
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        stop_at = time.monotonic() + self.deadline
        timeout = httpx.Timeout(10.0, read=self.quiet)
        try:
            with self.home.http(self.user) as http, \
                    http.stream("GET", "/api/jobs/events", timeout=timeout, params={
                        "until_idle": self.until_idle}) as resp:
                self.status = resp.status_code
                self.connected.set()
                kind = "message"
                for line in resp.iter_lines():  # (a keep-alive comment every 15 s)
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        self.events.append((kind, json.loads(line[5:])))
                    if self._done() or time.monotonic() > stop_at or (
                            self.events and self.events[-1][0] == "end"):
                        return
        except httpx.ReadTimeout:
            return  # nothing came for ``quiet`` seconds: what the caller reads as silence
        except BaseException as err:
            self.error = err
        finally:
            self.connected.set()

    def _done(self) -> bool:
        return self.job_id is not None and any(
            s["status"] in ("completed", "failed", "cancelled") for s in self.of(self.job_id))

    def of(self, job_id: str) -> list[dict[str, Any]]:
        return [data for kind, data in self.events if kind == "job" and data["id"] == job_id]


def test_job_events_follow_a_merge(home: Home) -> None:
    drop_cached(home.wm.home)
    watcher = AllJobs(home, ADMIN, deadline=STREAM_TIMEOUT, quiet=STREAM_TIMEOUT)
    watcher.start()
    assert watcher.connected.wait(30) and watcher.status == 200, watcher.error

    with home.http() as http:
        resp = http.delete("/api/vms/v/checkpoints/b")
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["deleted"] == [{"kind": "checkpoint", "id": home.ckpt["b"], "name": "b"}]
    job = body["job_id"]
    watcher.job_id = job

    client = Client(home.url, home.tokens[ADMIN], timeout=STREAM_TIMEOUT)
    try:
        events = list(client.job_events(job))
    finally:
        client.close()

    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "end" and set(kinds[:-1]) == {"job"}, kinds
    states = [data for _, data in events[:-1]]
    assert all((s["id"], s["kind"], s["vm_name"]) == (job, "merge", "v") for s in states)
    changes = [(s["status"], s["progress"], s["step"]) for s in states]
    assert all(a != b for a, b in itertools.pairwise(changes)), changes
    ranks = [STATUS_RANK[s["status"]] for s in states]
    assert ranks == sorted(ranks), changes
    progress = [float(s["progress"]) for s in states]
    assert progress == sorted(progress), changes
    assert len(set(progress)) >= 3, changes
    merging = [p for s, p in zip(states, progress, strict=True)
               if 0.0 < p < 1.0 and (s["step"] or "").startswith("v: merging ")]
    assert merging, f"the merge's progress was never seen between 0 and 1: {changes}"
    assert (states[-1]["status"], states[-1]["progress"]) == ("completed", 1.0), changes
    assert states[-1]["error"] is None and states[-1]["finished_at"]
    assert events[-1][1] == {"id": job, "status": "completed"}

    watcher.join(STREAM_TIMEOUT)
    assert not watcher.is_alive() and watcher.error is None, watcher.error
    seen = watcher.of(job)
    assert seen and seen[-1]["status"] == "completed" and seen[-1]["progress"] == 1.0, seen
    seen_progress = [s["progress"] for s in seen]
    assert seen_progress == sorted(seen_progress), seen

    with home.http() as http:
        tree = http.get("/api/vms/v/checkpoints").json()
    assert [c["name"] for c in tree["checkpoints"]] == ["a", "c"]
    assert tree["checkpoints"][1]["parent_id"] == home.ckpt["a"]


def finished_merge(home: Home) -> str:
    """The id of the merge job of ``v`` (the events test made it; if it ran alone, a merge is
    made here)."""
    with home.http() as http:
        merges = [j for j in http.get("/api/jobs", params={"everything": True}).json()
                  if j["vm_name"] == "v" and j["kind"] == "merge"]
        if not merges:
            made = http.post("/api/vms/v/checkpoints", json={"name": "extra"}).json()
            job = http.delete(f"/api/vms/v/checkpoints/{made['id']}").json()["job_id"]
            merges = [{"id": job}]
    job_id = str(merges[-1]["id"])
    client = Client(home.url, home.tokens[ADMIN])
    try:
        assert client.job_wait(job_id)["status"] == "completed"
    finally:
        client.close()
    return job_id


def test_job_out_of_scope_is_not_found(home: Home) -> None:
    job = finished_merge(home)
    nobody = "0" * 32
    with home.http("alice") as alice:
        hidden = alice.get(f"/api/jobs/{job}/events")
        missing = alice.get(f"/api/jobs/{nobody}/events")
        assert (hidden.status_code, missing.status_code) == (404, 404), hidden.text
        assert hidden.json() == json.loads(missing.text.replace(nobody, job))
        shown = alice.get(f"/api/jobs/{job}")
        assert shown.status_code == 404 and shown.json() == hidden.json()
        assert job not in {j["id"] for j in alice.get("/api/jobs", params={
            "everything": True}).json()}
    watcher = AllJobs(home, "alice", deadline=30.0, quiet=30.0, until_idle=True)
    watcher.start()
    watcher.join(60)
    assert watcher.status == 200 and watcher.error is None, watcher.error
    assert watcher.events == [("end", {"idle": True})]  # no job of hers, and none of v's

    client = Client(home.url, home.tokens["gina"])  # granted on v: sees it
    try:
        events = list(client.job_events(job))
    finally:
        client.close()
    assert events[-1] == ("end", {"id": job, "status": "completed"})


def other_token(home: Home) -> str:
    """The id of a token of ``gina``'s (outside ``alice``'s scope)."""
    with home.http() as admin:
        made = admin.post("/api/tokens", json={"name": "gina-extra", "user": "gina"})
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


# what alice may not see, each answered 404 as if it did not exist: method, path, body, action
Case = Callable[[Home], tuple[str, str, dict[str, Any] | None, str]]
OUT_OF_SCOPE: dict[str, Case] = {
    "job events": lambda home: ("GET", f"/api/jobs/{finished_merge(home)}/events", None,
                                "GET /api/jobs/{job_id}/events"),
    "job": lambda home: ("GET", f"/api/jobs/{finished_merge(home)}", None,
                         "GET /api/jobs/{job_id}"),
    "job cancel": lambda home: ("POST", f"/api/jobs/{finished_merge(home)}/cancel", None,
                                "POST /api/jobs/{job_id}/cancel"),
    "template": lambda home: ("GET", "/api/templates/tpl", None, "GET /api/templates/{name}"),
    "vm from template": lambda home: ("POST", "/api/vms", {"name": "mine", "template": "tpl"},
                                      "POST /api/vms"),
    "another's token": lambda home: ("DELETE", f"/api/tokens/{other_token(home)}", None,
                                     "DELETE /api/tokens/{token_id}"),
}


CASES = sorted(OUT_OF_SCOPE)


@pytest.mark.parametrize("case", CASES)
def test_out_of_scope_objects_are_recorded_as_denied(home: Home, case: str) -> None:
    method, path, body, action = OUT_OF_SCOPE[case](home)
    mark = home.mark()
    with home.http("alice") as alice:
        resp = alice.request(method, path, json=body)
    assert resp.status_code == 404, resp.text
    entry = home.one_since(mark)
    assert (entry["user_name"], entry["action"], entry["status"]) == ("alice", action, 404), entry
    assert entry["outcome"] == "denied", entry


# --- the audit log ----------------------------------------------------------------------------

def check(entry: dict[str, Any], *, user: str | None, role: str | None, via: str, action: str,
          target: dict[str, Any], status: int, outcome: str, message: str | None = None) -> None:
    """The entry says exactly this (``message``: a part of its message; None: no message)."""
    got = {k: entry[k] for k in ("user_name", "role", "via", "action", "target", "status",
                                 "outcome")}
    assert got == {"user_name": user, "role": role, "via": via, "action": action, "target": target,
                   "status": status, "outcome": outcome}, entry
    assert entry["method"] == action.split(maxsplit=1)[0]
    assert entry["client"] == "127.0.0.1", entry
    at = datetime.strptime(entry["at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - at).total_seconds()) < 60, entry
    if message is None:
        assert entry["message"] is None, entry
    else:
        assert message in (entry["message"] or ""), entry


class Audited:
    """One request, then the one audit entry it wrote."""

    def __init__(self, home: Home) -> None:
        self.home = home

    def __call__(self, http: httpx.Client, method: str, path: str, status: int,
                 **kwargs: Any) -> tuple[httpx.Response, dict[str, Any]]:
        mark = self.home.mark()
        resp = http.request(method, path, **kwargs)
        assert resp.status_code == status, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp, self.home.one_since(mark)


ADMIN_OK = {"user": ADMIN, "role": "administrator", "via": "token", "outcome": "ok"}


def test_sign_in_and_out_are_recorded(home: Home) -> None:
    audited = Audited(home)
    with home.http(None) as anon:
        resp, entry = audited(anon, "POST", "/api/auth/login", 200,
                              json={"name": "alice", "password": ALICE_PASSWORD})
        check(entry, user="alice", role=None, via="password", action="POST /api/auth/login",
              target={}, status=200, outcome="ok")
        cookie, csrf = resp.cookies[COOKIE], resp.json()["csrf_token"]

        _, entry = audited(anon, "POST", "/api/auth/login", 401,
                           json={"name": "alice", "password": "wrong"})
        check(entry, user="alice", role=None, via="password", action="POST /api/auth/login",
              target={}, status=401, outcome="denied", message="")
        assert entry["message"], entry

    jar = {"Cookie": f"{COOKIE}={cookie}"}
    with home.http(None, **jar) as session:
        _, entry = audited(session, "POST", "/api/vms/w/checkpoints", 403, json={"name": "x"})
        check(entry, user="alice", role="self-service", via="session",
              action="POST /api/vms/{vm}/checkpoints", target={"vm": "w"}, status=403,
              outcome="denied", message="CSRF")
        _, entry = audited(session, "POST", "/api/auth/logout", 200,
                           headers={"X-CSRF-Token": csrf})
        check(entry, user="alice", role="self-service", via="session",
              action="POST /api/auth/logout", target={}, status=200, outcome="ok")
        _, entry = audited(session, "GET", "/api/auth/me", 401)  # a refused read is recorded
        check(entry, user=None, role=None, via="none", action="GET /api/auth/me", target={},
              status=401, outcome="denied", message="signed")


def test_unauthenticated_and_forbidden_requests_are_recorded(home: Home) -> None:
    audited = Audited(home)
    with home.http(None) as anon:
        _, entry = audited(anon, "POST", "/api/vms/w/checkpoints", 401, json={"name": "x"})
        check(entry, user=None, role=None, via="none", action="POST /api/vms/{vm}/checkpoints",
              target={"vm": "w"}, status=401, outcome="denied", message="sign in")
        _, entry = audited(anon, "GET", "/api/vms", 401)
        check(entry, user=None, role=None, via="none", action="GET /api/vms", target={},
              status=401, outcome="denied", message="sign in")
    with home.http(None, Authorization="Bearer wm_nope_nope") as forged:
        _, entry = audited(forged, "DELETE", "/api/vms/w", 401)
        check(entry, user=None, role=None, via="none", action="DELETE /api/vms/{vm}",
              target={"vm": "w"}, status=401, outcome="denied", message="token")
    with home.http("alice") as alice:
        _, entry = audited(alice, "POST", "/api/users", 403,
                           json={"name": "mallory", "role": "administrator", "password": "x"})
        check(entry, user="alice", role="self-service", via="token", action="POST /api/users",
              target={}, status=403, outcome="denied", message="self-service")
        _, entry = audited(alice, "DELETE", "/api/locations/repo", 403)
        check(entry, user="alice", role="self-service", via="token",
              action="DELETE /api/locations/{name}", target={"name": "repo"}, status=403,
              outcome="denied", message="self-service")
        _, entry = audited(alice, "GET", "/api/audit", 403)
        check(entry, user="alice", role="self-service", via="token", action="GET /api/audit",
              target={}, status=403, outcome="denied", message="audit")


def test_not_found_out_of_scope_is_denied_and_truly_missing_is_failed(home: Home) -> None:
    audited = Audited(home)
    with home.http("alice") as alice:
        hidden, entry = audited(alice, "PATCH", "/api/vms/w", 404, json={"cpus": 2})
        check(entry, user="alice", role="self-service", via="token", action="PATCH /api/vms/{vm}",
              target={"vm": "w"}, status=404, outcome="denied", message="no VM is named 'w'")
        _, entry = audited(alice, "GET", "/api/vms/w/checkpoints", 404)
        check(entry, user="alice", role="self-service", via="token",
              action="GET /api/vms/{vm}/checkpoints", target={"vm": "w"}, status=404,
              outcome="denied", message="no VM is named 'w'")
        missing, entry = audited(alice, "PATCH", "/api/vms/nowhere", 404, json={"cpus": 2})
        check(entry, user="alice", role="self-service", via="token", action="PATCH /api/vms/{vm}",
              target={"vm": "nowhere"}, status=404, outcome="failed",
              message="no VM is named 'nowhere'")
        assert hidden.json() == json.loads(missing.text.replace("nowhere", "w"))
    with home.http() as admin:
        _, entry = audited(admin, "GET", "/api/vms/nowhere", 404)
        check(entry, **{**ADMIN_OK, "outcome": "failed"}, action="GET /api/vms/{vm}",
              target={"vm": "nowhere"}, status=404, message="no VM is named 'nowhere'")
        _, entry = audited(admin, "DELETE", "/api/vms/w", 409)  # needs yes: nothing changes
        check(entry, **{**ADMIN_OK, "outcome": "failed"}, action="DELETE /api/vms/{vm}",
              target={"vm": "w"}, status=409, message="checkpoint")


def test_accounts_are_recorded(home: Home) -> None:
    audited = Audited(home)
    with home.http() as admin:
        _, entry = audited(admin, "POST", "/api/users", 201,
                           json={"name": "bob", "role": "read-only", "password": "bob-pass-1"})
        check(entry, **ADMIN_OK, action="POST /api/users", target={}, status=201)
        _, entry = audited(admin, "POST", "/api/users/bob/grants", 200,
                           json={"vm": "w", "permissions": []})
        check(entry, **ADMIN_OK, action="POST /api/users/{name}/grants", target={"name": "bob"},
              status=200)
        _, entry = audited(admin, "DELETE", "/api/users/bob/grants", 200, params={"vm": "w"})
        check(entry, **ADMIN_OK, action="DELETE /api/users/{name}/grants",
              target={"name": "bob"}, status=200)
        _, entry = audited(admin, "PUT", "/api/users/bob/password", 200,
                           json={"password": "bob-pass-2"})
        check(entry, **ADMIN_OK, action="PUT /api/users/{name}/password", target={"name": "bob"},
              status=200)
        made, entry = audited(admin, "POST", "/api/tokens", 201,
                              json={"name": "bobs", "user": "bob"})
        check(entry, **ADMIN_OK, action="POST /api/tokens", target={}, status=201)
        token_id = made.json()["id"]
        assert made.json()["token"] not in json.dumps(home.audit())  # the secret is not logged
        _, entry = audited(admin, "DELETE", f"/api/tokens/{token_id}", 200)
        check(entry, **ADMIN_OK, action="DELETE /api/tokens/{token_id}",
              target={"token_id": token_id}, status=200)
        _, entry = audited(admin, "DELETE", "/api/users/bob", 200)
        check(entry, **ADMIN_OK, action="DELETE /api/users/{name}", target={"name": "bob"},
              status=200)
        _, entry = audited(admin, "DELETE", "/api/users/bob", 404)
        check(entry, **{**ADMIN_OK, "outcome": "failed"}, action="DELETE /api/users/{name}",
              target={"name": "bob"}, status=404, message="bob")
    with home.http("alice") as alice:  # anyone's own password and tokens
        _, entry = audited(alice, "POST", "/api/tokens", 201, json={"name": "own"})
        check(entry, user="alice", role="self-service", via="token", action="POST /api/tokens",
              target={}, status=201, outcome="ok")


def test_vms_checkpoints_backups_and_jobs_are_recorded(home: Home) -> None:
    audited = Audited(home)
    with home.http() as admin:
        _, entry = audited(admin, "PATCH", "/api/vms/w", 200, json={"cpus": 2})
        check(entry, **ADMIN_OK, action="PATCH /api/vms/{vm}", target={"vm": "w"}, status=200)
        made, entry = audited(admin, "POST", "/api/vms/w/checkpoints", 201, json={"name": "w2"})
        check(entry, **ADMIN_OK, action="POST /api/vms/{vm}/checkpoints", target={"vm": "w"},
              status=201)
        ckpt = made.json()["id"]
        _, entry = audited(admin, "PATCH", f"/api/vms/w/checkpoints/{ckpt}", 200,
                           json={"name": "w2-renamed"})
        check(entry, **ADMIN_OK, action="PATCH /api/vms/{vm}/checkpoints/{ckpt}",
              target={"vm": "w", "ckpt": ckpt}, status=200)
        gone, entry = audited(admin, "DELETE", "/api/vms/w/checkpoints/w2-renamed", 202)
        check(entry, **ADMIN_OK, action="DELETE /api/vms/{vm}/checkpoints/{ckpt}",
              target={"vm": "w", "ckpt": "w2-renamed"}, status=202)
        job = gone.json()["job_id"]
        client = Client(home.url, home.tokens[ADMIN])
        try:
            assert client.job_wait(job)["status"] == "completed"
        finally:
            client.close()
        _, entry = audited(admin, "POST", f"/api/jobs/{job}/cancel", 200)
        check(entry, **ADMIN_OK, action="POST /api/jobs/{job_id}/cancel", target={"job_id": job},
              status=200)
        _, entry = audited(admin, "POST", "/api/vms/w/backups", 201,
                           json={"repository": "repo"})
        check(entry, **ADMIN_OK, action="POST /api/vms/{vm}/backups", target={"vm": "w"},
              status=201)
        _, entry = audited(admin, "POST", "/api/vms/w/backups", 404,
                           json={"repository": "nope"})
        check(entry, **{**ADMIN_OK, "outcome": "failed"}, action="POST /api/vms/{vm}/backups",
              target={"vm": "w"}, status=404, message="nope")


def test_library_settings_are_recorded(home: Home) -> None:
    audited = Audited(home)
    with home.http() as admin:
        _, entry = audited(admin, "POST", "/api/profiles", 201, json={"name": "p1", "cpus": 2})
        check(entry, **ADMIN_OK, action="POST /api/profiles", target={}, status=201)
        _, entry = audited(admin, "PATCH", "/api/profiles/p1", 200, json={"cpus": 3})
        check(entry, **ADMIN_OK, action="PATCH /api/profiles/{name}", target={"name": "p1"},
              status=200)
        _, entry = audited(admin, "POST", "/api/templates", 201,
                           json={"name": "t1", "profile": "p1",
                                 "disks": [str(home.base / "tpl.qcow2")]})
        check(entry, **ADMIN_OK, action="POST /api/templates", target={}, status=201)
        _, entry = audited(admin, "PATCH", "/api/templates/t1", 200,
                           json={"checkpoint_type": "standard"})
        check(entry, **ADMIN_OK, action="PATCH /api/templates/{name}", target={"name": "t1"},
              status=200)
        _, entry = audited(admin, "DELETE", "/api/templates/t1", 200)
        check(entry, **ADMIN_OK, action="DELETE /api/templates/{name}", target={"name": "t1"},
              status=200)
        _, entry = audited(admin, "DELETE", "/api/profiles/p1", 200)
        check(entry, **ADMIN_OK, action="DELETE /api/profiles/{name}", target={"name": "p1"},
              status=200)
        _, entry = audited(admin, "POST", "/api/locations", 201,
                           json={"name": "spare", "kind": "export",
                                 "path": str(home.base / "spare")})
        check(entry, **ADMIN_OK, action="POST /api/locations", target={}, status=201)
        _, entry = audited(admin, "DELETE", "/api/locations/spare", 200)
        check(entry, **ADMIN_OK, action="DELETE /api/locations/{name}", target={"name": "spare"},
              status=200)


def test_reads_are_not_recorded(home: Home) -> None:
    mark = home.mark()
    with home.http() as admin:
        for path in ("/api/vms", "/api/vms/w", "/api/vms/w/checkpoints",
                     f"/api/vms/w/checkpoints/{home.ckpt['w1']}", "/api/jobs", "/api/users",
                     "/api/tokens", "/api/roles", "/api/profiles", "/api/templates",
                     "/api/locations", "/api/auth/me", "/api/audit", "/api/openapi.json"):
            resp = admin.get(path)
            assert resp.status_code == 200, f"{path}: {resp.text}"
        assert admin.get("/api/vms/w/backups", params={"repository": "repo"}).status_code == 200
    with home.http("alice") as alice:
        assert alice.get("/api/vms").json() == []
        assert alice.get("/api/auth/me").status_code == 200
    with home.http("gina") as gina:
        assert [v["name"] for v in gina.get("/api/vms").json()] == ["v"]
        assert gina.get("/api/vms/v/checkpoints").status_code == 200
    assert home.since(mark) == []


def test_host_cli_shows_the_same_entries(home: Home) -> None:
    with home.http("alice") as alice:  # at least one refusal and one change in the window
        assert alice.get("/api/audit").status_code == 403
        assert alice.post("/api/tokens", json={"name": "again"}).status_code == 201
    over_api = home.audit(limit=30)
    on_host = home.wm.json("audit", "--limit", "30")
    assert on_host == over_api
    assert [e["outcome"] for e in on_host[:2]] == ["ok", "denied"]
    denied = home.wm.json("audit", "--user", "alice", "--outcome", "denied", "--limit", "1000")
    assert denied and all((e["user_name"], e["outcome"]) == ("alice", "denied") for e in denied)
    assert denied == [e for e in home.audit(limit=1000)
                      if (e["user_name"], e["outcome"]) == ("alice", "denied")]


def test_too_many_sign_ins_are_recorded(tmp_path: Path) -> None:
    """A home and a server of its own: the limit also holds for the client's address, which
    would lock the module's other sign-ins out for five minutes."""
    wm = Waymark(tmp_path / "home")
    with served(wm) as (url, _token), httpx.Client(base_url=url, timeout=60) as anon:
        def login(password: str) -> httpx.Response:
            return anon.post("/api/auth/login", json={"name": ADMIN, "password": password})

        for _ in range(5):
            assert login("wrong").status_code == 401
        assert login("test-password").status_code == 429  # the right one, too
        entries = Waymark(wm.home).json("audit", "--limit", "100")
    assert [(e["status"], e["outcome"]) for e in entries] == [(429, "denied")] + [
        (401, "denied")] * 5
    for entry in entries:
        check(entry, user=ADMIN, role=None, via="password", action="POST /api/auth/login",
              target={}, status=entry["status"], outcome="denied", message="")
    assert "too many" in entries[0]["message"]
