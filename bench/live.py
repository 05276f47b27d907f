"""Live checkpoint benchmarks on the real test guest (TCG): pause, freeze, apply.

    .venv/bin/python bench/live.py [--runs N] [--sizes 256M,1G] [--no-libvirt]

(``bench/run.py --only live`` runs it for the 256 MiB guest.)

Medians of N runs (default 5) per guest memory size, each against a reference measured in the
same run of this script; the machine is shared and noisy, so compare ratios, not seconds. Wall
times are taken around the real CLI, Python start-up included.

- standard pause: the guest's pause during `checkpoint create VM --type standard --json` (its
  `pause_seconds`: QEMU's STOP to RESUME event timestamps) against libvirt's live memory snapshot
  of the same guest with the same memory (`virsh snapshot-create-as --live --memspec ...`, its
  STOP to RESUME, see bench/libvirt_ref.py), ratio of the medians; target ours/libvirt <= 0.25.
  Without libvirt (or with --no-libvirt) the reference is the state file's size divided by the
  write bandwidth of `dd if=/dev/zero of=FOLDER/x bs=1M count=512 oflag=direct` into the
  checkpoint folder, measured after each checkpoint (median of the per-run ratios, same 0.25).
  Also shown: the command's wall time against libvirt's (the whole `virsh
  snapshot-create-as`; target ours/virsh <= 1.5) and the state file's size.
- production freeze: `freeze_seconds` of `checkpoint create VM --type production --json` (the
  freeze request to the guard's confirmed thaw); target median < 100 ms. Also its wall time,
  target <= 400 ms.
- production freeze under guest writes: the same while the guest writes without pause (a
  shell loop of `dd if=/dev/zero of=/data/writes bs=1M count=32` started through its agent
  `WRITES_WARMUP` seconds before, stopped after), so the freeze has dirty data to flush;
  target median < 100 ms as well.
- standard apply: `checkpoint apply VM CKPT --discard-current --start` of the last standard
  checkpoint, from off (`vm stop --force` first, not timed) until the command returns with the
  VM running, against the state file's size divided by the read bandwidth of
  `dd if=STATE of=/dev/null bs=1M iflag=direct` taken just before (median of the per-run
  ratios; 1.0 = as fast as the disk can read the state once); target: the wall time <= 0.5 s.
  The state file's
  pages are dropped from the page cache (posix_fadvise DONTNEED, that file only) before each
  apply, as for a checkpoint taken long ago. Each apply is checked to resume the guest (it goes
  on counting, no fresh READY).
- disk-only apply: two VMs that are off with one new empty disk each, 1 GiB and 100 GiB
  (`vm create NAME --disk 1G` / `--disk 100G`), one checkpoint each, then
  `checkpoint apply VM CKPT --discard-current`, the two alternating, 3 x N times each (a
  cheap command dominated by Python start-up, so noisier); median of the per-pair ratios
  100 GiB / 1 GiB; target ~1 (PASS within 0.8-1.25: independent of the disk size).
- status: `vm status VM` (whole process) of a running VM whose guest runs no agent (booted with
  ``waymark.agent=off``), 3 x N times; target <= 250 ms. The reference is a bare interpreter's
  start-up (`python -c pass`) in the same run. Also shown: `vm status` of the VM whose agent
  answers (it must say so: `agent` true).

Per memory size, libvirt's domain boots and is gone before our VM boots, so only one guest runs
at a time. The guest is built (or reused) in $WAYMARK_TEST_GUEST or /var/tmp/waymark-test-guest;
homes go to a temporary folder in $BENCH_DIR (default /var/tmp). Every VM is powered off
(`vm stop --force`) and every home removed at the end, also when a run fails or on SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    READY,
    VM,
    Guest,
    Home,
    Row,
    drop_cached,
    median,
    mib,
    reporter,
    row,
    scratch_root,
    seconds,
    sh,
    table,
    test_guest_image,
    timed,
)
from libvirt_ref import LibvirtError, available, libvirt_snapshot_pause

from waymark.testguest.build import GuestImage

DD_MIB = 512
DISK_SIZES = ("1G", "100G")
PAUSE_TARGET = 0.25  # ours / reference
CREATE_TARGET = 1.5  # standard create's wall time / virsh snapshot-create-as's
FREEZE_TARGET = 0.100  # seconds
WRITER = "while :; do dd if=/dev/zero of=/data/writes bs=1M count=32 2>/dev/null; done"
WRITES_WARMUP = 2.0  # seconds the guest writes before a production checkpoint under writes
PRODUCTION_TARGET = 0.400  # seconds, production create's wall time
APPLY_TARGET = 0.5  # seconds, apply --start of a standard checkpoint
STATUS_TARGET = 0.250  # seconds, vm status of a running VM without an agent
STATUS_FACTOR = 3  # vm status is cheap and noisy: 3 x runs
DISK_RATIO_BAND = (0.8, 1.25)
DISK_ONLY_FACTOR = 3  # applies of a disk-only checkpoint are cheap and noisy: 3 x runs pairs


# --- helpers ---------------------------------------------------------------------------------

progress = reporter("live")


def dd_write_bandwidth(folder: Path) -> float:
    """Bytes per second of a direct 512 MiB write into ``folder``."""
    target = folder / "dd-bench.tmp"
    try:
        took, _ = timed(lambda: sh("dd", "if=/dev/zero", f"of={target}", "bs=1M",
                                   f"count={DD_MIB}", "oflag=direct"))
        return DD_MIB * 2**20 / took
    finally:
        target.unlink(missing_ok=True)


def dd_read_bandwidth(path: Path) -> float:
    """Bytes per second of a direct (page cache bypassed) read of the whole file."""
    took, _ = timed(lambda: sh("dd", f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct"))
    return path.stat().st_size / took


# --- the measurements ------------------------------------------------------------------------

@dataclass(frozen=True)
class Standard:
    """One standard live checkpoint."""

    pause: float
    wall: float
    state: Path
    state_bytes: int
    checkpoint: str
    disk_limit: float | None  # state bytes / dd write bandwidth, when measured


@dataclass(frozen=True)
class Reference:
    """libvirt's live memory snapshots of the same guest (medians)."""

    pause: float
    wall: float
    state_bytes: float


@dataclass(frozen=True)
class Applied:
    wall: float
    limit: float  # state bytes / dd read bandwidth
    bandwidth: float


def standard_checkpoint(guest: Guest, with_disk_limit: bool) -> Standard:
    before = guest.last_counter()
    wall, data = timed(lambda: guest.home.json("checkpoint", "create", VM, "--type", "standard"))
    if data["kind"] != "standard" or data["pause_seconds"] is None:
        raise RuntimeError(f"not a live standard checkpoint: {data['kind']}, "
                           f"pause {data['pause_seconds']}, {data['fallback_reason']}")
    state = Path(data["memory_state"])
    size = state.stat().st_size
    limit = size / dd_write_bandwidth(state.parent) if with_disk_limit else None
    guest.wait_counting(before)  # the guest really runs again before the next run
    return Standard(float(data["pause_seconds"]), wall, state, size, data["id"], limit)


def production_checkpoint(guest: Guest) -> tuple[float, float]:
    """The freeze window and the wall time of one production checkpoint."""
    wall, data = timed(lambda: guest.home.json("checkpoint", "create", VM, "--type",
                                               "production"))
    if data["kind"] != "production" or data["freeze_seconds"] is None:
        raise RuntimeError(f"production fell back to {data['kind']}: {data['fallback_reason']}")
    return float(data["freeze_seconds"]), wall


def production_under_writes(guest: Guest) -> tuple[float, float]:
    """:func:`production_checkpoint` while the guest keeps writing to its data disk."""
    writer = guest.start_program("/bin/sh", "-c", WRITER)
    try:
        time.sleep(WRITES_WARMUP)
        return production_checkpoint(guest)
    finally:
        guest.start_program("/bin/kill", str(writer))


def standard_apply(guest: Guest, taken: Standard) -> Applied:
    guest.stop()
    bandwidth = dd_read_bandwidth(taken.state)
    drop_cached(taken.state)
    mark = guest.mark()
    wall, data = timed(lambda: guest.home.json("checkpoint", "apply", VM, taken.checkpoint,
                                               "--discard-current", "--start"))
    if data["state"] != "running":
        raise RuntimeError(f"apply --start left the VM {data['state']}")
    guest.wait_counting(0, mark)
    if READY.search(guest.log(mark)):
        raise RuntimeError("the applied standard checkpoint booted afresh instead of resuming")
    return Applied(wall, taken.state_bytes / bandwidth, bandwidth)


def status_wall(home: Home, vm: str, agent: bool) -> float:
    """The wall time of one `vm status VM --json`, which must say whether the agent answers."""
    wall, data = timed(lambda: home.json("vm", "status", vm))
    if data["state"] != "running" or data["agent"] is not agent:
        raise RuntimeError(f"vm status of {vm}: {data['state']}, agent {data['agent']} "
                           f"(expected running, agent {agent})")
    return wall


def libvirt_reference(guest: Guest, runs: int, workdir: Path, image: dict[str, Any]
                      ) -> Reference:
    found = libvirt_snapshot_pause(guest.memory_mib, runs, workdir, guest_image(image))
    return Reference(median([float(r["pause_s"]) for r in found]),
                     median([float(r["wall_s"]) for r in found]),
                     median([float(r["state_bytes"]) for r in found]))


def guest_image(image: dict[str, Any]) -> GuestImage:
    def path(key: str) -> Path:
        return Path(image[key])

    return GuestImage(path("kernel"), path("initrd"), path("disk"), path("initrd_tools"),
                      path("boot_disk"), path("iso"), image["inputs_hash"], image["append"])


@dataclass
class SizeResult:
    size: str
    accelerator: str
    standard: list[Standard]
    reference: Reference | None
    production: list[tuple[float, float]]
    writing: list[tuple[float, float]]  # production checkpoints while the guest writes
    applied: list[Applied]
    status: list[float]  # vm status while the agent answers


def bench_size(root: Path, size: str, image: dict[str, Any], runs: int, use_libvirt: bool
               ) -> SizeResult:
    home = Home(root / f"home-{size}")
    try:
        guest = Guest(home, size, image)
        reference = None
        if use_libvirt:
            progress(f"{size}: libvirt reference, {runs} live snapshots")
            try:
                reference = libvirt_reference(guest, runs, root, image)
            except LibvirtError as err:  # e.g. no mount namespace for its own libvirtd here
                progress(f"the libvirt reference failed ({err}); the pause reference falls "
                         "back to state size / dd write bandwidth")
        progress(f"{size}: booting our VM; {runs} standard, {runs} production checkpoints")
        guest.boot()
        standard = [standard_checkpoint(guest, reference is None) for _ in range(runs)]
        guest.wait_agent()
        status = [status_wall(home, VM, agent=True) for _ in range(runs * STATUS_FACTOR)]
        production = [production_checkpoint(guest) for _ in range(runs)]
        progress(f"{size}: {runs} production checkpoints while the guest writes")
        writing = [production_under_writes(guest) for _ in range(runs)]
        progress(f"{size}: {runs} applies of a standard checkpoint")
        applied = [standard_apply(guest, standard[-1]) for _ in range(runs)]
        return SizeResult(size, guest.accelerator, standard, reference, production, writing,
                          applied, status)
    finally:
        home.close()


def apply_disk_only(home: Home, vm: str, checkpoint: str) -> float:
    wall, _ = timed(lambda: home.wm("checkpoint", "apply", vm, checkpoint, "--discard-current"))
    return wall


def bench_disk_only(root: Path, image: dict[str, Any], runs: int) -> dict[str, list[float]]:
    """Wall times of applying a disk-only checkpoint of an off VM, per data disk size."""
    home = Home(root / "home-disks")
    progress(f"disk-only apply, {' vs '.join(DISK_SIZES)} disk, "
             f"{runs * DISK_ONLY_FACTOR} runs each")
    try:
        for size in DISK_SIZES:
            home.create_vm(f"disk-{size}", image, "--disk", size)
        ckpts = {size: home.json("checkpoint", "create", f"disk-{size}")["id"]
                 for size in DISK_SIZES}
        walls: dict[str, list[float]] = {size: [] for size in DISK_SIZES}
        for run in range(runs * DISK_ONLY_FACTOR):
            for size in DISK_SIZES[::1 if run % 2 == 0 else -1]:  # alternate the order
                walls[size].append(apply_disk_only(home, f"disk-{size}", ckpts[size]))
        return walls
    finally:
        home.close()


def bench_status(root: Path, image: dict[str, Any], runs: int) -> tuple[list[float], list[float]]:
    """Wall times of `vm status` of a running VM whose guest runs no agent, and of a bare
    interpreter's start-up in the same run."""
    home = Home(root / "home-status")
    progress(f"vm status without a guest agent, {runs * STATUS_FACTOR} runs")
    try:
        bare = Guest(home, "256M", {**image, "append": f"{image['append']} waymark.agent=off"},
                     name="bare")
        bare.boot()
        walls, python = [], []
        for _ in range(runs * STATUS_FACTOR):
            walls.append(status_wall(home, "bare", agent=False))
            python.append(timed(lambda: sh(sys.executable, "-c", "pass"))[0])
        return walls, python
    finally:
        home.close()


# --- the table -------------------------------------------------------------------------------

def pause_row(r: SizeResult) -> Row:
    pauses = [s.pause for s in r.standard]
    if r.reference is None:
        limit = median(s.disk_limit or 0.0 for s in r.standard)
        ratio = median(s.pause / (s.disk_limit or 1.0) for s in r.standard)
        reference = f"{seconds(limit)} state/dd write"
    else:
        ratio = median(pauses) / r.reference.pause
        reference = f"{seconds(r.reference.pause)} libvirt --live"
    return row("standard: guest pause", r.size, pauses, reference, ratio,
               f"<= {PAUSE_TARGET}", ratio <= PAUSE_TARGET)


def standard_rows(r: SizeResult) -> list[Row]:
    walls = [s.wall for s in r.standard]
    sizes = [float(s.state_bytes) for s in r.standard]
    ref = r.reference
    create_ratio = None if ref is None else median(walls) / ref.wall
    return [pause_row(r),
            row("standard: create, wall", r.size, walls,
                "-" if ref is None else f"{seconds(ref.wall)} virsh wall", create_ratio,
                f"<= {CREATE_TARGET}",
                None if create_ratio is None else create_ratio <= CREATE_TARGET),
            row("standard: state file", r.size, sizes,
                "-" if ref is None else f"{mib(ref.state_bytes)} libvirt",
                None if ref is None else median(sizes) / ref.state_bytes, fmt=mib)]


def production_rows(r: SizeResult) -> list[Row]:
    freezes = [f for f, _ in r.production]
    walls = [w for _, w in r.production]
    return [row("production: freeze window", r.size, freezes, target=f"< {seconds(FREEZE_TARGET)}",
                ok=median(freezes) < FREEZE_TARGET),
            row("production: create, wall", r.size, walls,
                target=f"<= {seconds(PRODUCTION_TARGET)}",
                ok=median(walls) <= PRODUCTION_TARGET),
            row("production: freeze, guest writing", r.size, [f for f, _ in r.writing],
                target=f"< {seconds(FREEZE_TARGET)}",
                ok=median(f for f, _ in r.writing) < FREEZE_TARGET),
            row("production: wall, guest writing", r.size, [w for _, w in r.writing])]


def apply_row(r: SizeResult) -> Row:
    limit = median(a.limit for a in r.applied)
    bandwidth = median(a.bandwidth for a in r.applied)
    walls = [a.wall for a in r.applied]
    return row("standard: apply --start", r.size, walls,
               f"{seconds(limit)} state/dd read {mib(bandwidth)}/s",
               median(a.wall / a.limit for a in r.applied), f"<= {seconds(APPLY_TARGET)}",
               median(walls) <= APPLY_TARGET)


def disk_only_row(walls: dict[str, list[float]]) -> Row:
    small, large = DISK_SIZES
    ratio = median(b / a for a, b in zip(walls[small], walls[large], strict=True))
    low, high = DISK_RATIO_BAND
    return row("disk-only: apply (VM off)", f"{large} disk", walls[large],
               f"{seconds(median(walls[small]))} {small} disk", ratio, f"~1 ({low}-{high})",
               low <= ratio <= high)


def status_rows(results: list[SizeResult], status: tuple[list[float], list[float]]
                ) -> list[Row]:
    walls, python = status
    rows = [row("status: no agent, wall", "256M", walls,
                f"{seconds(median(python))} python -c pass", median(walls) / median(python),
                f"<= {seconds(STATUS_TARGET)}", median(walls) <= STATUS_TARGET)]
    return rows + [row("status: agent answers, wall", r.size, r.status) for r in results]


def report(results: list[SizeResult], disk_walls: dict[str, list[float]] | None,
           status: tuple[list[float], list[float]], runs: int) -> None:
    rows = [line for r in results for line in standard_rows(r)]
    rows += [line for r in results for line in production_rows(r)]
    rows += [apply_row(r) for r in results]
    if disk_walls is not None:
        rows.append(disk_only_row(disk_walls))
    rows += status_rows(results, status)
    accelerators = ", ".join(sorted({r.accelerator for r in results}))
    print(f"live checkpoint benchmarks, medians of {runs} (disk-only, status: "
          f"{runs * DISK_ONLY_FACTOR}), {accelerators} "
          "(wall clock through the CLI; pause and freeze as the product reports them):")
    print(table(rows))


# --- command line ----------------------------------------------------------------------------

def libvirt_usable(wanted: bool) -> bool:
    if not wanted:
        return False
    reason = available()
    if reason is not None:
        progress(f"libvirt is not available ({reason}); the pause reference falls back to "
                 "state size / dd write bandwidth")
    return reason is None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="256M,1G", help="Guest memory sizes, comma-separated.")
    parser.add_argument("--no-libvirt", action="store_true",
                        help="Compare the pause with state size / dd write bandwidth instead.")
    parser.add_argument("--no-disk-only", action="store_true",
                        help="Leave out the disk-only apply (VMs that are off).")
    args = parser.parse_args()
    with scratch_root() as root:
        run_bench(root, args.runs, args.sizes.split(","), use_libvirt=not args.no_libvirt,
                  disk_only=not args.no_disk_only)


def run_bench(root: Path, runs: int, sizes: list[str], *, use_libvirt: bool = True,
              disk_only: bool = True) -> None:
    """Every measurement, then the table (``bench/run.py --only live`` calls this)."""
    usable = libvirt_usable(use_libvirt)
    image = test_guest_image()
    results = [bench_size(root, size, image, runs, usable) for size in sizes]
    disk_walls = bench_disk_only(root, image, runs) if disk_only else None
    status = bench_status(root, image, runs)
    report(results, disk_walls, status, runs)


if __name__ == "__main__":
    main()
