"""Backup benchmarks on the real test guest (TCG): full backup throughput, VM off and running.

    .venv/bin/python bench/backup.py [--runs N] [--mib N]

Medians of N runs (default 3), each against a reference measured in the same run of this script;
the machine is shared and noisy, so compare ratios, not seconds. One VM of the test guest with a
second, scratch disk, MIB (default 512) MiB of pattern data written into it while off:

    waymark vm create b --kernel K --initrd I --append A --disk GUEST_DISK --disk SIZE
        --memory 256M                                # SIZE: max(1 GiB, MIB)
    qemu-io -f qcow2 -c "write -P 7 0M <MIB>M" SCRATCH_ACTIVE

- VM off: `waymark backup repo init R`, then the wall clock around

      waymark backup run b --repo R --json

  (Python start-up, locking, sealing the files (fsync and sha256) and the manifest included:
  nothing is subtracted) against

      qemu-img convert -f qcow2 -O qcow2 ACTIVE_N R/ref-N.qcow2

  of each disk's chain into the same folder, one after the other, timed together. Target:
  ours/qemu-img >= 0.9 in MiB/s, i.e. the bytes of data in both chains (`qemu-img map`) over
  the time (the median of each run's ratio, ours against the reference of the same run, as for
  every ratio here).
- running: the same on the booted guest, whose backup QEMU takes itself (`blockdev-backup
  sync=full` in one transaction, the guest's file systems frozen through its agent for that
  instant); the reference reads the chains the running QEMU holds with
  `qemu-img convert -U -f qcow2 -O qcow2 ACTIVE_N R/ref-N.qcow2` (acceptable for a reference
  only). Same target.

qemu-img convert leaves its output unsynced (its default cache mode for the target is
`unsafe`), while a point's files are sealed: fsynced, then read back for their sha256. A second,
informational reference adds exactly that to the convert: `waymark.durable.fsync_file` and
`waymark.durable.sha256` of its outputs, timed right after it.

In each run the two are timed in alternating order, each on a new repository, with every file
of both chains written back and dropped from the page cache first (posix_fadvise, those files
only), as for data written long ago; the repository is removed after each run. Also shown: the
bytes each wrote, and the consistency the points recorded.

The guest is built (or reused) in $WAYMARK_TEST_GUEST or /var/tmp/waymark-test-guest; the home
and the repositories go to a temporary folder in $BENCH_DIR (default /var/tmp). The VM is
powered off (`vm stop --force`) and every folder removed at the end, also when a run fails or
on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    Guest,
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
    timed,
)

from waymark import durable

MEMORY = "256M"
TARGET = 0.9

say = reporter("backup")


@dataclass(frozen=True)
class Sample:
    ours: float
    reference: float
    seal: float  # fsync and sha256 of the reference's files, as a point's are sealed
    ours_bytes: int  # the point's files
    reference_bytes: int
    consistency: str


def chain_files(active: Path, shared: bool) -> list[Path]:
    """Every file of the chain under ``active``."""
    chain = json.loads(sh("qemu-img", "info", "--backing-chain", "--output=json", "-f", "qcow2",
                          *(["-U"] if shared else []), str(active)))
    return [Path(layer["filename"]) for layer in chain]


def seal(path: Path) -> str:
    """What sealing a point's file costs it on top of the copy (the product's own calls)."""
    durable.fsync_file(path)
    return durable.sha256(path)


def one_run(guest: Guest, repo: Path, actives: list[Path], running: bool, ours_first: bool
            ) -> Sample:
    home = guest.home
    home.wm("backup", "repo", "init", str(repo))
    files = [f for active in actives for f in chain_files(active, running)]
    references = [repo / f"ref-{n}.qcow2" for n in range(len(actives))]

    def ours() -> dict[str, Any]:
        out = home.json("backup", "run", guest.name, "--repo", str(repo))
        if not out[0]["ok"]:
            raise RuntimeError(f"backup run failed: {out[0]['error']}")
        point: dict[str, Any] = out[0]["point"]
        return point

    def reference() -> None:
        for active, target in zip(actives, references, strict=True):
            sh("qemu-img", "convert", *(["-U"] if running else []), "-f", "qcow2", "-O",
               "qcow2", str(active), str(target))

    def measure(fn: Callable[[], Any]) -> tuple[float, Any]:
        for path in files:
            drop_cached(path)
        return timed(fn)

    def referenced() -> tuple[float, float]:
        took_ref, _ = measure(reference)
        return took_ref, timed(lambda: [seal(r) for r in references])[0]

    if ours_first:
        took, point = measure(ours)
        took_ref, sealed = referenced()
    else:
        took_ref, sealed = referenced()
        took, point = measure(ours)
    sample = Sample(took, took_ref, sealed, int(point["bytes"]),
                    sum(r.stat().st_size for r in references), str(point["consistency"]))
    shutil.rmtree(repo)
    return sample


def bench_state(guest: Guest, root: Path, runs: int, running: bool) -> tuple[list[Sample], int]:
    """The samples of ``runs`` runs, and the bytes of data in the VM's chains."""
    actives = [guest.active_image(0), guest.active_image(1)]
    amount = sum(data_bytes(a, shared=running) for a in actives)
    state = "running" if running else "off"
    samples = []
    for run in range(runs):
        say(f"VM {state}: run {run + 1}/{runs}")
        samples.append(one_run(guest, root / f"repo-{state}-{run}", actives, running,
                               ours_first=run % 2 == 0))
    return samples, amount


def rows(state: str, samples: list[Sample], amount: int) -> list[Row]:
    """Ratios are medians of each run's own (ours against the reference of the same run)."""
    rate = [amount / s.ours for s in samples]
    ratio = median(s.reference / s.ours for s in samples)
    label = "qemu-img convert" + (" -U" if state == "running" else "")
    return [row("full backup: backup run", state, rate,
                f"{mib_per_s(median(amount / s.reference for s in samples))} {label}",
                ratio, f">= {TARGET}", ratio >= TARGET, fmt=mib_per_s),
            row("  vs convert + fsync + sha256", state, rate,
                f"{mib_per_s(median(amount / (s.reference + s.seal) for s in samples))} "
                f"{label} + seal", median((s.reference + s.seal) / s.ours for s in samples),
                fmt=mib_per_s),
            row("full backup: wall time", state, [s.ours for s in samples],
                f"{seconds(median(s.reference for s in samples))} {label}",
                median(s.ours / s.reference for s in samples)),
            row("full backup: bytes written", state, [float(s.ours_bytes) for s in samples],
                f"{mib(median(s.reference_bytes for s in samples))} {label}",
                median(s.ours_bytes / s.reference_bytes for s in samples), fmt=mib)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=512,
                        help="MiB of data written into the scratch disk (1 GiB or this size).")
    args = parser.parse_args()
    image = test_guest_image()
    with scratch_home() as home:
        guest = Guest(home, MEMORY, image, f"{max(1024, args.mib)}M")
        qemu_io_write(guest.active_image(1), 0, args.mib, 7)
        off, amount_off = bench_state(guest, home.path.parent, args.runs, running=False)
        say("booting the guest")
        guest.boot()
        guest.wait_agent()
        live, amount_live = bench_state(guest, home.path.parent, args.runs, running=True)
    print(f"backup benchmarks, medians of {args.runs}, {guest.accelerator} (wall clock through "
          f"the CLI; {mib(amount_off)} of data off, {mib(amount_live)} running):")
    print(table([*rows("off", off, amount_off), *rows("running", live, amount_live)]))
    for state, samples in (("off", off), ("running", live)):
        consistencies = "; ".join(sorted({s.consistency for s in samples}))
        print(f"VM {state}: the points recorded {consistencies}")


if __name__ == "__main__":
    main()
