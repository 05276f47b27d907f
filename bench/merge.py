"""Live merge benchmarks on the real test guest (TCG): merge throughput, guest writes during a
merge.

    .venv/bin/python bench/merge.py [--runs N] [--mib N] [--load-mib N]

Medians of N runs (default 3), each against a reference measured in the same run of this script;
the machine is shared and noisy, so compare ratios, not seconds. Every run uses a new VM of the
test guest (256 MiB of memory) with a second, scratch disk:

    waymark vm create tN --kernel K --initrd I --append A --disk GUEST_DISK --disk SIZE
        --memory 256M                                # SIZE: max(1 GiB, MIB + 64 MiB)
    qemu-io -f qcow2 -c "write -P 7 0M <MIB+64>M" SCRATCH_ACTIVE
    waymark checkpoint create tN --name first        # freezes that image: U
    qemu-io -f qcow2 -c "write -P 9 0M <MIB>M" SCRATCH_ACTIVE
    waymark checkpoint create tN --name second       # freezes that one: K

all while the VM is off (the VMs of the guest-write runs are named lN; qemu-io writes in requests
of at most 1 GiB). Deleting `first` leaves U unreferenced with the one child K, and the
planner merges in the cheaper direction by allocated bytes: K is the smaller, so it is committed
down into U (on a running VM an intermediate `block-commit`, K being below the active image);
were U the smaller, U would be streamed into K. The guest's own data disk gets the same two
checkpoints with nothing in them (its merge step moves a few hundred KiB). Before each timed
merge the files involved are written back and dropped from the page cache (posix_fadvise, those
files only), as for layers written long ago.

- throughput (--mib, default 256): copies of U and K are taken before the VM starts (`cp
  --sparse=always`, then `qemu-img rebase -u -f qcow2 -F qcow2 -b U' K'` links them); the guest
  boots, and the wall clock around

      waymark checkpoint delete tN <id of first> --json

  (Python start-up, locking, the data disk's tiny step, K's removal and the journal included:
  nothing is subtracted) is set against the same step done on the copies once the VM is off
  again: `qemu-img commit -q -f qcow2 -d -b U' K'` for a commit, `qemu-img rebase -q -f qcow2
  -b '' K'` for a stream. The direction is read from the step line the CLI prints on stderr
  when that is not a terminal (`[n/m] tN disk 2/2: merging X into Y`: X='second' (K) is a
  commit into U, X=deleted 'first' (U) a stream into K) and checked afterwards (a commit
  removes K's file, a stream U's). MiB/s are the bytes of data the step copies (`qemu-img
  map` of K: its own extents for a commit, those it reads from U for a stream) over the time.
  Target: live/offline >= 0.8 (the median of each run's ratio, ours against the reference of
  the same run, as for every ratio here); for the merge step alone (below) too. Also shown:
  the merge step alone, from its `[n/m]` line to the next step's line (the removal of K's node
  and file) or the command's end, timed by this script as the lines arrive (`job show --json` gives
  jobs' times only to the whole second), and what the command spends outside that step.
- guest writes (--load-mib, default 2048): in the guest, through its agent,

      dd if=/dev/zero of=/data/ddtest bs=1M count=64 conv=fsync

  (`guest-exec` of /bin/dd, timed from the request until `guest-exec-status`, polled every
  20 ms, reports it exited; busybox's dd prints no time of its own), once after an untimed
  warm-up dd with nothing else running, then once during a live merge of LOAD_MIB MiB: the
  delete above is started in the background (waiting: the same merge a `--no-wait` worker would
  run, with step lines to time) and the dd starts the moment the scratch disk's step line
  appears. Reported: both dd times, the slowdown (with merge / without), the share of the
  loaded dd that the merge step overlapped (below 100 % understates the slowdown: raise
  --load-mib), and the merge step's throughput meanwhile against the undisturbed one above.
  Targets: slowdown <= 1.3 while the merge step alone (the guest idle) stays >= 0.8 of
  qemu-img's (the live merge yields to the guest's writes: waymark.qemu.blockjobs.GuestShare).

Only one guest runs at a time. The guest is built (or reused) in $WAYMARK_TEST_GUEST or
/var/tmp/waymark-test-guest; the home and the copies go to a temporary folder in $BENCH_DIR
(default /var/tmp), and each run's VM is deleted with its images (`vm delete --yes`) once
measured. Every VM is powered off (`vm stop --force`) and every folder removed at the end, also
when a run fails or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    MIB,
    WAYMARK,
    Guest,
    Home,
    Row,
    data_bytes,
    drop_cached,
    median,
    mib,
    mib_per_s,
    qemu_io_write,
    reporter,
    row,
    scratch_home,
    seconds,
    sh,
    table,
    test_guest_image,
)

from waymark.guest import agent
from waymark.qemu.cmdline import RunFiles

MEMORY = "256M"
HEADROOM_MIB = 64  # U holds this much more than K, so the planner commits K into U
DD_MIB = 64
DD = ("if=/dev/zero", "of=/data/ddtest", "bs=1M", f"count={DD_MIB}", "conv=fsync")
THROUGHPUT_TARGET = 0.8
SLOWDOWN_TARGET = 1.3  # the guest's dd during a merge against without
PROGRESS = re.compile(r"^\[\d+/\d+\] ")  # a compaction step begins
# the scratch disk's merge step: "[1/4] t0 disk 2/2: merging 'second' into deleted 'first' (64 MiB)"
STEP = re.compile(r"^\[\d+/\d+\] \S+ disk 2/2: merging (.+?) into (.+?)(?: \(.*\))?$")
MERGE_TIMEOUT = 900.0
AGENT_POLL = 0.02

say = reporter("merge")


# --- the layers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layers:
    """The scratch disk's U (frozen by ``first``) and K (frozen by the next checkpoint)."""

    u: Path
    k: Path
    first: str

    def copied_bytes(self, direction: str) -> int:
        """The data the merge step copies: K's own for a commit, what K reads from U for a
        stream."""
        return data_bytes(self.k, depth=0 if direction == "commit" else 1)


def frozen_image(checkpoint: dict[str, Any], disk_id: str) -> Path:
    return Path(next(d["frozen_image"] for d in checkpoint["disks"]
                     if d["disk_id"] == disk_id))


def layered_guest(home: Home, image: dict[str, Any], name: str, k_mib: int
                  ) -> tuple[Guest, Layers]:
    """A new VM (off) of the test guest whose scratch disk has U and K under its active image."""
    u_mib = k_mib + HEADROOM_MIB
    guest = Guest(home, MEMORY, image, f"{max(1024, u_mib)}M", name=name)
    scratch = str(home.json("vm", "show", name)["disks"][1]["id"])
    qemu_io_write(guest.active_image(1), 0, u_mib, 7)
    first = home.json("checkpoint", "create", name, "--name", "first")
    qemu_io_write(guest.active_image(1), 0, k_mib, 9)
    second = home.json("checkpoint", "create", name, "--name", "second")
    layers = Layers(frozen_image(first, scratch), frozen_image(second, scratch),
                    str(first["id"]))
    if layers.u.stat().st_blocks <= layers.k.stat().st_blocks:
        raise RuntimeError(f"U ({layers.u}) should hold more than K ({layers.k})")
    return guest, layers


def discard(guest: Guest) -> None:
    """Power the VM off and delete it with its images (they take GiBs)."""
    guest.stop()
    try:
        guest.home.wm("vm", "delete", guest.name, "--yes")
    except RuntimeError as err:  # its files go with the temporary folder at the end
        say(f"could not delete VM {guest.name}: {err}")
    else:
        guest.home.vms.remove(guest.name)


# --- the live merge --------------------------------------------------------------------------

@dataclass(frozen=True)
class Merge:
    """A finished `checkpoint delete`: its wall time and its scratch disk's merge step."""

    wall: float
    direction: str  # "commit" (K into U) or "stream" (U into K)
    step_start: float  # perf_counter times
    step_end: float

    @property
    def step(self) -> float:
        return self.step_end - self.step_start


class Delete:
    """`checkpoint delete VM CKPT --json`, started in the background; the progress lines it
    prints on stderr (one per merge step, no terminal) are timestamped as they arrive."""

    def __init__(self, home: Home, vm: str, layers: Layers) -> None:
        self.layers = layers
        self.lines: list[tuple[float, str]] = []
        self.merging = threading.Event()  # the scratch disk's step has begun
        self.start = time.perf_counter()
        self.process = subprocess.Popen(
            [*WAYMARK, "checkpoint", "delete", vm, layers.first, "--json"], env=home.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append((time.perf_counter(), line.rstrip("\n")))
            if self._ours(line.strip()) is not None:
                self.merging.set()

    def _ours(self, line: str) -> str | None:
        """The direction of the scratch disk's step that ``line`` starts, if it does."""
        found = STEP.match(line)
        if found is None:
            return None
        names = (found[1], found[2])  # K is frozen by "second", U by "first" (deleted)
        if names == ("'second'", "deleted 'first'"):
            return "commit"
        if names == ("deleted 'first'", "'second'"):
            return "stream"
        return None

    def wait_merging(self) -> None:
        """Until the scratch disk's merge step begins."""
        deadline = time.monotonic() + MERGE_TIMEOUT
        while not self.merging.wait(0.005):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.reader.join(5.0)
                if not self.merging.is_set():
                    raise RuntimeError(f"no merge step of the scratch disk began: {self.lines}")

    def wait(self) -> Merge:
        assert self.process.stdout is not None
        code = self.process.wait(timeout=MERGE_TIMEOUT)  # its few lines of JSON fit the pipe
        end = time.perf_counter()
        out = self.process.stdout.read()
        self.reader.join()
        if code != 0:
            raise RuntimeError(f"checkpoint delete failed ({code}): {out.strip()} "
                               f"{' / '.join(line for _, line in self.lines)}")
        steps = [(moment, line) for moment, line in self.lines if PROGRESS.match(line)]
        for index, (moment, line) in enumerate(steps):
            direction = self._ours(line)
            if direction is not None:
                after = steps[index + 1][0] if index + 1 < len(steps) else end
                self._check(direction)
                return Merge(end - self.start, direction, moment, after)
        raise RuntimeError(f"no merge step of the scratch disk in: {self.lines}")

    def close(self) -> None:
        """Stop the command if it still runs (a run that failed half-way)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def _check(self, direction: str) -> None:
        """A commit leaves U (holding K's data) and removes K; a stream the other way round."""
        gone, kept = ((self.layers.k, self.layers.u) if direction == "commit"
                      else (self.layers.u, self.layers.k))
        if gone.exists() or not kept.exists():
            raise RuntimeError(f"the step line said {direction}, yet {gone} exists: "
                               f"{gone.exists()}, {kept} exists: {kept.exists()}")


def drop_chain(*paths: Path) -> None:
    for path in paths:
        drop_cached(path)


# --- the offline reference -------------------------------------------------------------------

def copy_aside(layers: Layers, folder: Path) -> Layers:
    """U and K copied into ``folder``, the copy of K backed by the copy of U."""
    folder.mkdir()
    u, k = folder / layers.u.name, folder / layers.k.name
    for source, copy in ((layers.u, u), (layers.k, k)):
        sh("cp", "--sparse=always", str(source), str(copy))
    sh("qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(u), str(k))
    return Layers(u, k, layers.first)


def offline(copies: Layers, direction: str) -> float:
    """Seconds of the same step by qemu-img on the copies."""
    drop_chain(copies.u, copies.k)
    if direction == "commit":
        argv = ["qemu-img", "commit", "-q", "-f", "qcow2", "-d", "-b", str(copies.u),
                str(copies.k)]
    else:  # U is the scratch disk's base: K ends up with no backing file
        argv = ["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", str(copies.k)]
    start = time.perf_counter()
    sh(*argv)
    return time.perf_counter() - start


# --- guest writes through the agent ----------------------------------------------------------

async def _guest_dd(socket: Path, label: str) -> tuple[float, float]:
    async with agent.connect(socket, label) as guest:
        start = time.perf_counter()
        pid = (await guest.command("guest-exec", 10.0, path="/bin/dd", arg=list(DD),
                                   **{"capture-output": True}))["pid"]
        while not (status := await guest.command("guest-exec-status", 10.0, pid=pid))["exited"]:
            await asyncio.sleep(AGENT_POLL)
        end = time.perf_counter()
    if status.get("exitcode") != 0:
        raise RuntimeError(f"dd in the guest failed: {status}")
    return start, end


def guest_dd(guest: Guest) -> tuple[float, float]:
    """The dd into the guest's data disk; its start and end (perf_counter)."""
    return asyncio.run(_guest_dd(RunFiles(guest.serial.parent).agent, guest.name))


# --- the runs --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Throughput:
    merge: Merge
    offline: float
    bytes: int
    accelerator: str


@dataclass(frozen=True)
class Loaded:
    alone: float
    loaded: float
    overlap: float  # share of the loaded dd during which the merge step ran
    merge: Merge
    bytes: int
    accelerator: str


def throughput_run(home: Home, image: dict[str, Any], run: int, k_mib: int) -> Throughput:
    name = f"t{run}"
    guest, layers = layered_guest(home, image, name, k_mib)
    try:
        copies = copy_aside(layers, home.path.parent / f"reference-{run}")
        amounts = {d: layers.copied_bytes(d) for d in ("commit", "stream")}
        guest.boot()
        drop_chain(layers.u, layers.k)
        delete = Delete(home, name, layers)
        try:
            merge = delete.wait()
        finally:
            delete.close()
        guest.stop()
        took = offline(copies, merge.direction)
        return Throughput(merge, took, amounts[merge.direction], guest.accelerator)
    finally:
        discard(guest)
        shutil.rmtree(home.path.parent / f"reference-{run}", ignore_errors=True)


def loaded_run(home: Home, image: dict[str, Any], run: int, k_mib: int) -> Loaded:
    name = f"l{run}"
    guest, layers = layered_guest(home, image, name, k_mib)
    try:
        amounts = {d: layers.copied_bytes(d) for d in ("commit", "stream")}
        guest.boot()
        guest.wait_agent()
        guest_dd(guest)  # warm-up: /data/ddtest's clusters are allocated from here on
        start, end = guest_dd(guest)
        drop_chain(layers.u, layers.k)
        delete = Delete(home, name, layers)
        try:
            delete.wait_merging()
            loaded_start, loaded_end = guest_dd(guest)
            merge = delete.wait()
        finally:
            delete.close()
        overlap = (min(loaded_end, merge.step_end) - max(loaded_start, merge.step_start)) \
            / (loaded_end - loaded_start)
        return Loaded(end - start, loaded_end - loaded_start, max(0.0, overlap), merge,
                      amounts[merge.direction], guest.accelerator)
    finally:
        discard(guest)


# --- the table -------------------------------------------------------------------------------

def throughput_rows(found: list[Throughput], k_mib: int) -> list[Row]:
    """Ratios are medians of each run's own (ours against the reference of the same run)."""
    case = f"{k_mib} MiB {', '.join(sorted({t.merge.direction for t in found}))}"
    reference = f"{mib_per_s(median(t.bytes / t.offline for t in found))} qemu-img"
    ratio = median(t.offline / t.merge.wall for t in found)
    step = median(t.offline / t.merge.step for t in found)
    return [row("live merge: delete, CLI wall", case, [t.bytes / t.merge.wall for t in found],
                reference, ratio, f">= {THROUGHPUT_TARGET}", ratio >= THROUGHPUT_TARGET,
                fmt=mib_per_s),
            row("live merge: its step only", case, [t.bytes / t.merge.step for t in found],
                reference, step, f">= {THROUGHPUT_TARGET}", step >= THROUGHPUT_TARGET,
                fmt=mib_per_s),
            row("live merge: delete, CLI wall time", case, [t.merge.wall for t in found],
                f"{seconds(median(t.offline for t in found))} qemu-img",
                median(t.merge.wall / t.offline for t in found)),
            row("  of it outside the merge step", case,
                [t.merge.wall - t.merge.step for t in found]),
            row("data copied", case, [float(t.bytes) for t in found], fmt=mib)]


def loaded_rows(found: list[Loaded], k_mib: int, undisturbed: float) -> list[Row]:
    alone = median(x.alone for x in found)
    slowdown = median(x.loaded / x.alone for x in found)
    rate = [x.bytes / x.merge.step for x in found]
    case = f"{k_mib} MiB {', '.join(sorted({x.merge.direction for x in found}))}"
    return [row(f"guest dd {DD_MIB} MiB fsync, merge running", case, [x.loaded for x in found],
                f"{seconds(alone)} no merge", slowdown,
                f"<= {SLOWDOWN_TARGET} slowdown", slowdown <= SLOWDOWN_TARGET),
            row("guest dd: throughput, merge running", case,
                [DD_MIB * MIB / x.loaded for x in found],
                f"{mib_per_s(DD_MIB * MIB / alone)} no merge",
                median(x.alone / x.loaded for x in found), fmt=mib_per_s),
            row("merge overlapped the dd", case, [x.overlap for x in found],
                fmt=lambda v: f"{v:.0%}"),
            row("live merge step, guest writing", case, rate,
                f"{mib_per_s(undisturbed)} undisturbed", median(rate) / undisturbed,
                fmt=mib_per_s)]


def run_bench(runs: int, k_mib: int = 256, load_mib: int = 2048) -> None:
    """Both benchmarks, ``runs`` times each, and their table (bench/run.py's ``merge``)."""
    image = test_guest_image()
    through: list[Throughput] = []
    loaded: list[Loaded] = []
    with scratch_home() as home:
        for run in range(runs):
            say(f"run {run + 1}/{runs}: throughput, {k_mib} MiB")
            through.append(throughput_run(home, image, run, k_mib))
            say(f"run {run + 1}/{runs}: guest dd, alone and during a {load_mib} MiB merge")
            loaded.append(loaded_run(home, image, run, load_mib))
    undisturbed = median(t.bytes / t.merge.step for t in through)
    accelerators = ", ".join(sorted({t.accelerator for t in through}
                                    | {x.accelerator for x in loaded}))
    print(f"live merge benchmarks, medians of {runs}, {accelerators} "
          "(wall clock through the CLI; the reference measured in the same run):")
    print(table([*throughput_rows(through, k_mib),
                 *loaded_rows(loaded, load_mib, undisturbed)],
                ("measure", "case", "ours", "ours min-max", "reference", "ratio", "target",
                 "result")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=256,
                        help="MiB the throughput merge copies (K's data).")
    parser.add_argument("--load-mib", type=int, default=2048,
                        help="MiB the merge under the guest's dd copies.")
    args = parser.parse_args()
    run_bench(args.runs, args.mib, args.load_mib)


if __name__ == "__main__":
    main()
