"""Benchmarks: each prints our time, a reference measured in the same run, and their ratio.

    .venv/bin/python bench/run.py [--runs N] [--only NAME]

Medians of N runs (default 3); the machine is shared and noisy, so compare ratios, not seconds.

- create:  `checkpoint create` with a 100 GiB (sparse) disk vs a 1 GiB disk (ratio ~1: O(1)).
- delete:  delete C in base <- U (1 GiB written, frozen by C) <- K (16 MiB, active), against
           `qemu-img commit` of K into U (target <= 1.5x, issue 21) and `qemu-img rebase -b base K`
           (target: at least 10x faster).
- list:    the commands that only read (`checkpoint list` with 50 checkpoints: target <= 150 ms,
           whole process; `checkpoint show`, `vm list`, `vm show`, `--help`), and bare python.
- create-depth: `checkpoint create` of a VM that is off (whole process) with 50 and with 400
           checkpoints on Now's path: the ratio 400/50 (target ~1) and the ms (target <= 300),
           wall and CPU, each create timed once the previous one's background job ended.
- check:   `waymark check VM` (whole process) with 0, 50 and 200 checkpoints: the ms (target
           <= 2 s with 200) and the cost per image above the empty VM's, 200 against 50
           (target ~1: linear).
- api:     the REST API on loopback (bench/api.py, which has more options): requests per second
           and p99 latency of 16 clients for 10 s, for `GET /api/vms/{vm}/checkpoints` of a VM
           with 50 checkpoints and `GET /api/vms` with 1,000 VMs, against `GET /api/auth/me`.
- backup:  bench/backup.py with its defaults (it has more options; the test guest under TCG): a
           full backup, VM off and running, against `qemu-img convert` (+ fsync + sha256) of the
           same disks; an incremental one after 16 MiB written on a 1 GiB disk, against the full.
- live:    a running 256 MiB test guest under TCG (bench/live.py, which has more options): live
           standard checkpoint (pause and wall time against libvirt's `virsh snapshot-create-as
           --live`, its libvirtd started by bench/libvirt_ref.py), production checkpoint
           (freeze, wall; freeze also while the guest writes), apply --start of a standard
           checkpoint, `vm status` of a running VM without a guest agent.
- subtree: `checkpoint delete --subtree` of 200 checkpoints on Now's path (their layers nearly
           empty), the whole command (target <= 5 s); its journal steps and the cost per layer.
- chain:   random 4 KiB reads of Now with 50 checkpoints on its path, deep and consolidated,
           against the same data in one qcow2 (bench/chain.py; target >= 0.9x), the
           consolidation's time and space, create and apply of a consolidated VM (O(1)).
- merge:   bench/merge.py with its defaults (the test guest under TCG): a live merge's step
           against `qemu-img commit` (target >= 0.8x), a guest's `dd` 64 MiB `conv=fsync`
           during a 2 GiB live merge against without (target <= 1.3x slower).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

WAYMARK = [sys.executable, "-m", "waymark"]


def sh(*argv: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_of(runs: int, setup: Callable[[], object], measure: Callable[[], object]) -> float:
    samples = []
    for _ in range(runs):
        setup()
        samples.append(timed(measure))
    return statistics.median(samples)


class Home:
    def __init__(self, root: Path) -> None:
        self.path = root / "home"
        self.env = {**os.environ, "WAYMARK_HOME": str(self.path)}

    def reset(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def wm(self, *args: str) -> str:
        return sh(*WAYMARK, *args, env=self.env)

    def active(self, vm: str) -> str:
        return str(json.loads(self.wm("vm", "show", vm, "--json"))["disks"][0]["active_image"])


def bench_create(root: Path, runs: int) -> None:
    home = Home(root)
    results = {}
    for size in ("1G", "100G"):
        def setup(size: str = size) -> None:
            home.reset()
            home.wm("vm", "create", "b", "--disk", size)
        results[size] = median_of(runs, setup, lambda: home.wm("checkpoint", "create", "b"))
    ratio = results["100G"] / results["1G"]
    print(f"create: 1 GiB {results['1G'] * 1000:.0f} ms, 100 GiB {results['100G'] * 1000:.0f} ms"
          f"  ratio {ratio:.2f} (target ~1)")


def _delete_setup(home: Home) -> None:
    """base (frozen by A) <- U (1 GiB written, frozen by C) <- K (16 MiB written, active)."""
    home.reset()
    home.wm("vm", "create", "b", "--disk", "2G")
    home.wm("checkpoint", "create", "b", "--name", "A")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1G", home.active("b"))
    home.wm("checkpoint", "create", "b", "--name", "C")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 9 0 16M", home.active("b"))


def _chain(home: Home) -> tuple[str, str, str]:
    k = home.active("b")
    u = json.loads(sh("qemu-img", "info", "--output=json", "-f", "qcow2", k))["backing-filename"]
    base = json.loads(sh("qemu-img", "info", "--output=json", "-f", "qcow2", u))[
        "backing-filename"]
    return base, u, k


def bench_delete(root: Path, runs: int) -> None:
    home = Home(root)
    chain: list[str] = []

    def setup() -> None:
        _delete_setup(home)
        chain[:] = _chain(home)  # base, U, K: looked up before the clock starts

    ours = median_of(runs, setup, lambda: home.wm("checkpoint", "delete", "b", "C"))
    library = median_of(runs, setup, lambda: _delete_in_process(home))
    commit = median_of(runs, setup, lambda: sh(
        "qemu-img", "commit", "-q", "-f", "qcow2", "-d", "-b", chain[1], chain[2]))
    rebase = median_of(max(1, runs // 2), setup, lambda: sh(
        "qemu-img", "rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b", chain[0], chain[2]))
    print(f"delete: qemu-img commit {commit * 1000:.0f} ms, qemu-img rebase "
          f"{rebase * 1000:.0f} ms (references)")
    for label, took in (("waymark CLI", ours), ("waymark library", library)):
        print(f"  {label} {took * 1000:.0f} ms: {took / commit:.2f}x the commit (target <= 1.5),"
              f" {rebase / took:.1f}x faster than the rebase (target >= 10)")


def _delete_in_process(home: Home) -> None:
    """The same delete through the library: no interpreter start-up, no imports."""
    from waymark.config import Settings
    from waymark.engine import lookup
    from waymark.usecases.checkpoints import deletion
    from waymark.wiring import open_context

    ctx = open_context(Settings(home=home.path))
    with ctx.catalog.session() as session:
        vm_id = lookup.vm(session, "b").id  # as the CLI resolves it (use cases take ids)
    deletion.delete_checkpoints(ctx, vm_id, "C", subtree=False, yes=True, user="bench")
    ctx.catalog.engine.dispose()


READS = {"checkpoint list (50)": ("checkpoint", "list", "b"),
         "checkpoint show": ("checkpoint", "show", "b", "c25"), "vm list": ("vm", "list"),
         "vm show": ("vm", "show", "b"), "--help": ("--help",)}


def bench_list(root: Path, runs: int) -> None:
    """The commands that only read, whole process, VM ``b`` with 50 checkpoints: `checkpoint
    list` (target <= 150 ms), and bare python's start-up, the floor, in the same run. Run with
    their bytecode cached, as an installed package has it (the test host's environment sets
    PYTHONDONTWRITEBYTECODE, which would compile Waymark's modules at every start)."""
    home = Home(root)
    home.reset()
    home.wm("vm", "create", "b", "--disk", "64M")
    for i in range(50):
        home.wm("checkpoint", "create", "b", "--name", f"c{i}")
    env = {k: v for k, v in home.env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    for args in READS.values():
        sh(*WAYMARK, *args, env=env)  # compiles and caches the bytecode once
    python = median_of(runs * 3, lambda: None, lambda: sh(sys.executable, "-c", "pass"))
    took = {label: median_of(runs * 3, lambda: None, partial(sh, *WAYMARK, *args, env=env))
            for label, args in READS.items()}
    cpu = {label: cpu_median(runs * 3, partial(sh, *WAYMARK, *args, env=env))
           for label, args in READS.items()}
    print("list: " + ", ".join(f"{label} {t * 1000:.0f} ms" for label, t in took.items())
          + f" (target: checkpoint list <= 150 ms; bare python startup {python * 1000:.0f} ms)")
    bare = cpu_median(runs * 3, partial(sh, sys.executable, "-c", "pass"))
    print("  CPU (user+sys, less sensitive to a loaded host): " + ", ".join(
        f"{label} {t * 1000:.0f} ms" for label, t in cpu.items())
        + f"; bare python {bare * 1000:.0f} ms")


def bench_api(root: Path, runs: int) -> None:
    import api  # bench/api.py (this folder is on sys.path when run.py runs)

    api.run_bench(root, runs)


def bench_backup(root: Path, runs: int) -> None:
    import backup  # bench/backup.py (it makes its own scratch home in $BENCH_DIR)

    backup.run_bench(runs)


def _grow(home: Home, count: int) -> None:
    """Give VM ``b`` checkpoints until it has ``count``, through the library in this process
    (one context, no interpreter per checkpoint: the build is not what is measured)."""
    from waymark.config import Settings
    from waymark.engine import lookup
    from waymark.usecases.checkpoints import lifecycle
    from waymark.wiring import open_context

    ctx = open_context(Settings(home=home.path))
    with ctx.catalog.session() as session:
        vm_id = lookup.vm(session, "b").id
        have = lookup.checkpoint_count(session, vm_id)
    for number in range(have, count):
        lifecycle.create(ctx, vm_id, f"c{number}")
    ctx.catalog.close()


def _deep_vm(home: Home) -> None:
    home.reset()
    home.wm("vm", "create", "b", "--disk", "64M", "--max-checkpoints", "1000")


def _jobs_ended(home: Home) -> None:
    """Wait for the jobs a command left behind (the background consolidation a create hands to
    a worker when Now's chain is deep): the next create is timed alone, not waiting for the
    VM's lock."""
    for job in json.loads(home.wm("job", "list", "--json")):
        if job["status"] in ("queued", "running"):
            home.wm("job", "wait", job["id"])


def _wall_and_cpu(runs: int, setup: Callable[[], object], measure: Callable[[], object]
                  ) -> tuple[float, float]:
    """Medians of the wall time of ``measure`` and of the CPU time (user + system) of the
    processes it ran: CPU is what a loaded shared host changes least."""
    walls, cpus = [], []
    for _ in range(runs):
        setup()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        walls.append(timed(measure))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def bench_create_depth(root: Path, runs: int) -> None:
    home = Home(root)
    _deep_vm(home)
    took, cpu = {}, {}
    for count in (50, 400):
        _grow(home, count)
        took[count], cpu[count] = _wall_and_cpu(runs, partial(_jobs_ended, home),
                                                lambda: home.wm("checkpoint", "create", "b"))
    python = median_of(runs, lambda: None, lambda: sh(sys.executable, "-c", "pass"))
    print(f"create-depth: checkpoint create of a VM that is off, 50 checkpoints "
          f"{took[50] * 1000:.0f} ms (CPU {cpu[50] * 1000:.0f} ms), 400 "
          f"{took[400] * 1000:.0f} ms (CPU {cpu[400] * 1000:.0f} ms) (target <= 300 ms), "
          f"ratio 400/50 {took[400] / took[50]:.2f} (target ~1; bare python startup "
          f"{python * 1000:.0f} ms; the previous create's background job ended first)")


def _images(home: Home) -> int:
    """The images in the catalog (read directly)."""
    con = sqlite3.connect(home.path / "catalog.db")
    try:
        return int(con.execute("SELECT count(*) FROM images").fetchone()[0])
    finally:
        con.close()


def bench_check(root: Path, runs: int) -> None:
    home = Home(root)
    _deep_vm(home)
    took, images = {}, {}
    for count in (0, 50, 200):
        _grow(home, count)
        images[count] = _images(home)
        took[count] = median_of(runs, lambda: None, lambda: home.wm("check", "b"))
    per = {n: (took[n] - took[0]) / (images[n] - images[0]) for n in (50, 200)}
    print(f"check: one VM, 0 checkpoints {took[0] * 1000:.0f} ms, 50 {took[50] * 1000:.0f} ms, "
          f"200 {took[200] * 1000:.0f} ms (target <= 2000 ms); per image above the empty VM: "
          f"{per[50] * 1000:.1f} ms at 50, {per[200] * 1000:.1f} ms at 200, ratio "
          f"{per[200] / per[50]:.2f} (target ~1: linear)")


def cpu_median(runs: int, command: Callable[[], object]) -> float:
    """The median CPU time (user + system) of the child processes ``command`` runs."""
    samples = []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        command()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        samples.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(samples)


def bench_live(root: Path, runs: int) -> None:
    import live  # bench/live.py

    live.run_bench(root, runs, ["256M"], disk_only=False)


def bench_subtree(root: Path, runs: int) -> None:
    import subtree  # bench/subtree.py

    subtree.run_bench(root, runs)


def bench_chain(root: Path, runs: int) -> None:
    import chain  # bench/chain.py (this folder is on sys.path when run.py runs)

    chain.run_bench(root, runs)


def bench_merge(root: Path, runs: int) -> None:
    import merge  # bench/merge.py (it makes its own scratch home in $BENCH_DIR)

    merge.run_bench(runs)


BENCHES = {"create": bench_create, "delete": bench_delete, "list": bench_list, "api": bench_api,
           "backup": bench_backup, "create-depth": bench_create_depth, "check": bench_check,
           "live": bench_live, "subtree": bench_subtree, "chain": bench_chain,
           "merge": bench_merge}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=sorted(BENCHES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        for name, bench in BENCHES.items():
            if args.only in (None, name):
                bench(Path(tmp), args.runs)


if __name__ == "__main__":
    main()

