"""What the portal's VM page, task history and serve's start need from the API and the CLI,
against a real ``waymark serve``:

- ``GET /api/vms/{vm}/summary``: the hardware, the checkpoint type and where it comes from
  (Waymark's default, then the VM's own after ``vm set``), the disks with size, space used and
  chain depth, the CD drive; no uptime or usage for a VM that is off; 404 for a VM the caller
  may not see (the same answer as one that does not exist);
- ``GET`` of a checkpoint carries the hardware it recorded, its disks' sizes and its ISO's name;
- every job records who started it: the signed-in user through the API, the host's user
  (``NAME (host)``) through the CLI; ``GET /api/jobs`` and ``job show`` show it with the
  job's duration;
- ``waymark serve`` prints the portal's URL once it listens (port 0: the port it got), and on
  a Unix socket says how to reach it; a socket file left by a dead server is replaced, a file
  that is no socket is refused (exit 5) and left alone;
- the task history page shows 50 jobs a page, newest first, with links to the next and
  previous pages.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.helpers import ERROR_KEYS, Waymark, served
from waymark.config import Settings
from waymark.engine import jobs
from waymark.web.pages import TASKS_PER_PAGE
from waymark.wiring import open_context

SELF, SELF_PASSWORD = "selfie", "selfie-password"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Waymark, str, str, str]]:
    wm = Waymark(tmp_path_factory.mktemp("summary") / "home")
    wm("vm", "create", "web", "--disk", "16M", "--disk", "4M")
    wm("vm", "create", "other", "--disk", "1M")
    with served(wm) as (url, token):
        wm.run("user", "add", SELF, "--role", "self-service", "--password-stdin",
               input=f"{SELF_PASSWORD}\n").ok()
        wm("user", "grant", SELF, "--vm", "other", "--permission", "checkpoint")
        own = wm.json("token", "create", "own", "--user", SELF)["token"]
        yield wm, url, token, own


def client(url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_the_summary_of_a_vm(site: tuple[Waymark, str, str, str]) -> None:
    wm, url, token, own = site
    shown = wm.json("vm", "show", "web")
    with client(url, token) as api:
        summary = api.get("/api/vms/web/summary").json()
        assert {k: summary[k] for k in ("name", "state", "memory_mib", "cpus", "firmware",
                                        "secure_boot", "tpm", "cpu_model", "accel",
                                        "accelerator", "media_name", "boot_order",
                                        "checkpoint_type", "checkpoint_type_source",
                                        "checkpoint_count", "current_checkpoint",
                                        "uptime_seconds", "usage")} == {
            "name": "web", "state": "off", "memory_mib": 512, "cpus": 1, "firmware": "bios",
            "secure_boot": False, "tpm": False, "cpu_model": "Westmere", "accel": "auto",
            "accelerator": None, "media_name": None, "boot_order": ["disk", "cdrom"],
            "checkpoint_type": "production", "checkpoint_type_source": "default",
            "checkpoint_count": 0, "current_checkpoint": None, "uptime_seconds": None,
            "usage": None}
        assert summary["disks"] == [
            {"id": d["id"], "passthrough": False, "virtual_size": d["virtual_size"],
             "allocated_bytes": d["allocated_bytes"], "chain_depth": d["chain_depth"]}
            for d in shown["disks"]]
        assert [d["virtual_size"] for d in summary["disks"]] == [16 << 20, 4 << 20]

        wm("vm", "set", "web", "--checkpoint-type", "standard")
        wm("checkpoint", "create", "web", "--name", "first")
        changed = api.get("/api/vms/web/summary").json()
        assert (changed["checkpoint_type"], changed["checkpoint_type_source"]) == \
            ("standard", "vm")
        assert (changed["checkpoint_count"], changed["current_checkpoint"]) == (1, "first")
        assert [d["chain_depth"] for d in changed["disks"]] == \
            [d["chain_depth"] + 1 for d in summary["disks"]]
    with client(url, own) as theirs:
        assert theirs.get("/api/vms/other/summary").json()["name"] == "other"
        hidden, missing = theirs.get("/api/vms/web/summary"), theirs.get("/api/vms/nope/summary")
        assert hidden.status_code == missing.status_code == 404
        assert set(hidden.json()["error"]) == ERROR_KEYS
        assert hidden.json()["error"]["code"] == missing.json()["error"]["code"]


def test_a_checkpoint_carries_its_hardware(site: tuple[Waymark, str, str, str]) -> None:
    wm, url, _, own = site
    wm("checkpoint", "create", "other", "--name", "hw")
    wm("vm", "set", "other", "--memory", "256M", "--cpus", "2")
    with client(url, own) as api:
        ckpt = api.get("/api/vms/other/checkpoints/hw").json()
    assert (ckpt["configuration"]["memory_mib"], ckpt["configuration"]["cpus"]) == (512, 1)
    assert ckpt["media_name"] is None
    [disk] = ckpt["disks"]
    assert disk["virtual_size"] == 1 << 20 and "frozen_image" not in disk  # no host path


def test_jobs_record_who_started_them(site: tuple[Waymark, str, str, str]) -> None:
    wm, url, _, own = site
    for name in ("by-api", "by-cli"):
        wm("checkpoint", "create", "other", "--name", name)
    with client(url, own) as api:
        answer = api.delete("/api/vms/other/checkpoints/by-api")
        assert answer.status_code == 202, answer.text
        by_api = answer.json()["job_id"]
        wm("job", "wait", by_api)
        wm("checkpoint", "delete", "other", "by-cli")
        listed = {j["id"]: j for j in api.get("/api/jobs", params={"everything": True}).json()}
    [by_cli] = [j for j in listed if j != by_api]
    host = f"{pwd.getpwuid(os.geteuid()).pw_name} (host)"
    assert (listed[by_api]["user"], listed[by_cli]["user"]) == (SELF, host)
    for job in listed.values():
        assert job["status"] == "completed"
        assert job["duration_seconds"] is not None and 0 <= job["duration_seconds"] < 60
    assert wm.json("job", "show", by_cli)["user"] == host
    shown = wm("job", "show", by_cli).stdout
    assert f"started by: {host}   duration: {listed[by_cli]['duration_seconds']} s" in shown


def test_the_task_history_is_paged_newest_first(wm: Waymark) -> None:
    wm("vm", "create", "busy", "--disk", "1M")
    vm_id = wm.json("vm", "show", "busy")["id"]
    ctx = open_context(Settings(home=wm.home))
    made = [jobs.submit(ctx, vm_id, "export", {"vm_id": vm_id, "checkpoint_id": "none",
                                               "dest": f"/nowhere/{n}"}, run_here=True,
                        user=f"user-{n}") for n in range(TASKS_PER_PAGE + 5)]
    ctx.catalog.engine.dispose()
    with served(wm) as (url, _), httpx.Client(base_url=url, timeout=30,
                                             follow_redirects=True) as http:
        signed = http.post("/login", data={"name": "root-admin", "password": "test-password"})
        assert signed.status_code == 200 and signed.url.path == "/vms", signed
        first, second = http.get("/tasks"), http.get("/tasks", params={"page": 2})
        beyond = http.get("/tasks", params={"page": 9})
    shown = [re.findall(r'data-job="([0-9a-f]+)"', page.text) for page in (first, second)]
    assert shown == [made[::-1][:TASKS_PER_PAGE], made[::-1][TASKS_PER_PAGE:]]
    assert "Page 1 of 2" in first.text and 'href="/tasks?page=2"' in first.text
    assert "Page 2 of 2" in second.text and 'href="/tasks?page=1"' in second.text
    assert f'data-cell="user">user-{TASKS_PER_PAGE + 4}<' in first.text
    assert beyond.status_code == 200 and "data-job=" not in beyond.text


# --- waymark serve's URL ----------------------------------------------------------------------

@contextmanager
def serving(wm: Waymark, listen: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "waymark", "serve", "--no-schedules",
                                 "--listen", listen], env=wm.env(), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(15)


def announced(proc: subprocess.Popen[bytes], log: Path) -> str:
    """The line serve prints once it listens."""
    deadline = time.monotonic() + 60
    while "Waymark portal on " not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return log.read_text()


def test_serve_prints_the_portal_url_once_it_listens(wm: Waymark, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with serving(wm, "127.0.0.1:0", log) as proc:
        said = announced(proc, log)
        found = re.search(r"Waymark portal on (http://127\.0\.0\.1:(\d+)/) ", said)
        assert found and int(found[2]) > 0, said
        assert f"home {wm.home}" in said
        # listening when printed: the URL answers (a connection waits for the app to start)
        assert httpx.get(f"{found[1]}login", timeout=30).status_code == 200


def test_serve_on_a_unix_socket(wm: Waymark, tmp_path: Path) -> None:
    path, log = tmp_path / "waymark.sock", tmp_path / "serve.log"
    with socket.socket(socket.AF_UNIX) as stale:  # left by a server that died
        stale.bind(str(path))
    with serving(wm, f"unix:{path}", log) as proc:
        said = announced(proc, log)
        assert f"unix socket {path} (curl --unix-socket {path} http://localhost/)" in said, said
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport, base_url="http://localhost") as http:
            assert http.get("/login").status_code == 200
    path.unlink(missing_ok=True)
    path.write_text("not a socket")
    with serving(wm, f"unix:{path}", log) as proc:
        assert proc.wait(60) == 5
        said = log.read_text()
        assert f"cannot listen on unix:{path}" in said and "Traceback" not in said, said
    assert path.read_text() == "not a socket"
