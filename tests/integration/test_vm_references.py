"""A VM reference is resolved once, by the face, and an exact full id always wins.

The attack (issue 17, finding 1): a self-service user who may see VM X (any grant) makes her own
VM whose *name* is X's full id. Every use case used to resolve the reference again, name
first, so whatever the owner, an administrator or a schedule then did to X by its id landed on
hers. Here, through a real ``waymark serve`` and the real CLI (locally as root, and through
``--server``), every kind of action on X by id lands on X and her VM stays as it was; the backup
repository finds X's points by X's id, so ``backup verify`` of X passes.

Her VM's name is X's id as the API takes it today; where a name grammar refuses id-shaped names,
it is given that name in the catalog directly (as an older catalog may hold it): either way the
fix must hold.

Then the existence oracles (finding 15): ``eve``, a self-service user with no grant, learns
nothing about what she may not see: a VM name another user has is hers to take (names are
unique per owner), a job id prefix is looked up among her jobs only, and her exports go into a
folder of her own in the export location.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import RemoteWaymark, Waymark, query, serve_process

USERS = {"admin": "administrator", "owner": "self-service", "mallory": "self-service",
         "eve": "self-service"}


@dataclass
class Home:
    base: Path
    wm: Waymark
    url: str
    tokens: dict[str, str]
    x: str = ""  # the real VM's id (owner's)
    hers: str = ""  # mallory's VM, named ``x``

    @property
    def repo(self) -> Path:
        return self.base / "repo"

    def http(self, who: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {self.tokens[who]}"})

    def call(self, who: str, method: str, path: str, body: Any = None,
             params: dict[str, Any] | None = None) -> httpx.Response:
        with self.http(who) as client:
            return client.request(method, path, json=body, params=params)

    def ok(self, who: str, method: str, path: str, body: Any = None,
           params: dict[str, Any] | None = None) -> Any:
        resp = self.call(who, method, path, body, params)
        assert resp.is_success, f"{who}: {method} {path}: {resp.status_code} {resp.text}"
        return resp.json()

    def remote(self, who: str) -> RemoteWaymark:
        return RemoteWaymark(self.wm.home, self.url, self.tokens[who])


def _setup(base: Path, wm: Waymark) -> dict[str, str]:
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(base / "base.qcow2"), "1M"],
                   check=True, capture_output=True)
    wm("profile", "create", "small", "--memory", "128M", "--cpus", "1",
       "--automatic-checkpoints", "off")
    wm("template", "create", "tpl", "--profile", "small", "--disk", str(base / "base.qcow2"))
    wm("backup", "repo", "init", str(base / "repo"))
    wm("location", "add", "repo", str(base / "repo"), "--kind", "repository")
    (base / "exports").mkdir()
    wm("location", "add", "exports", str(base / "exports"), "--kind", "export")
    for name, role in USERS.items():
        wm.run("user", "add", name, "--role", role, "--password-stdin",
               input=f"{name}-password-1\n").ok()
    for name in ("owner", "mallory", "eve"):
        wm("user", "grant", name, "--template", "tpl")
    return {name: wm.json("token", "create", "t", "--user", name)["token"] for name in USERS}


def _hostile_vm(home: Home) -> str:
    """Mallory's VM named X's full id: through the API where that name is accepted, else
    renamed so in the catalog (an old catalog may hold such a name)."""
    made = home.call("mallory", "POST", "/api/vms", {"name": home.x, "template": "tpl"})
    if made.status_code == 201:
        return str(made.json()["id"])
    assert made.status_code == 400, made.text  # a name grammar refuses it
    vm_id = str(home.ok("mallory", "POST", "/api/vms", {"name": "hers", "template": "tpl"})["id"])
    with sqlite3.connect(home.wm.home / "catalog.db") as db:
        db.execute("UPDATE vms SET name = ? WHERE id = ?", (home.x, vm_id))
    return vm_id


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    base = tmp_path_factory.mktemp("vm-refs")
    wm = Waymark(base / "home")
    tokens = _setup(base, wm)
    with serve_process(wm) as url:
        found = Home(base, wm, url, tokens)
        found.x = found.ok("owner", "POST", "/api/vms", {"name": "vm-x", "template": "tpl"})["id"]
        wm("user", "grant", "mallory", "--vm", found.x)  # she may see X (no permission)
        found.hers = _hostile_vm(found)
        assert found.ok("mallory", "GET", f"/api/vms/{found.hers}")["name"] == found.x
        # a point of hers in the repository too (she owns her VM: she may back it up)
        found.ok("mallory", "POST", f"/api/vms/{found.hers}/backups", {"repository": "repo"})
        yield found
    log = (base / "serve.log").read_text()
    assert "Traceback" not in log, log


def _rows(home: Home, vm_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """Everything the catalog holds about one VM."""
    return {table: query(home.wm.home, f"SELECT * FROM {table} WHERE {key} = ?", vm_id)
            for table, key in (("vms", "id"), ("disks", "vm_id"), ("images", "vm_id"),
                               ("checkpoints", "vm_id"), ("jobs", "vm_id"),
                               ("backup_bases", "vm_id"))}


def _points(home: Home, vm_id: str) -> list[str]:
    folder = home.repo / "vms" / vm_id / "points"
    return sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []


def _checkpoint_names(home: Home, vm_id: str) -> list[str]:
    return sorted(n for (n,) in query(home.wm.home,
                                      "SELECT name FROM checkpoints WHERE vm_id = ?", vm_id))


def _settings(home: Home, vm_id: str) -> tuple[Any, ...]:
    return query(home.wm.home, "SELECT max_checkpoints, config FROM vms WHERE id = ?", vm_id)[0]


def _names_x(error: str, home: Home) -> None:
    """A refusal that names the real VM, not hers."""
    assert "'vm-x'" in error and repr(home.x) not in error, error


def _api_owner(home: Home) -> dict[str, Any]:
    """The owner, through the API; returns one point of X."""
    x = home.x
    made = home.ok("owner", "POST", f"/api/vms/{x}/checkpoints", {"name": "by-owner"})
    assert made["vm_id"] == x
    assert home.ok("owner", "PATCH", f"/api/vms/{x}", {"max_checkpoints": 7})["id"] == x
    resume = home.call("owner", "POST", f"/api/vms/{x}/resume")
    assert resume.status_code == 409, resume.text  # X is off: the refusal is about X
    _names_x(resume.json()["error"]["message"], home)
    point: dict[str, Any] = home.ok("owner", "POST", f"/api/vms/{x}/backups",
                                    {"repository": "repo"})
    assert point["vm_id"] == x and point["vm_name"] == "vm-x"
    assert [p["vm_id"] for p in home.ok("owner", "GET", f"/api/vms/{x}/backups",
                                        params={"repository": "repo"})] == [x]
    return point


def _api_others(home: Home) -> None:
    """Mallory (X's id is X to her too; her own VM she names by its id) and an
    administrator, through the API."""
    x = home.x
    assert home.ok("mallory", "GET", f"/api/vms/{x}")["name"] == "vm-x"
    refused = home.call("mallory", "POST", f"/api/vms/{x}/checkpoints", {"name": "by-her"})
    assert refused.status_code == 403, refused.text
    assert home.ok("admin", "POST", f"/api/vms/{x}/checkpoints",
                   {"name": "by-admin"})["vm_id"] == x
    assert home.ok("admin", "GET", f"/api/vms/{x}")["name"] == "vm-x"
    pause = home.call("admin", "POST", f"/api/vms/{x}/pause")
    assert pause.status_code == 409, pause.text
    _names_x(pause.json()["error"]["message"], home)
    assert home.ok("admin", "POST", f"/api/vms/{x}/backups",
                   {"repository": "repo"})["vm_id"] == x


def _cli(home: Home) -> None:
    """The CLI on the host (as root), and through the server (as the owner)."""
    x, wm = home.x, home.wm
    assert wm.json("checkpoint", "create", x, "--name", "by-cli")["vm_id"] == x
    assert wm.json("vm", "set", x, "--max-checkpoints", "9")["id"] == x
    resumed = wm.run("vm", "resume", x)  # X is off: the refusal is about X
    assert resumed.returncode != 0
    _names_x(resumed.stderr, home)
    [ran] = wm.json("backup", "run", x, "--repo", str(home.repo))
    assert ran["ok"] and ran["point"]["vm_id"] == x, ran
    assert wm.json("vm", "show", x)["name"] == "vm-x"
    remote = home.remote("owner")
    assert remote.json("checkpoint", "create", x, "--name", "by-remote")["vm_id"] == x
    assert remote.json("checkpoint", "list", x)["vm_id"] == x
    assert remote.remote_calls == 2


def _schedule(home: Home) -> None:
    """A schedule names X by its id and runs on X."""
    x, wm = home.x, home.wm
    wm("backup", "schedule", "add", "nightly", "--vm", x, "--repo", str(home.repo),
       "--daily", "03:00")
    assert query(wm.home, "SELECT vms FROM schedules")[0][0] == f'["{x}"]'
    with sqlite3.connect(wm.home / "catalog.db") as db:
        db.execute("UPDATE schedules SET next_due_at = '2000-01-01 00:00:00.000000'")
    [run] = wm.json("backup", "run-due")
    assert [(v["vm_id"], v["vm_name"], v["error"]) for v in run["vms"]] == [(x, "vm-x", None)], \
        run


def _landed_on_x(home: Home, point: dict[str, Any]) -> None:
    x, wm = home.x, home.wm
    assert _checkpoint_names(home, x) == ["by-admin", "by-cli", "by-owner", "by-remote"]
    assert _settings(home, x)[0] == 9
    assert len(_points(home, x)) == 4
    listed = wm.json("backup", "list", x, "--repo", str(home.repo))
    assert {p["vm_id"] for p in listed} == {x} and len(listed) == 4
    verified = wm.json("backup", "verify", x, "--repo", str(home.repo))
    assert [(r["vm_name"], r["problems"]) for r in verified] == [("vm-x", [])] * 4, verified
    checked = home.ok("owner", "POST", f"/api/vms/{x}/backups/{point['id']}/verify",
                      {"repository": "repo"})
    assert [r["problems"] for r in checked] == [[]]


def test_actions_on_a_vm_by_its_id_never_land_on_a_vm_named_so(home: Home) -> None:
    hers_before, her_points = _rows(home, home.hers), _points(home, home.hers)
    assert len(her_points) == 1
    point = _api_owner(home)
    _api_others(home)
    _cli(home)
    _schedule(home)
    _landed_on_x(home, point)
    assert _rows(home, home.hers) == hers_before  # hers is as it was
    assert _points(home, home.hers) == her_points
    assert _checkpoint_names(home, home.hers) == []
    # deleting X by id deletes X, not hers
    deleted = home.ok("admin", "DELETE", f"/api/vms/{home.x}", params={"yes": True})
    assert deleted == {"deleted": [{"kind": "vm", "id": home.x, "name": "vm-x"}]}
    assert query(home.wm.home, "SELECT id FROM vms WHERE id = ?", home.x) == []
    assert _rows(home, home.hers) == hers_before


# --- finding 15: existence oracles ------------------------------------------------------------

def _refusal(resp: httpx.Response, status: int, ref: str) -> tuple[str, str, str, str]:
    """The refusal with ``ref`` taken out of its message (to compare two of them)."""
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    return (error["code"], error["message"].replace(ref, "REF"), str(error["hint"]),
            str(error["details"]))


def test_a_name_another_user_has_tells_nothing(home: Home) -> None:
    theirs = home.ok("owner", "POST", "/api/vms", {"name": "web", "template": "tpl"})["id"]
    before = _rows(home, theirs)
    mine = home.call("eve", "POST", "/api/vms", {"name": "web", "template": "tpl"})
    assert mine.status_code == 201, mine.text  # as for a name nobody has
    eve_web = mine.json()["id"]
    assert eve_web != theirs and _rows(home, theirs) == before
    again = home.call("eve", "POST", "/api/vms", {"name": "web", "template": "tpl"})
    assert again.status_code == 409, again.text  # her own clash she may know of
    # a name is resolved among the VMs each caller may see
    assert home.ok("eve", "GET", "/api/vms/web")["id"] == eve_web
    assert home.ok("owner", "GET", "/api/vms/web")["id"] == theirs
    both = home.call("admin", "GET", "/api/vms/web")
    assert both.status_code == 409 and theirs[:12] in both.text and eve_web[:12] in both.text
    assert home.ok("admin", "GET", f"/api/vms/{theirs}")["id"] == theirs
    # a name of a VM she may see is taken for her; the host's root sees every VM
    home.wm("user", "grant", "eve", "--vm", theirs)
    home.wm("vm", "rename", theirs, "shared")
    clash = home.call("eve", "POST", "/api/vms", {"name": "shared", "template": "tpl"})
    assert clash.status_code == 409, clash.text
    refused = home.wm.run("vm", "create", "web", "--disk", "1M")
    assert refused.returncode != 0 and "already exists" in refused.stderr, refused.stderr
    home.wm("user", "revoke", "eve", "--vm", theirs)


def _merge_job(home: Home, who: str, vm: str) -> str:
    made = home.ok(who, "POST", f"/api/vms/{vm}/checkpoints", {"name": "gone"})
    job = home.ok(who, "DELETE", f"/api/vms/{vm}/checkpoints/{made['id']}")["job_id"]
    _wait(home, who, job)
    return str(job)


def _twin_job(home: Home, job_id: str, new_id: str, vm_id: str) -> None:
    """A copy of a job, with another id, of another VM (jobs' ids are random: this one shares
    a prefix with ``job_id``)."""
    with sqlite3.connect(home.wm.home / "catalog.db") as db:
        db.row_factory = sqlite3.Row
        row = dict(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
        row.update(id=new_id, vm_id=vm_id)
        db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                   list(row.values()))


def test_a_job_id_prefix_tells_nothing(home: Home) -> None:
    theirs = home.ok("owner", "POST", "/api/vms", {"name": "jobs-o", "template": "tpl"})["id"]
    mine = home.ok("eve", "POST", "/api/vms", {"name": "jobs-e", "template": "tpl"})["id"]
    her_job = _merge_job(home, "eve", mine)
    twin = her_job[:6] + ("0" if her_job[6] != "0" else "1") + "f" * 25
    _twin_job(home, her_job, twin, theirs)
    # a prefix of her job and of another user's: hers, as if the other did not exist
    assert home.ok("eve", "GET", f"/api/jobs/{her_job[:6]}")["id"] == her_job
    assert home.ok("owner", "GET", f"/api/jobs/{her_job[:6]}")["id"] == twin
    ambiguous = home.call("admin", "GET", f"/api/jobs/{her_job[:6]}")
    assert ambiguous.status_code == 404  # administrators see both: give more of the id
    # a prefix of only another user's job: word for word the answer for no job at all
    nothing = "f" * 31 + "e"
    assert _refusal(home.call("eve", "GET", f"/api/jobs/{twin[:7]}"), 404, twin[:7]) == \
        _refusal(home.call("eve", "GET", f"/api/jobs/{nothing}"), 404, nothing)
    assert _refusal(home.call("eve", "POST", f"/api/jobs/{twin[:7]}/cancel"), 404, twin[:7]) \
        == _refusal(home.call("eve", "POST", f"/api/jobs/{nothing}/cancel"), 404, nothing)


def test_an_export_folder_name_tells_nothing(home: Home) -> None:
    theirs = home.ok("owner", "POST", "/api/vms", {"name": "exp-o", "template": "tpl"})["id"]
    mine = home.ok("eve", "POST", "/api/vms", {"name": "exp-e", "template": "tpl"})["id"]
    exports = home.base / "exports"
    for who, vm in (("owner", theirs), ("eve", mine)):
        ckpt = home.ok(who, "POST", f"/api/vms/{vm}/checkpoints", {"name": "c"})["id"]
        done = home.ok(who, "POST", f"/api/vms/{vm}/checkpoints/{ckpt}/export",
                       {"location": "exports", "folder": "bundle"})
        assert done["folder"] == f"{who}/bundle"  # each in a folder of their own
        _wait(home, who, done["job_id"])
        assert (exports / who / "bundle" / "manifest.json").is_file()
        again = home.call(who, "POST", f"/api/vms/{vm}/checkpoints/{ckpt}/export",
                          {"location": "exports", "folder": "bundle"})
        assert again.status_code == 409, again.text  # their own bundle: theirs to know
    made = home.ok("admin", "POST", f"/api/vms/{theirs}/checkpoints", {"name": "a"})["id"]
    done = home.ok("admin", "POST", f"/api/vms/{theirs}/checkpoints/{made}/export",
                   {"location": "exports", "folder": "bundle"})
    assert done["folder"] == "bundle"  # administrators: the location itself
    _wait(home, "admin", done["job_id"])


def _wait(home: Home, who: str, job: str) -> None:
    for _ in range(600):
        status = home.ok(who, "GET", f"/api/jobs/{job}")["status"]
        if status in ("completed", "failed", "cancelled"):
            assert status == "completed", home.ok(who, "GET", f"/api/jobs/{job}")
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job} did not finish")
