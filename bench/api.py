"""REST API benchmarks: requests per second and p99 latency on loopback.

    .venv/bin/python bench/api.py [--runs N] [--clients N] [--seconds T] [--vms N]
                                  [--checkpoints N]

A real `waymark serve` (the one a user runs, `--no-schedules`, on a free loopback port) per
home, and a load generator in this process: N clients (threads, each with its own httpx.Client
and kept-alive connection, default 16) sending one request after another, with no pause, for T
seconds (default 10) after a one-second warm-up, or longer (up to 120 s) until the clients had
two answers each on average (a slow request is measured, not cut off); requests per second are
the answers (all must be 200) within that window over its length, the latency percentiles
those of the same answers. Two homes:

- small: one VM `b` (1 MiB disk, off) with a chain of CHECKPOINTS checkpoints (default 50);
- large: the same, plus VMS - 1 more VMs (default 1,000 in all, all off, 1 MiB disks). They are
  made fast: one VM through `waymark.usecases.vms.definitions.create` (in process, ~75 ms each on
  the 2-core
  test host: 1,000 would take over a minute), and each other one by copying its rows in the
  catalog (vms, disks, images: new ids, names, MACs and folders) and its 192 KiB image file, in
  one transaction (a few seconds for 1,000; `waymark check` finds nothing wrong with the home).

Measured, in each home: (a) `GET /api/vms/b/checkpoints` (the 50-checkpoint tree), and in the
large home (b) `GET /api/vms` (1,000 VMs); the reference, measured in the same run against the
same server with the same clients, is `GET /api/auth/me`, a request that does only what every
request does (HTTP, the token check with its last-use write, the JSON answer). The ratio is the
time per request relative to the reference's (its req/s over ours): what the catalog work of
the request costs, in units of a trivial request. Medians of N runs (default 3), the ratios the
median of each run's own; the load generator shares the host's CPUs with the server, so compare
ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from harness import reporter, table

from waymark.catalog.models import Disk, Image, Vm
from waymark.config import Settings
from waymark.engine.context import Context
from waymark.engine.journal import now
from waymark.usecases.access import users
from waymark.usecases.checkpoints import lifecycle as checkpoints
from waymark.usecases.vms import definitions as vms
from waymark.wiring import open_context

WAYMARK = [sys.executable, "-m", "waymark"]
WARM_UP = 1.0
MIN_ANSWERS_PER_CLIENT = 2  # a window is extended until this many answers per client came
LONGEST = 120.0  # seconds: the longest a window is extended to
REFERENCE = "/api/auth/me"

say = reporter("api")


# --- homes ------------------------------------------------------------------------------------

def make_vm(ctx: Context, name: str) -> str:
    return vms.create(ctx, name, memory=128 << 20, cpus=1, disks=[vms.DiskSpec.parse("1M")])


def with_checkpoints(ctx: Context, name: str, count: int) -> None:
    """VM ``name`` with a chain of ``count`` checkpoints (each one the child of the last)."""
    vm_id = make_vm(ctx, name)
    for i in range(count):
        checkpoints.create(ctx, vm_id, f"c{i}")


def clone_vms(ctx: Context, source: str, count: int) -> None:
    """``count`` copies of VM ``source`` (off, one disk, one image, no checkpoint), named
    ``vm0001``..., made by copying its catalog rows and its image file."""
    with ctx.catalog.session() as session:
        vm = session.query(Vm).filter(Vm.name == source).one()
        [disk] = session.query(Disk).filter(Disk.vm_id == vm.id).all()
        [image] = session.query(Image).filter(Image.vm_id == vm.id).all()
        assert image.parent_id is None and disk.active_image_id == image.id
        rows: tuple[list[Vm], list[Image], list[Disk]] = ([], [], [])
        for i in range(1, count + 1):
            vm_id, disk_id, image_id = vms.new_id(), vms.new_id(), vms.new_id()
            folder = ctx.disk_folder(vm_id)
            folder.mkdir(parents=True)
            path = folder / f"{image_id}.qcow2"
            shutil.copyfile(image.path, path)
            config = {**vm.config, "disks": [disk_id],
                      "nics": [{**nic, "mac": vms.new_mac()} for nic in vm.config["nics"]]}
            moment = now()
            rows[0].append(Vm(id=vm_id, name=f"vm{i:04d}", created_at=moment, state="off",
                              config=config, checkpoint_type=vm.checkpoint_type,
                              checkpoint_dir=str(ctx.vm_folder(vm_id) / "checkpoints"),
                              max_checkpoints=vm.max_checkpoints, automatic_checkpoints=False,
                              origin=vm.origin))
            rows[1].append(Image(id=image_id, vm_id=vm_id, path=str(path), format=image.format,
                                 parent_id=None, pinned=False, virtual_size=image.virtual_size,
                                 chain_length=1, created_at=moment))
            rows[2].append(Disk(id=disk_id, vm_id=vm_id, active_image_id=image_id,
                                passthrough_path=None, created_at=moment))
        for table_rows in rows:  # no relationships: the foreign keys' order is ours to keep
            session.add_all(table_rows)
            session.flush()


def make_home(path: Path, vm_count: int, checkpoint_count: int) -> str:
    """A home with VM ``b`` (``checkpoint_count`` checkpoints) and ``vm_count`` VMs in all,
    and an administrator; returns the administrator's API token."""
    ctx = open_context(Settings(home=path))
    try:
        users.add(ctx, "bench", "administrator", "bench-password-1")
        token = str(users.create_token(ctx, "bench", "bench")["token"])
        with_checkpoints(ctx, "b", checkpoint_count)
        if vm_count > 1:
            make_vm(ctx, "vm0000")
            clone_vms(ctx, "vm0000", vm_count - 2)
    finally:
        ctx.catalog.engine.dispose()
    return token


# --- the server and the load ------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def serve(home: Path) -> Iterator[str]:
    """``waymark serve`` on ``home``; yields its base URL."""
    url = f"http://127.0.0.1:{free_port()}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WAYMARK_")},
           "WAYMARK_HOME": str(home)}
    log = (home.parent / f"{home.name}-serve.log").open("wb")
    proc = subprocess.Popen([*WAYMARK, "serve", "--listen", url.removeprefix("http://"),
                             "--no-schedules"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"waymark serve did not come up on {home}")
            try:
                if httpx.get(f"{url}/api/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@dataclass
class Result:
    answers: int
    seconds: float
    latencies: list[float] = field(repr=False)

    @property
    def rate(self) -> float:
        return self.answers / self.seconds

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            raise RuntimeError("no answer in the measured window: raise --seconds")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def load(url: str, token: str, path: str, clients: int, seconds: float) -> Result:
    """``clients`` threads asking ``path`` back to back: a warm-up, then at least ``seconds``
    counted, longer (up to :data:`LONGEST`) until :data:`MIN_ANSWERS_PER_CLIENT` answers per
    client came (a request that takes longer than the window is still measured)."""
    begin = time.monotonic() + WARM_UP
    end, last = begin + seconds, begin + max(seconds, LONGEST)
    wanted = MIN_ANSWERS_PER_CLIENT * clients
    answers: list[tuple[float, float]] = []  # (start, done) of those done after the warm-up
    failures: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                          timeout=LONGEST) as http:
            while (start := time.monotonic()) < last and not failures:
                with lock:
                    if start >= end and len(answers) >= wanted:
                        return
                resp = http.get(path)
                done = time.monotonic()
                if resp.status_code != 200:
                    failures.append(f"GET {path}: {resp.status_code} {resp.text[:200]}")
                    return
                if done >= begin:
                    with lock:
                        answers.append((start, done))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(failures[0])
    finished = sorted(done for _, done in answers)
    # the window: ``seconds``, or until the wanted answer came; in-flight answers after it
    # are left out (their clients were told to stop)
    close = max(end, finished[wanted - 1]) if len(finished) >= wanted else last
    counted = [done - start for start, done in answers if done <= close]
    return Result(len(counted), close - begin, counted)


# --- the table --------------------------------------------------------------------------------

@dataclass
class Case:
    label: str
    catalog: str
    url: str
    token: str
    path: str
    ours: list[Result] = field(default_factory=list)
    reference: list[Result] = field(default_factory=list)


def ms(value: float) -> str:
    return f"{value * 1000:.1f} ms"


def rate(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def row(case: Case) -> tuple[str, ...]:
    """Medians over the runs; the ratios are the medians of each run's own."""
    def median_of(results: list[Result], fraction: float) -> float:
        return statistics.median(r.percentile(fraction) for r in results)

    rates = [r.rate for r in case.ours]
    pairs = list(zip(case.ours, case.reference, strict=True))
    cost = statistics.median(ref.rate / ours.rate for ours, ref in pairs)
    tail = statistics.median(ours.percentile(0.99) / ref.percentile(0.99) for ours, ref in pairs)
    return (case.label, case.catalog, rate(statistics.median(rates)),
            f"{rate(min(rates))}-{rate(max(rates))}", ms(median_of(case.ours, 0.5)),
            ms(median_of(case.ours, 0.99)),
            rate(statistics.median(r.rate for r in case.reference)),
            ms(median_of(case.reference, 0.5)), ms(median_of(case.reference, 0.99)),
            f"{cost:.1f}", f"{tail:.1f}")


HEADER = ("request", "catalog", "req/s", "min-max", "p50", "p99", "ref req/s", "ref p50",
          "ref p99", "cost ratio", "p99 ratio")


def bench(root: Path, runs: int, clients: int, seconds: float, vm_count: int,
          checkpoint_count: int) -> str:
    """Build both homes in ``root``, measure, and return the table."""
    say(f"building the homes: 1 VM with {checkpoint_count} checkpoints; {vm_count} VMs")
    started = time.monotonic()
    small_token = make_home(root / "small", 1, checkpoint_count)
    large_token = make_home(root / "large", vm_count, checkpoint_count)
    say(f"homes built in {time.monotonic() - started:.1f} s")
    with serve(root / "small") as small, serve(root / "large") as large:
        tree = f"/api/vms/b/checkpoints ({checkpoint_count})"
        cases = [Case(f"(a) GET {tree}", "1 VM", small, small_token, "/api/vms/b/checkpoints"),
                 Case(f"(a) GET {tree}", f"{vm_count} VMs", large, large_token,
                      "/api/vms/b/checkpoints"),
                 Case(f"(b) GET /api/vms ({vm_count})", f"{vm_count} VMs", large, large_token,
                      "/api/vms")]
        with httpx.Client(base_url=large, headers={
                "Authorization": f"Bearer {large_token}"}, timeout=120) as http:
            listed = http.get("/api/vms").json()
        if len(listed) != vm_count:
            raise RuntimeError(f"GET /api/vms lists {len(listed)} VMs, not {vm_count}")
        for run in range(runs):
            for case in cases:
                say(f"run {run + 1}/{runs}: {case.label} in {case.catalog}, {clients} clients, "
                    f"{seconds:g} s, and the reference")
                for results, path in ((case.reference, REFERENCE), (case.ours, case.path)):
                    found = load(case.url, case.token, path, clients, seconds)
                    results.append(found)
                    say(f"  GET {path}: {rate(found.rate)} req/s over {found.seconds:.1f} s, "
                        f"p50 {ms(found.percentile(0.5))}, p99 {ms(found.percentile(0.99))}")
    return (f"REST API on loopback, {clients} clients x {seconds:g} s, medians of {runs} runs; "
            f"reference (ref): GET {REFERENCE} on the same server in the same run; cost ratio: "
            "time per request over the reference's (ref req/s / req/s):\n"
            + table([row(c) for c in cases], HEADER))


def run_bench(root: Path, runs: int) -> None:
    """For bench/run.py: the defaults."""
    print(bench(root, runs, clients=16, seconds=10.0, vm_count=1000, checkpoint_count=50))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--vms", type=int, default=1000, help="VMs in the large catalog.")
    parser.add_argument("--checkpoints", type=int, default=50,
                        help="Checkpoints of VM b in both homes.")
    args = parser.parse_args()
    if args.vms < 2 or args.runs < 1 or args.clients < 1 or args.seconds <= 0:
        parser.error("--vms must be at least 2; --runs, --clients, --seconds positive")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        print(bench(Path(tmp), args.runs, args.clients, args.seconds, args.vms,
                    args.checkpoints))


if __name__ == "__main__":
    main()
