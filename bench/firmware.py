"""Checkpoints of a Generation 2 VM (UEFI variable store + TPM) against the same guest without
them, on the real test guest (TCG), in the same run:

    .venv/bin/python bench/firmware.py [--runs N] [--memory 256M]

- standard pause: the guest's pause (`pause_seconds`, QEMU's STOP to RESUME) of
  `checkpoint create VM --type standard` of a `--firmware uefi --tpm on` VM against the same
  guest booted with SeaBIOS and no TPM; ratio of the medians; target <= 1.3 (the TPM's state
  rides in the memory stream and its copy is taken while the guest is stopped anyway; the
  variable store is one more node in the switch transaction).
- the same pause of a UEFI VM without a TPM, to tell the firmware's part from the TPM's.
- production freeze: `freeze_seconds` of `checkpoint create VM --type production` of the
  UEFI + TPM VM (freeze to thaw, the CPUs stopped inside it while the TPM state is copied and
  the disks switch); target median < 200 ms; the plain VM's beside it.

The three VMs run at once and take their checkpoints in turn, so the shared machine's changing
load falls on each alike. Medians of N runs (default 5); the machine is shared and noisy:
compare the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness import Guest, Home, median, reporter, row, scratch_root, table, test_guest_image
from live import production_checkpoint, standard_checkpoint

PAUSE_RATIO_TARGET = 1.3
FREEZE_TARGET = 0.200  # seconds
GEN2 = ("--firmware", "uefi", "--tpm", "on")
UEFI_ONLY = ("--firmware", "uefi")

progress = reporter("firmware")


KINDS = (("bios", ()), ("uefi", UEFI_ONLY), ("uefi-tpm", GEN2))


def measure(root: Path, image: dict[str, Any], memory: str, runs: int
            ) -> dict[str, tuple[list[float], list[float]]]:
    """Per kind of VM, (standard pauses, production freezes) of ``runs`` checkpoints each.

    The three guests run at once and take their checkpoints in turn (bios, uefi, uefi-tpm,
    bios, ...), so a change of the shared machine's load falls on all three alike; the two
    idle guests cost little while the third is measured."""
    homes = {label: Home(root / f"home-{label}") for label, _ in KINDS}
    try:
        guests = {label: Guest(homes[label], memory, image, options=options)
                  for label, options in KINDS}
        for label, guest in guests.items():
            progress(f"{label}: booting")
            guest.boot()
        progress(f"{runs} rounds of standard, then of production checkpoints, in turn")
        pauses: dict[str, list[float]] = {label: [] for label in guests}
        freezes: dict[str, list[float]] = {label: [] for label in guests}
        for _ in range(runs):
            for label, guest in guests.items():
                pauses[label].append(standard_checkpoint(guest, False).pause)
        for guest in guests.values():
            guest.wait_agent()
        for _ in range(runs):
            for label, guest in guests.items():
                freezes[label].append(production_checkpoint(guest)[0])
        return {label: (pauses[label], freezes[label]) for label in guests}
    finally:
        for home in homes.values():
            home.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory", default="256M")
    args = parser.parse_args()
    image = test_guest_image()
    with scratch_root() as root:
        measured = measure(root, image, args.memory, args.runs)
    plain, uefi, gen2 = measured["bios"], measured["uefi"], measured["uefi-tpm"]
    ratio = median(gen2[0]) / median(plain[0])
    rows = [row("standard: guest pause", f"{args.memory} uefi+tpm", gen2[0],
                f"{median(plain[0]) * 1000:.0f} ms bios", ratio, f"<= {PAUSE_RATIO_TARGET}",
                ratio <= PAUSE_RATIO_TARGET),
            row("standard: guest pause", f"{args.memory} uefi, no tpm", uefi[0],
                f"{median(plain[0]) * 1000:.0f} ms bios", median(uefi[0]) / median(plain[0])),
            row("production: freeze window", f"{args.memory} uefi+tpm", gen2[1],
                f"{median(plain[1]) * 1000:.0f} ms bios", median(gen2[1]) / median(plain[1]),
                f"< {FREEZE_TARGET * 1000:.0f} ms", median(gen2[1]) < FREEZE_TARGET)]
    print(f"Generation 2 checkpoint benchmarks, medians of {args.runs}:")
    print(table(rows))


if __name__ == "__main__":
    main()
