"""Quotas through a real ``waymark serve``: a self-service user's VMs, vCPUs, memory, disk and
checkpoints stay within what an administrator set, also under parallel requests; memory beyond
the host's is refused for everyone; administrators are not limited; the CLI sets and shows
quotas.

One served home for the module: an administrator (``admin``), a template ``tpl`` (a 1 MiB disk,
profile ``small``: 512 MiB, 1 vCPU); each test adds its own self-service users (granted ``tpl``)
with their own quotas through the CLI on the same home, and calls the API with their tokens.
A refusal is checked to change nothing: every catalog table (the audit log and web sessions
aside) and the files under the home's ``vms`` folder are the same before and after.
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Waymark, query, serve_process

EXIT_INVALID = 2
SKIPPED_TABLES = {"alembic_version", "audit", "web_sessions", "api_tokens"}


@dataclass
class Served:
    url: str
    wm: Waymark
    tokens: dict[str, str]

    def call(self, who: str, method: str, path: str, body: Any = None) -> httpx.Response:
        with httpx.Client(base_url=self.url, timeout=60, headers={
                "Authorization": f"Bearer {self.tokens[who]}"}) as http:
            return http.request(method, path, json=body)

    def ok(self, who: str, method: str, path: str, body: Any = None) -> Any:
        resp = self.call(who, method, path, body)
        assert resp.is_success, f"{method} {path} as {who}: {resp.status_code} {resp.text}"
        return resp.json()

    def user(self, name: str, *quota: str) -> None:
        """A self-service user granted ``tpl``, with a token and ``waymark user quota`` args."""
        self.wm.run("user", "add", name, "--role", "self-service", "--password-stdin",
                    input=f"{name}-password-1\n").ok()
        self.wm("user", "grant", name, "--template", "tpl")
        if quota:
            self.wm("user", "quota", name, *quota)
        self.tokens[name] = self.wm.json("token", "create", "quota", "--user", name)["token"]

    def new_vm(self, who: str, name: str, **settings: Any) -> httpx.Response:
        return self.call(who, "POST", "/api/vms", {"name": name, "template": "tpl", **settings})

    def snapshot(self) -> dict[str, list[str]]:
        """The catalog (but the audit log, sessions and token use) and the VMs' files."""
        con = sqlite3.connect(self.wm.home / "catalog.db")
        try:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE "
                                                "type = 'table'")]
            state = {t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}"')))
                     for t in tables if t not in SKIPPED_TABLES and not t.startswith("sqlite_")}
        finally:
            con.close()
        state["files"] = sorted(str(p) for p in (self.wm.home / "vms").rglob("*"))
        return state


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("quotas")
    wm = Waymark(base / "home")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(base / "base.qcow2"), "1M"],
                   check=True, capture_output=True)
    wm("profile", "create", "small", "--memory", "512M", "--cpus", "1",
       "--automatic-checkpoints", "off")
    wm("template", "create", "tpl", "--profile", "small", "--disk", str(base / "base.qcow2"))
    wm.run("user", "add", "admin", "--role", "administrator", "--password-stdin",
           input="admin-password-1\n").ok()
    tokens = {"admin": wm.json("token", "create", "quota", "--user", "admin")["token"]}
    with serve_process(wm) as url:
        yield Served(url, wm, tokens)
    log = (base / "serve.log").read_text()
    assert "Traceback" not in log, log


def refused(resp: httpx.Response, status: int, code: str, *says: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == code, error
    for text in says:
        assert text in error["message"] + (error["hint"] or ""), error
    return error


def owned(served: Served, user: str) -> list[str]:
    return sorted(n for (n,) in query(served.wm.home, "SELECT vms.name FROM vms JOIN users ON "
                                      "users.id = vms.owner_id WHERE users.name = ?", user))


def host_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no MemTotal")


# --- VMs, vCPUs, memory -----------------------------------------------------------------------

def test_the_third_vm_beyond_a_quota_of_two_is_refused_with_nothing_created(
        served: Served) -> None:
    served.user("alice", "--vms", "2", "--cpus", "4", "--memory", "2G")
    served.ok("alice", "POST", "/api/vms", {"name": "alice-1", "template": "tpl"})
    served.ok("alice", "POST", "/api/vms", {"name": "alice-2", "template": "tpl", "cpus": 2})
    before = served.snapshot()
    error = refused(served.new_vm("alice", "alice-3"), 409, "quota_exceeded",
                    "alice's quota of 2 VMs", "hold 2", "1 more", "administrator",
                    "waymark user quota alice --vms")
    assert error["hint"], error
    assert served.snapshot() == before
    assert owned(served, "alice") == ["alice-1", "alice-2"]
    shown = served.ok("alice", "GET", "/api/users/alice/quota")  # a user reads their own
    assert shown["quota"]["vms"] == 2 and shown["usage"] == {
        "vms": 2, "cpus": 3, "memory": 1 << 30, "disk": 2 << 20, "checkpoints": 0}


def test_raising_vcpus_or_memory_beyond_the_quota_is_refused_lowering_is_not(
        served: Served) -> None:
    served.user("bea", "--cpus", "3", "--memory", "1G")
    served.ok("bea", "POST", "/api/vms", {"name": "bea-1", "template": "tpl", "cpus": 2})
    refused(served.new_vm("bea", "bea-2", cpus=2), 409, "quota_exceeded",
            "quota of 3 vCPUs", "hold 2", "2 more")
    refused(served.new_vm("bea", "bea-2", memory="1G"), 409, "quota_exceeded",
            "quota of 1.0 GiB memory", "hold 512.0 MiB")
    before = served.snapshot()
    refused(served.call("bea", "PATCH", "/api/vms/bea-1", {"cpus": 4}), 409, "quota_exceeded",
            "quota of 3 vCPUs", "2 more")
    refused(served.call("bea", "PATCH", "/api/vms/bea-1", {"memory": "2G"}), 409,
            "quota_exceeded", "1.0 GiB memory")
    assert served.snapshot() == before
    served.ok("bea", "PATCH", "/api/vms/bea-1", {"cpus": 3, "memory": "1G"})  # up to it
    served.ok("bea", "PATCH", "/api/vms/bea-1", {"cpus": 1})  # lowering
    # administrators are not limited, through the API or the CLI (the host's administrator)
    assert served.ok("admin", "PATCH", "/api/vms/bea-1", {"cpus": 8})["cpus"] == 8
    served.wm("vm", "set", "bea-1", "--memory", "2G")
    served.ok("admin", "PATCH", "/api/vms/bea-1", {"memory": "512M"})
    # above a quota (an administrator raised it past): lowering still works, raising does not
    served.ok("bea", "PATCH", "/api/vms/bea-1", {"cpus": 6})
    refused(served.call("bea", "PATCH", "/api/vms/bea-1", {"cpus": 7}), 409, "quota_exceeded")


def test_disk_counts_the_virtual_sizes_of_the_vms_disks(served: Served) -> None:
    served.user("dora", "--disk", "2M")
    served.ok("dora", "POST", "/api/vms", {"name": "dora-1", "template": "tpl"})
    served.ok("dora", "POST", "/api/vms", {"name": "dora-2", "template": "tpl"})
    before = served.snapshot()
    refused(served.new_vm("dora", "dora-3"), 409, "quota_exceeded", "quota of 2.0 MiB disk",
            "hold 2.0 MiB", "1.0 MiB more")
    assert served.snapshot() == before


def test_parallel_creates_never_pass_the_quota_together(served: Served) -> None:
    served.user("carl", "--vms", "3")
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda n: served.new_vm("carl", f"carl-{n}"), range(10)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 3 + [409] * 7, [r.text for r in answers]
    assert all(r.json()["error"]["code"] == "quota_exceeded" for r in answers
               if r.status_code == 409), [r.text for r in answers]
    assert len(owned(served, "carl")) == 3
    assert served.ok("admin", "GET", "/api/users/carl/quota")["usage"]["vms"] == 3


@contextmanager
def owner_writes(home: Path) -> Iterator[list[tuple[str, str, str | None]]]:
    """Every write of a VM's owner while inside, as (how, VM name, owner id): SQLite triggers
    on the catalog record each INSERT of a VM and each UPDATE of its owner; removed after."""
    con = sqlite3.connect(home / "catalog.db")
    try:
        con.executescript("""
            CREATE TABLE test_owner_writes (how TEXT, name TEXT, owner_id TEXT);
            CREATE TRIGGER test_vm_inserted AFTER INSERT ON vms BEGIN
                INSERT INTO test_owner_writes VALUES ('insert', NEW.name, NEW.owner_id); END;
            CREATE TRIGGER test_owner_updated AFTER UPDATE OF owner_id ON vms BEGIN
                INSERT INTO test_owner_writes VALUES ('update', NEW.name, NEW.owner_id); END;
        """)
        writes: list[tuple[str, str, str | None]] = []
        yield writes
        writes += con.execute("SELECT how, name, owner_id FROM test_owner_writes").fetchall()
    finally:
        con.executescript("DROP TRIGGER IF EXISTS test_vm_inserted; "
                          "DROP TRIGGER IF EXISTS test_owner_updated; "
                          "DROP TABLE IF EXISTS test_owner_writes;")
        con.close()


def test_a_vm_made_through_the_api_is_inserted_with_its_owner(served: Served) -> None:
    """The VM's row and its owner are one write, so no crash leaves an ownerless VM (that a
    parallel create would not count against the quota either)."""
    served.user("olga", "--vms", "2")
    [(olga,)] = query(served.wm.home, "SELECT id FROM users WHERE name = 'olga'")
    with owner_writes(served.wm.home) as writes:
        served.ok("olga", "POST", "/api/vms", {"name": "olga-1", "template": "tpl"})
    assert writes == [("insert", "olga-1", olga)]
    assert owned(served, "olga") == ["olga-1"]


# --- checkpoints ------------------------------------------------------------------------------

def test_checkpoints_count_per_owner_also_in_parallel(served: Served) -> None:
    served.user("cleo", "--checkpoints", "3")
    for name in ("cleo-1", "cleo-2"):
        served.ok("cleo", "POST", "/api/vms", {"name": name, "template": "tpl"})
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: served.call(
            "cleo", "POST", f"/api/vms/cleo-{1 + n % 2}/checkpoints", {"name": f"c{n}"}),
            range(8)))
    assert sorted(r.status_code for r in answers) == [201] * 3 + [409] * 5, \
        [r.text for r in answers]
    held = query(served.wm.home, "SELECT count(*) FROM checkpoints JOIN vms ON vms.id = "
                 "checkpoints.vm_id WHERE vms.name LIKE 'cleo-%'")
    assert held == [(3,)]
    before = served.snapshot()
    refused(served.call("cleo", "POST", "/api/vms/cleo-1/checkpoints", {}), 409,
            "quota_exceeded", "quota of 3 checkpoints", "hold 3")
    assert served.snapshot() == before
    served.ok("admin", "POST", "/api/vms/cleo-1/checkpoints", {})  # not limited


# --- applying a checkpoint, restoring a backup in place ---------------------------------------

def raised(served: Served, vm: str) -> None:
    """An administrator gives ``vm`` 4 vCPUs and 1 GiB, past its owner's quota (the test keeps
    them in a checkpoint or a backup point, then :func:`lowered` fits the quota again)."""
    served.ok("admin", "PATCH", f"/api/vms/{vm}", {"cpus": 4, "memory": "1G"})


def lowered(served: Served, vm: str) -> None:
    served.ok("admin", "PATCH", f"/api/vms/{vm}", {"cpus": 1, "memory": "512M"})


def cpus(served: Served, vm: str) -> int:
    return int(served.ok("admin", "GET", f"/api/vms/{vm}")["cpus"])


def test_applying_a_checkpoint_with_larger_settings_is_checked_against_the_quota(
        served: Served) -> None:
    served.user("hal", "--cpus", "2", "--memory", "768M")
    served.ok("hal", "POST", "/api/vms", {"name": "hal-1", "template": "tpl"})
    small = served.ok("hal", "POST", "/api/vms/hal-1/checkpoints", {"name": "small"})["id"]
    raised(served, "hal-1")
    big = served.ok("admin", "POST", "/api/vms/hal-1/checkpoints", {"name": "big"})["id"]
    lowered(served, "hal-1")
    before = served.snapshot()
    for mode in ("discard_current", "checkpoint_first"):
        refused(served.call("hal", "POST", f"/api/vms/hal-1/checkpoints/{big}/apply",
                            {"mode": mode}), 409, "quota_exceeded", "quota of 2 vCPUs",
                "hold 1", "3 more")
        assert served.snapshot() == before
    served.ok("hal", "POST", f"/api/vms/hal-1/checkpoints/{small}/apply",
              {"mode": "discard_current"})  # the same settings: nothing grows
    served.ok("admin", "POST", f"/api/vms/hal-1/checkpoints/{big}/apply",
              {"mode": "discard_current"})  # administrators are not limited
    assert cpus(served, "hal-1") == 4
    served.ok("hal", "POST", f"/api/vms/hal-1/checkpoints/{small}/apply",
              {"mode": "discard_current"})  # lowering, from above the quota
    assert cpus(served, "hal-1") == 1


def test_restoring_a_backup_with_larger_settings_in_place_is_checked_against_the_quota(
        served: Served, tmp_path: Path) -> None:
    served.wm("backup", "repo", "init", str(tmp_path / "repo"))
    served.wm("location", "add", "quota-repo", str(tmp_path / "repo"), "--kind", "repository")
    served.user("ida", "--cpus", "2", "--memory", "768M")
    served.ok("ida", "POST", "/api/vms", {"name": "ida-1", "template": "tpl"})
    raised(served, "ida-1")
    [outcome] = served.wm.json("backup", "run", "ida-1", "--repo", str(tmp_path / "repo"))
    point = outcome["point"]["id"]
    lowered(served, "ida-1")
    before = served.snapshot()
    for mode in ("discard_current", "checkpoint_first"):
        refused(served.call("ida", "POST", f"/api/vms/ida-1/backups/{point}/restore",
                            {"repository": "quota-repo", "mode": mode}), 409,
                "quota_exceeded", "quota of 2 vCPUs", "3 more")
        assert served.snapshot() == before
    restored = served.ok("admin", "POST", f"/api/vms/ida-1/backups/{point}/restore",
                         {"repository": "quota-repo", "mode": "discard_current"})
    assert restored["point_id"] == point and cpus(served, "ida-1") == 4


# --- the host's memory ------------------------------------------------------------------------

def test_memory_beyond_the_hosts_is_refused_for_administrators_too(served: Served) -> None:
    too_much = f"{(host_memory() >> 30) + 1}G"
    served.ok("admin", "POST", "/api/vms", {"name": "admin-vm", "template": "tpl"})
    before = served.snapshot()
    refused(served.new_vm("admin", "admin-huge", memory=too_much), 400, "invalid_input",
            "more than this host has")
    refused(served.call("admin", "PATCH", "/api/vms/admin-vm", {"memory": too_much}), 400,
            "invalid_input", "more than this host has")
    cli = served.wm.run("vm", "create", "cli-huge", "--memory", too_much)
    assert cli.returncode == EXIT_INVALID and "more than this host has" in cli.stderr
    assert served.snapshot() == before


# --- setting and reading quotas ---------------------------------------------------------------

def test_the_cli_sets_and_shows_quotas_and_role_defaults(served: Served) -> None:
    served.user("cora")
    shown = served.wm.json("user", "show", "cora")
    assert shown["quota"] == dict.fromkeys(("vms", "cpus", "memory", "disk", "checkpoints"))
    set_ = served.wm.json("user", "quota", "cora", "--vms", "4", "--memory", "8G", "--disk",
                          "100G")
    assert (set_["quota"]["vms"], set_["quota"]["memory"], set_["quota"]["disk"]) == \
        (4, 8 << 30, 100 << 30)
    served.wm("user", "quota", "--role", "self-service", "--checkpoints", "7", "--vms", "9")
    [listed] = [u for u in served.wm.json("user", "list") if u["name"] == "cora"]
    assert listed["quota"] == {"vms": 4, "cpus": None, "memory": 8 << 30, "disk": 100 << 30,
                               "checkpoints": 7}  # her own, else the role's
    assert listed["usage"]["vms"] == 0
    assert served.wm.json("user", "quota", "cora", "--vms", "none")["quota"]["vms"] == 9
    text = served.wm("user", "show", "cora").stdout
    assert "checkpoints  0 of 7" in text and "memory       0 B of 8.0 GiB" in text
    bad = served.wm.run("user", "quota", "cora", "--cpus", "lots")
    assert bad.returncode == EXIT_INVALID and "--cpus" in bad.stderr
    served.wm("user", "quota", "--role", "self-service", "--checkpoints", "none", "--vms",
              "none")


def test_the_api_sets_quotas_for_administrators_and_shows_users_their_own(
        served: Served) -> None:
    served.user("finn")
    served.user("gwen")
    put = served.ok("admin", "PUT", "/api/users/finn/quota", {"vms": 1, "memory": "1G"})
    assert put["quota"]["vms"] == 1 and put["quota"]["memory"] == 1 << 30
    assert served.ok("finn", "GET", "/api/users/finn/quota")["own"]["memory"] == 1 << 30
    before = served.snapshot()
    refused(served.call("gwen", "GET", "/api/users/finn/quota"), 403, "forbidden")
    refused(served.call("finn", "PUT", "/api/users/finn/quota", {"vms": 99}), 403, "forbidden")
    refused(served.call("admin", "PUT", "/api/users/finn/quota", {"vms": -1}), 400,
            "invalid_input")
    refused(served.call("admin", "PUT", "/api/users/finn/quota", {"memory": "lots"}), 400,
            "invalid_input", "memory quota")
    refused(served.call("admin", "PUT", "/api/users/nobody/quota", {}), 404, "not_found")
    assert served.snapshot() == before
    # PUT replaces the whole quota
    assert served.ok("admin", "PUT", "/api/users/finn/quota", {"cpus": 2})["own"] == {
        "vms": None, "cpus": 2, "memory": None, "disk": None, "checkpoints": None}
    served.ok("admin", "PUT", "/api/roles/self-service/quota", {"vms": 0})
    try:
        refused(served.new_vm("gwen", "gwen-1"), 409, "quota_exceeded", "quota of 0 VMs")
    finally:
        served.ok("admin", "PUT", "/api/roles/self-service/quota", {})
    served.ok("gwen", "POST", "/api/vms", {"name": "gwen-1", "template": "tpl"})
    finn = served.wm.json("user", "show", "finn")["id"]
    served.wm("user", "remove", "finn")
    assert query(served.wm.home, "SELECT * FROM quotas WHERE subject = ?", finn) == []
    assert served.call("admin", "GET", "/api/users/finn/quota").status_code == 404
