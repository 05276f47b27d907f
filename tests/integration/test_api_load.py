"""The API under load: 50 concurrent clients, 12 requests each, against a real ``waymark serve``.

A home with five VMs, all off, with 1 MiB disks (the default limit of 50 checkpoints each), and
an administrator's API token; the server is a real ``python -m waymark serve`` on a loopback
port (its log kept in a file, shown when something fails). Fifty threads, each with its own
``httpx.Client`` (a kept-alive connection), make 12 requests each with no pause, each choosing
a VM at random and then:

- 75 %: a read, ``GET /api/vms``, ``/api/vms/{vm}``, ``/api/vms/{vm}/checkpoints`` or
  ``/api/jobs``;
- 15 %: ``POST /api/vms/{vm}/checkpoints`` named ``k<client>-<n>`` (unique per client), its id
  taken from the 201;
- 10 %: ``DELETE /api/vms/{vm}/checkpoints/{id}`` of a checkpoint this client created and has
  not deleted, on that VM, else on any VM (a read when it has none), the deleted id taken from
  the 202.

The load is bounded by work, not time: 600 requests (about 100 creates and 20 deletes), which
take 11-15 s here (40-55 answers a second; a write waits up to 2 s for its VM's lock). That is
enough for what the test proves: all 50 clients start at once on the same 5 VMs, so from the
first request on each VM gets concurrent creates, deletes and reads, and the lock wait runs out
(409 busy) dozens of times. The fixed 60 s it used to run only repeated the same interleavings
some five times over, for 80 s of the suite; the one race it found is reproduced
deterministically below.

Each client records exactly which checkpoints it created and which it deleted, by id, from the
responses. The load runs once for the module (``pytest -s`` prints request counts by kind and
status, the 409s, and p50/p99 latency); then:

- every answer is its route's 2xx or an expected 409 (the VM busy beyond the API's 2 s lock
  wait, or at its checkpoint limit); a 201 names the checkpoint asked for, a 202 deletes exactly
  the one asked for; no id is handed out twice;
- no 5xx and no dropped connection;
- once every merge job has finished (each completed), each VM's checkpoints are exactly those
  created minus those deleted (none lost, none left over, none listed twice), each with the
  name its client gave it. A create or delete whose connection broke has an unknown outcome: it
  is settled from the final tree by its unique name (create) or id (delete), and counted;
- ``waymark check`` exits 0.

The load found that a VM's view can read two states of the catalog (a 500, KeyError in
``views._disk``, when a checkpoint is created between its reads);
``test_a_view_reads_one_state`` reproduces it deterministically, in process.
"""

from __future__ import annotations

import random
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers import Waymark, serve_process

VMS = [f"load{i}" for i in range(5)]
CLIENTS = 50
REQUESTS = 12  # each client's; why this many: the module's docstring
LOAD_TIMEOUT = 600.0  # for all of them: far beyond what it takes, never a cut-off request
CREATE, DELETE = 0.15, 0.10  # shares of the requests; the rest are reads
READS = ("/api/vms", "/api/vms/{vm}", "/api/vms/{vm}/checkpoints", "/api/jobs")
EXPECTED = {"read": {200}, "create": {201, 409}, "delete": {202, 409}}
CONFLICT_CODES = {"busy", "limit_reached"}
JOBS_TIMEOUT = 180.0
REQUEST_TIMEOUT = 120.0  # never cut a request short: its outcome would be unknown


@dataclass
class Tally:
    """What one client saw."""

    created: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (vm, name)
    deleted: dict[str, str] = field(default_factory=dict)  # id -> vm
    created_ids: list[str] = field(default_factory=list)  # every 201's id, repeats kept
    unknown_creates: list[tuple[str, str]] = field(default_factory=list)  # (vm, name)
    unknown_deletes: list[tuple[str, str]] = field(default_factory=list)  # (vm, id)
    jobs: list[str] = field(default_factory=list)
    counts: Counter[tuple[str, int]] = field(default_factory=Counter)  # (kind, status)
    conflicts: Counter[str] = field(default_factory=Counter)  # error code of each 409
    latencies: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds
    unexpected: list[str] = field(default_factory=list)  # answers no rule allows
    server_errors: list[str] = field(default_factory=list)  # 5xx and broken connections

    def alive(self, vm: str) -> list[str]:
        return [c for c, (v, _) in self.created.items() if v == vm and c not in self.deleted]


@dataclass
class Server:
    url: str
    token: str
    log: Path


@contextmanager
def serve(wm: Waymark, log: Path) -> Iterator[Server]:
    """``waymark serve`` on a free loopback port with an administrator's token; its output
    goes to ``log``."""
    wm.run("user", "add", "admin", "--role", "administrator", "--password-stdin",
           input="admin-password-1\n").ok()
    token = str(wm.json("token", "create", "load", "--user", "admin")["token"])
    with serve_process(wm, log) as url:
        yield Server(url, token, log)


class Client(threading.Thread):
    """One client: :data:`REQUESTS` requests back to back."""

    def __init__(self, index: int, server: Server) -> None:
        super().__init__(name=f"client-{index}", daemon=True)
        self.index, self.server = index, server
        self.rng = random.Random(index)
        self.tally = Tally()
        self.made = 0

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.server.token}"}
        with httpx.Client(base_url=self.server.url, headers=headers,
                          timeout=REQUEST_TIMEOUT) as http:
            for _ in range(REQUESTS):
                vm = self.rng.choice(VMS)
                draw = self.rng.random()
                if draw < CREATE:
                    self.create(http, vm)
                elif draw < CREATE + DELETE and (doomed := self.deletable(vm)) is not None:
                    self.delete(http, doomed)
                else:
                    self.read(http, vm)

    def deletable(self, vm: str) -> str | None:
        """The VM to delete one of this client's checkpoints on: ``vm``, else any VM where it
        has one, else None."""
        if self.tally.alive(vm):
            return vm
        return next((other for other in VMS if self.tally.alive(other)), None)

    def timed(self, kind: str, http: httpx.Client, method: str, path: str,
              **kwargs: Any) -> httpx.Response | None:
        """The answer, or None when the connection broke (counted as a server error)."""
        start = time.perf_counter()
        try:
            resp = http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            self.tally.server_errors.append(f"{method} {path}: {err!r}")
            return None
        self.tally.latencies.setdefault(kind, []).append(time.perf_counter() - start)
        self.tally.counts[(kind, resp.status_code)] += 1
        if resp.status_code >= 500:
            self.tally.server_errors.append(f"{method} {path}: {resp.status_code} "
                                            f"{resp.text[:300]}")
        elif resp.status_code not in EXPECTED[kind]:
            self.tally.unexpected.append(f"{method} {path}: {resp.status_code} "
                                         f"{resp.text[:300]}")
        elif resp.status_code == 409:
            code = resp.json()["error"]["code"]
            self.tally.conflicts[code] += 1
            if code not in CONFLICT_CODES:
                self.tally.unexpected.append(f"{method} {path}: 409 {resp.text[:300]}")
        return resp

    def read(self, http: httpx.Client, vm: str) -> None:
        self.timed("read", http, "GET", self.rng.choice(READS).format(vm=vm))

    def create(self, http: httpx.Client, vm: str) -> None:
        name = f"k{self.index:02d}-{self.made}"
        self.made += 1
        resp = self.timed("create", http, "POST", f"/api/vms/{vm}/checkpoints",
                          json={"name": name})
        if resp is None or resp.status_code >= 500:
            self.tally.unknown_creates.append((vm, name))
        if resp is None or resp.status_code != 201:
            return
        body = resp.json()
        if (body["name"], body["vm_name"]) != (name, vm):
            self.tally.unexpected.append(f"asked for {name!r} on {vm}, made {body}")
        self.tally.created[body["id"]] = (vm, body["name"])
        self.tally.created_ids.append(body["id"])

    def delete(self, http: httpx.Client, vm: str) -> None:
        target = self.rng.choice(self.tally.alive(vm))
        resp = self.timed("delete", http, "DELETE", f"/api/vms/{vm}/checkpoints/{target}")
        if resp is None or resp.status_code >= 500:
            self.tally.unknown_deletes.append((vm, target))
            self.tally.deleted[target] = vm  # settled from the final tree
        if resp is None or resp.status_code != 202:
            return
        body = resp.json()
        name = self.tally.created[target][1]
        if body["deleted"] != [{"kind": "checkpoint", "id": target, "name": name}]:
            self.tally.unexpected.append(f"deleted {target} ({name}) of {vm}, got {body}")
        for gone in body["deleted"]:
            self.tally.deleted[gone["id"]] = vm
        self.tally.jobs.append(body["job_id"])


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(tallies: list[Tally], took: float) -> str:
    counts: Counter[tuple[str, int]] = Counter()
    conflicts: Counter[str] = Counter()
    latencies: dict[str, list[float]] = {}
    for tally in tallies:
        counts.update(tally.counts)
        conflicts.update(tally.conflicts)
        for kind, values in tally.latencies.items():
            latencies.setdefault(kind, []).extend(values)
    every = [v for values in latencies.values() for v in values]
    broken = sum(1 for t in tallies for e in t.server_errors if "Error(" in e)
    unknown = sum(len(t.unknown_creates) + len(t.unknown_deletes) for t in tallies)
    lines = [f"{CLIENTS} clients, {len(VMS)} VMs, {took:.1f} s: {len(every)} answers "
             f"({len(every) / took:.0f}/s), {sum(conflicts.values())} of them 409 "
             f"({', '.join(f'{c}: {n}' for c, n in sorted(conflicts.items())) or 'none'}); "
             f"{broken} broken connections, {unknown} writes of unknown outcome"]
    for kind in ("read", "create", "delete", "all"):
        values = every if kind == "all" else latencies.get(kind, [])
        if not values:
            continue
        by_status: Counter[int] = Counter()
        for (k, status), n in counts.items():
            by_status[status] += n if kind in (k, "all") else 0
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(by_status.items()) if n)
        lines.append(f"  {kind:<6} {len(values):>6} answers  p50 "
                     f"{statistics.median(values) * 1000:7.1f} ms  p99 "
                     f"{percentile(values, 0.99) * 1000:7.1f} ms  ({statuses})")
    return "\n".join(lines)


def wait_for_jobs(http: httpx.Client, ids: set[str]) -> list[dict[str, Any]]:
    """Every job, once none is queued or running any more (and all of ``ids`` are listed)."""
    deadline = time.monotonic() + JOBS_TIMEOUT
    while True:
        jobs: list[dict[str, Any]] = http.get("/api/jobs", params={"everything": True}).json()
        unfinished = [j for j in jobs if j["status"] in ("queued", "running")]
        if ids <= {j["id"] for j in jobs} and not unfinished:
            return jobs
        assert time.monotonic() < deadline, unfinished
        time.sleep(0.5)


@dataclass
class Run:
    tallies: list[Tally]
    log: Path
    jobs: list[dict[str, Any]]
    trees: dict[str, list[dict[str, Any]]]  # VM -> its checkpoints at the end
    check: subprocess.CompletedProcess[str]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-20000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    base = tmp_path_factory.mktemp("api-load")
    wm = Waymark(base / "home")
    for vm in VMS:
        wm("vm", "create", vm, "--disk", "1M")
    with serve(wm, base / "serve.log") as server:
        start = time.monotonic()
        clients = [Client(i, server) for i in range(CLIENTS)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(max(0.0, start + LOAD_TIMEOUT - time.monotonic()))
        took = time.monotonic() - start
        assert not any(c.is_alive() for c in clients), "a client never returned"
        tallies = [c.tally for c in clients]
        print("\n" + summary(tallies, took))
        headers = {"Authorization": f"Bearer {server.token}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
            jobs = wait_for_jobs(http, {j for t in tallies for j in t.jobs})
            trees = {vm: http.get(f"/api/vms/{vm}/checkpoints").json()["checkpoints"]
                     for vm in VMS}
    done = wm.run("check", timeout=300)
    yield Run(tallies, server.log, jobs, trees,
              subprocess.CompletedProcess(["waymark", "check"], done.returncode, done.stdout,
                                          done.stderr))


@pytest.mark.slow
def test_every_answer_is_expected(run: Run) -> None:
    unexpected = [p for t in run.tallies for p in t.unexpected]
    assert unexpected == [], "\n".join(unexpected[:20])
    every_id = [c for t in run.tallies for c in t.created_ids]
    assert len(every_id) == len(set(every_id)), "a checkpoint id was handed out twice"
    created = sum(n for t in run.tallies for (kind, status), n in t.counts.items()
                  if (kind, status) == ("create", 201))
    deleted = sum(n for t in run.tallies for (kind, status), n in t.counts.items()
                  if (kind, status) == ("delete", 202))
    assert created > 0 and deleted > 0, "the load made or deleted nothing"


@pytest.mark.slow
def test_no_server_error(run: Run) -> None:
    errors = [p for t in run.tallies for p in t.server_errors]
    assert errors == [], "\n".join(errors[:20]) + f"\nserver log:\n{run.log_text()}"


@pytest.mark.slow
def test_checkpoints_are_created_minus_deleted(run: Run) -> None:
    failed = [j for j in run.jobs if j["status"] != "completed"]
    assert failed == [], failed
    created = {c: made for t in run.tallies for c, made in t.created.items()}
    deleted = {c: vm for t in run.tallies for c, vm in t.deleted.items()}
    assert set(deleted) <= set(created)
    for vm, tree in run.trees.items():  # settle the writes whose connection broke
        names = {c["name"]: c["id"] for c in tree}
        for tally in run.tallies:
            for where, name in tally.unknown_creates:
                if where == vm and name in names:
                    created[names[name]] = (vm, name)
            for where, gone in tally.unknown_deletes:
                if where == vm and gone in {c["id"] for c in tree}:
                    del deleted[gone]
    for vm, tree in run.trees.items():
        ids = [c["id"] for c in tree]
        assert len(ids) == len(set(ids)), f"{vm}: a checkpoint is listed twice"
        expected = {c for c, (v, _) in created.items() if v == vm and c not in deleted}
        assert set(ids) == expected, (f"{vm}: lost {sorted(expected - set(ids))}, "
                                      f"left over {sorted(set(ids) - expected)}")
        assert {c["id"]: c["name"] for c in tree} == {c: created[c][1] for c in expected}
        listed = [c["name"] for c in tree]
        assert len(listed) == len(set(listed)), f"{vm}: a name is listed twice"


@pytest.mark.slow
def test_check_passes_afterwards(run: Run) -> None:
    assert run.check.returncode == 0, f"waymark check:\n{run.check.stdout}\n{run.check.stderr}"


# --- the race the load found, made deterministic ----------------------------------------------

def test_a_view_reads_one_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``GET /api/vms/{vm}`` (the app in process) while, right after the view's first read of
    the ``images`` table (:func:`waymark.catalog.reads.images`), another process's ``checkpoint
    create`` commits: the answer must be the VM as it was (or as it is), never a 500."""
    from waymark.api.app import create_app
    from waymark.catalog import reads
    from waymark.config import Settings
    from waymark.usecases.access import users
    from waymark.usecases.checkpoints import lifecycle as checkpoints
    from waymark.wiring import open_context

    wm = Waymark(tmp_path / "home")
    wm("vm", "create", "r", "--disk", "1M")
    served = open_context(Settings(home=wm.home))
    other = open_context(Settings(home=wm.home))  # another command: its own connections
    vm_id = wm.json("vm", "show", "r")["id"]
    users.add(served, "admin", "administrator", "admin-password-1")
    token = users.create_token(served, "admin", "t")["token"]
    armed = threading.Event()

    read_images = reads.images

    def between_reads(reader: reads.Reader, of_vm: str) -> dict[str, reads.ImageRow]:
        found = read_images(reader, of_vm)
        if armed.is_set():
            armed.clear()
            checkpoints.create(other, vm_id, "between")
        return found

    monkeypatch.setattr(reads, "images", between_reads)
    with TestClient(create_app(served), raise_server_exceptions=False) as client:
        before = client.get("/api/vms/r", headers={"Authorization": f"Bearer {token}"})
        assert before.status_code == 200, before.text
        armed.set()
        during = client.get("/api/vms/r", headers={"Authorization": f"Bearer {token}"})
    assert not armed.is_set(), "the view never read the images table"
    assert [c["name"] for c in wm.json("checkpoint", "list", "r")["checkpoints"]] == ["between"]
    assert during.status_code == 200, during.text
    after = wm.json("vm", "show", "r")
    assert during.json()["disks"][0]["active_image"] in (
        before.json()["disks"][0]["active_image"], after["disks"][0]["active_image"])
