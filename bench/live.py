"""Live checkpoint benchmarks on the real test guest (TCG): pause, freeze, apply.

    .venv/bin/python bench/live.py [--runs N] [--sizes 256M,1G] [--no-libvirt]

Medians of N runs (default 5) per guest memory size, each against a reference measured in the
same run of this script; the machine is shared and noisy, so compare ratios, not seconds. Wall
times are taken around the real CLI, Python start-up included.

- standard pause: the guest's pause during `checkpoint create VM --type standard --json` (its
  `pause_seconds`: QEMU's STOP to RESUME event timestamps) against libvirt's live memory snapshot
  of the same guest with the same memory (`virsh snapshot-create-as --live --memspec ...`, its
  STOP to RESUME, see bench/libvirt_ref.py), ratio of the medians; target ours/libvirt <= 0.5.
  Without libvirt (or with --no-libvirt) the reference is the state file's size divided by the
  write bandwidth of `dd if=/dev/zero of=FOLDER/x bs=1M count=512 oflag=direct` into the
  checkpoint folder, measured after each checkpoint (median of the per-run ratios, same 0.5).
  Also shown: the command's wall time (libvirt's: the whole `virsh snapshot-create-as`) and the
  state file's size.
- production freeze: `freeze_seconds` of `checkpoint create VM --type production --json` (the
  freeze request to the guard's confirmed thaw); target median < 200 ms. Also its wall time.
- standard apply: `checkpoint apply VM CKPT --discard-current --start` of the last standard
  checkpoint, from off (`vm stop --force` first, not timed) until the command returns with the
  VM running, against the state file's size divided by the read bandwidth of
  `dd if=STATE of=/dev/null bs=1M iflag=direct` taken just before (median of the per-run
  ratios; 1.0 = as fast as the disk can read the state once; no pass mark). The state file's
  pages are dropped from the page cache (posix_fadvise DONTNEED, that file only) before each
  apply, as for a checkpoint taken long ago. Each apply is checked to resume the guest (it goes
  on counting, no fresh READY).
- disk-only apply: two VMs that are off with one new empty disk each, 1 GiB and 100 GiB
  (`vm create NAME --disk 1G` / `--disk 100G`), one checkpoint each, then
  `checkpoint apply VM CKPT --discard-current`, the two alternating, 3 x N times each (a
  cheap command dominated by Python start-up, so noisier); median of the per-pair ratios
  100 GiB / 1 GiB; target ~1 (PASS within 0.8-1.25: independent of the disk size).

Per memory size, libvirt's domain boots and is gone before our VM boots, so only one guest runs
at a time. The guest is built (or reused) in $WAYMARK_TEST_GUEST or /var/tmp/waymark-test-guest;
homes go to a temporary folder in $BENCH_DIR (default /var/tmp). Every VM is powered off
(`vm stop --force`) and every home removed at the end, also when a run fails or on SIGTERM.
"""

from __future__ import annotations

import argparse
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
from libvirt_ref import available, libvirt_snapshot_pause

from waymark.testguest.build import GuestImage

DD_MIB = 512
DISK_SIZES = ("1G", "100G")
PAUSE_TARGET = 0.5  # ours / reference
FREEZE_TARGET = 0.200  # seconds
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
    applied: list[Applied]


def bench_size(root: Path, size: str, image: dict[str, Any], runs: int, use_libvirt: bool
               ) -> SizeResult:
    home = Home(root / f"home-{size}")
    try:
        guest = Guest(home, size, image)
        reference = None
        if use_libvirt:
            progress(f"{size}: libvirt reference, {runs} live snapshots")
            reference = libvirt_reference(guest, runs, root, image)
        progress(f"{size}: booting our VM; {runs} standard, {runs} production checkpoints")
        guest.boot()
        standard = [standard_checkpoint(guest, reference is None) for _ in range(runs)]
        guest.wait_agent()
        production = [production_checkpoint(guest) for _ in range(runs)]
        progress(f"{size}: {runs} applies of a standard checkpoint")
        applied = [standard_apply(guest, standard[-1]) for _ in range(runs)]
        return SizeResult(size, guest.accelerator, standard, reference, production, applied)
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
    return [pause_row(r),
            row("standard: create, wall", r.size, walls,
                "-" if ref is None else f"{seconds(ref.wall)} virsh wall",
                None if ref is None else median(walls) / ref.wall),
            row("standard: state file", r.size, sizes,
                "-" if ref is None else f"{mib(ref.state_bytes)} libvirt",
                None if ref is None else median(sizes) / ref.state_bytes, fmt=mib)]


def production_rows(r: SizeResult) -> list[Row]:
    freezes = [f for f, _ in r.production]
    return [row("production: freeze window", r.size, freezes, target=f"< {seconds(FREEZE_TARGET)}",
                ok=median(freezes) < FREEZE_TARGET),
            row("production: create, wall", r.size, [w for _, w in r.production])]


def apply_row(r: SizeResult) -> Row:
    limit = median(a.limit for a in r.applied)
    bandwidth = median(a.bandwidth for a in r.applied)
    return row("standard: apply --start", r.size, [a.wall for a in r.applied],
               f"{seconds(limit)} state/dd read {mib(bandwidth)}/s",
               median(a.wall / a.limit for a in r.applied), "1.0 = disk-bound")


def disk_only_row(walls: dict[str, list[float]]) -> Row:
    small, large = DISK_SIZES
    ratio = median(b / a for a, b in zip(walls[small], walls[large], strict=True))
    low, high = DISK_RATIO_BAND
    return row("disk-only: apply (VM off)", f"{large} disk", walls[large],
               f"{seconds(median(walls[small]))} {small} disk", ratio, f"~1 ({low}-{high})",
               low <= ratio <= high)


def report(results: list[SizeResult], disk_walls: dict[str, list[float]], runs: int) -> None:
    rows = [line for r in results for line in standard_rows(r)]
    rows += [line for r in results for line in production_rows(r)]
    rows += [apply_row(r) for r in results]
    rows.append(disk_only_row(disk_walls))
    accelerators = ", ".join(sorted({r.accelerator for r in results}))
    print(f"live checkpoint benchmarks, medians of {runs} (disk-only: "
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
    args = parser.parse_args()
    use_libvirt = libvirt_usable(not args.no_libvirt)
    image = test_guest_image()
    with scratch_root() as root:
        results = [bench_size(root, size, image, args.runs, use_libvirt)
                   for size in args.sizes.split(",")]
        disk_walls = bench_disk_only(root, image, args.runs)
    report(results, disk_walls, args.runs)


if __name__ == "__main__":
    main()
