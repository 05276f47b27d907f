"""The chain-depth bench (issue 21's first row): random 4 KiB reads of Now with 50 checkpoints on
its path, against the same data converted into one qcow2, side by side; then the same with
consolidation (waymark.engine.consolidation: Now reads through two files).

    .venv/bin/python bench/run.py --only chain [--runs N]
    .venv/bin/python bench/chain.py [--runs N] [--layers 50] [--mib 256]

- 50 checkpoints made through the CLI (a VM that is off), each layer written with qemu-io
  (every 50th cluster, shifted per layer: a read finds its data at any depth);
- ``qemu-img bench -U -c 100000 -d 16 -s 4096 -S 65536 -t none -i io_uring`` on Now's file,
  deep (today) and consolidated, each against the flat copy in the same round (medians of N
  rounds): the ratio is the flat copy's time over ours (target >= 0.9);
- the same reads of a *running* VM's Now after ``vm consolidate`` linked it live (QEMU's own
  graph checked to be A's header chain, A -> S, with ``query-named-block-nodes``), against the
  flat copy in the same rounds;
- what the consolidation costs: its build (``vm consolidate``), one advance after a checkpoint
  (a layer committed into it), the extra space, and ``checkpoint create`` / ``checkpoint apply
  --discard-current`` of a consolidated VM (each unlinks Now first), with a 100 GiB disk
  against a 1 GiB one (target <= 1.5: still O(1)).

The background job is off (``WAYMARK_BACKGROUND_CONSOLIDATION=off``) so that each step is timed
by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import sh, timed

from waymark.qemu import monitor

WAYMARK = [sys.executable, "-m", "waymark"]
CLUSTER = 64 * 1024
BENCH = ["qemu-img", "bench", "-U", "-c", "100000", "-d", "16", "-s", "4096", "-S", "65536",
         "-t", "none"]


class Home:
    def __init__(self, root: Path, name: str) -> None:
        self.path = root / name
        self.env = {**os.environ, "WAYMARK_HOME": str(self.path),
                    "WAYMARK_BACKGROUND_CONSOLIDATION": "off"}

    def reset(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def wm(self, *args: str) -> str:
        return sh(*WAYMARK, *args, env=self.env)

    def show(self, vm: str) -> dict[str, object]:
        shown: dict[str, object] = json.loads(self.wm("vm", "show", vm, "--json"))
        return shown

    def active(self, vm: str) -> str:
        disks = self.show(vm)["disks"]
        assert isinstance(disks, list)
        return str(disks[0]["active_image"])


def aio() -> str:
    """io_uring, else native, else threads (said in the output)."""
    probe = Path(tempfile.mkdtemp()) / "probe.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(probe), "1M")
    try:
        for mode in ("io_uring", "native", "threads"):
            done = subprocess.run([*BENCH[:3], "-c", "1", "-t", "none", "-i", mode, "-f",
                                   "qcow2", str(probe)], capture_output=True, check=False)
            if done.returncode == 0:
                return mode
        return "threads"
    finally:
        shutil.rmtree(probe.parent)


def read_time(path: str, mode: str) -> float:
    out = sh(*BENCH, "-i", mode, "-f", "qcow2", path)
    return float(out.strip().splitlines()[-1].split()[3])  # "Run completed in X seconds."


def side_by_side(runs: int, ours: str, flat: str, mode: str) -> tuple[float, float]:
    """Medians of ``runs`` rounds, each reading ours then the flat copy."""
    mine, theirs = [], []
    for _ in range(runs):
        mine.append(read_time(ours, mode))
        theirs.append(read_time(flat, mode))
    return statistics.median(mine), statistics.median(theirs)


def deep_vm(home: Home, layers: int, mib: int) -> None:
    """A VM with ``layers`` checkpoints, each layer holding every ``layers``-th cluster (shifted
    by its number) of a ``mib`` MiB disk."""
    home.reset()
    home.wm("vm", "create", "deep", "--disk", f"{mib}M", "--max-checkpoints", "1000")
    clusters = mib * (1 << 20) // CLUSTER
    for layer in range(layers):
        writes = [f"write -P {layer % 250 + 1} {c * CLUSTER} {CLUSTER}"
                  for c in range(layer, clusters, layers)]
        sh("qemu-io", "-f", "qcow2", *(a for w in writes for a in ("-c", w)),
           home.active("deep"))
        home.wm("checkpoint", "create", "deep", "--name", f"c{layer}")


def bench_reads(root: Path, runs: int, layers: int, mib: int, mode: str) -> None:
    home = Home(root, "reads")
    start = time.perf_counter()
    deep_vm(home, layers, mib)
    made = time.perf_counter() - start
    now = home.active("deep")
    flat = str(root / "flat.qcow2")
    sh("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", now, flat)
    deep, flat_deep = side_by_side(runs, now, flat, mode)
    build, _ = timed(lambda: home.wm("vm", "consolidate", "deep"))
    shown = home.show("deep")["consolidation"]
    assert isinstance(shown, dict) and shown["linked_disks"] == 1, shown
    ours, flat_ours = side_by_side(runs, home.active("deep"), flat, mode)
    sh("qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {CLUSTER * 16}", home.active("deep"))
    create, _ = timed(lambda: home.wm("checkpoint", "create", "deep", "--name", "one-more"))
    advance, _ = timed(lambda: home.wm("vm", "consolidate", "deep"))
    sh("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", home.active("deep"), flat)
    print(f"chain: {layers} checkpoints on a {mib} MiB disk (made in {made:.0f} s), "
          f"qemu-img bench -i {mode}, medians of {runs}:")
    print(f"  deep (no consolidation): {deep:.2f} s vs one qcow2 {flat_deep:.2f} s: "
          f"{flat_deep / deep:.2f}x of one image")
    print(f"  consolidated: {ours:.2f} s vs one qcow2 {flat_ours:.2f} s: "
          f"{flat_ours / ours:.2f}x of one image (target >= 0.9)")
    print(f"  consolidation: built in {build:.2f} s (vm consolidate, whole command), "
          f"{int(shown['bytes']) / (1 << 20):.0f} MiB extra on disk ({mib} MiB virtual); "
          f"then a checkpoint {create:.2f} s and its advance {advance:.2f} s")
    bench_running(home, runs, flat, mode)
    os.unlink(flat)
    home.reset()


def qmp(home: Home, vm: str, command: str, **arguments: object) -> object:
    """One QMP query on the running VM's monitor (no Waymark command is connected)."""
    vm_id = str(home.show(vm)["id"])
    return monitor.query(home.path / "vms" / vm_id / "run" / "qmp.sock", vm, command,
                         timeout=10.0, **arguments)


def qemu_chain(home: Home, vm: str) -> list[str]:
    """The files QEMU reads for the VM's disk, top first: the backing chain of the format node
    of Now's file in QEMU's node graph (``query-named-block-nodes``)."""
    fdsets = {f"/dev/fdset/{s['fdset-id']}": fd["opaque"]
              for s in qmp(home, vm, "query-fdsets") for fd in s["fds"]}  # type: ignore

    def path(filename: str) -> str:
        if filename.startswith("json:"):  # QEMU cuts these at 4 KiB in a deep chain
            try:
                filename = json.loads(filename[len("json:"):])["file"]["filename"]
            except ValueError:
                return filename
        return str(fdsets.get(filename, filename))
    nodes = qmp(home, vm, "query-named-block-nodes")
    assert isinstance(nodes, list)
    now = home.active(vm)
    (file_node,) = [n["node-name"] for n in nodes if n["drv"] == "file"
                    and path(n["file"]) == now]
    (image,) = [n["image"] for n in nodes if n["node-name"] == "n" + file_node[1:]]
    chain = []
    while image:
        chain.append(path(image["filename"]))
        image = image.get("backing-image")
    return chain


def header_chain(path: str) -> list[str]:
    out = sh("qemu-img", "info", "-U", "--backing-chain", "--output=json", path)
    return [str(info["filename"]) for info in json.loads(out)]


def bench_running(home: Home, runs: int, flat: str, mode: str) -> None:
    """Reads of a running VM's Now once ``vm consolidate`` linked it live (QEMU's graph and
    A's header both A -> S), against the flat copy in the same rounds; a live checkpoint of
    the VM unlinked (before the link) and linked (it unlinks first), and the advance after."""
    home.wm("vm", "start", "deep")
    try:
        deep = len(qemu_chain(home, "deep"))
        unlinked, _ = timed(lambda: home.wm("checkpoint", "create", "deep", "--name", "ref"))
        link, _ = timed(lambda: home.wm("vm", "consolidate", "deep"))
        now = home.active("deep")
        graph = qemu_chain(home, "deep")
        assert graph == header_chain(now) and len(graph) == 2, (graph, header_chain(now))
        ours, theirs = side_by_side(runs, now, flat, mode)
        create, _ = timed(lambda: home.wm("checkpoint", "create", "deep", "--name", "live"))
        advance, _ = timed(lambda: home.wm("vm", "consolidate", "deep"))
        assert len(qemu_chain(home, "deep")) == 2
    finally:
        home.wm("vm", "stop", "deep", "--force")
    print(f"  running, linked live ({link:.2f} s, vm consolidate; QEMU's graph {deep} -> "
          f"{len(graph)} files, equal to A's header chain): {ours:.2f} s vs one qcow2 "
          f"{theirs:.2f} s: {theirs / ours:.2f}x of one image (target >= 0.9); then a live "
          f"checkpoint (unlinks first) {create:.2f} s (of a VM not linked: {unlinked:.2f} s) "
          f"and its advance, linked live again, {advance:.2f} s")


def bench_o1(root: Path, runs: int) -> None:
    """``checkpoint create`` and ``apply --discard-current`` of a consolidated VM (Now linked
    to its consolidation), 100 GiB vs 1 GiB: both stay O(1)."""
    home = Home(root, "o1")
    results: dict[tuple[str, str], float] = {}
    for size in ("1G", "100G"):
        for what in ("create", "apply"):
            samples = []
            for _ in range(runs):
                home.reset()
                home.wm("vm", "create", "b", "--disk", size)
                for i in range(6):
                    sh("qemu-io", "-f", "qcow2", "-c", f"write -P {i + 1} {i}M 1M",
                       home.active("b"))
                    home.wm("checkpoint", "create", "b", "--name", f"c{i}")
                home.wm("vm", "consolidate", "b")
                argv = (("checkpoint", "create", "b") if what == "create"
                        else ("checkpoint", "apply", "b", "c4", "--discard-current"))
                samples.append(timed(lambda argv=argv: home.wm(*argv))[0])
            results[size, what] = statistics.median(samples)
    home.reset()
    for what in ("create", "apply"):
        small, big = results["1G", what], results["100G", what]
        print(f"  {what} of a consolidated VM: 1 GiB {small * 1000:.0f} ms, 100 GiB "
              f"{big * 1000:.0f} ms: ratio {big / small:.2f} (target <= 1.5)"
              + ("; apply target < 1 s" if what == "apply" else ""))


def run_bench(root: Path, runs: int, layers: int = 50, mib: int = 256) -> None:
    mode = aio()
    if mode != "io_uring":
        print(f"chain: io_uring is not available here: qemu-img bench -i {mode}")
    bench_reads(root, runs, layers, mib, mode)
    bench_o1(root, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        run_bench(Path(tmp), args.runs, args.layers, args.mib)


if __name__ == "__main__":
    main()
