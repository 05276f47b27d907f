"""Runtime benchmarks on the real test guest (QEMU; TCG where KVM does not work).

    .venv/bin/python bench/runtime.py [--runs N] [--sizes 256M,1G]

Medians of N cycles (default 5) per guest memory size; each cycle is boot, save, resume, then
`vm stop --force`. Every time is wall clock around the real CLI, Python start-up included.

- boot:   `vm start` of an off VM until the guest prints READY on its serial log.
- save:   `vm save` of the running guest until the command returns (QEMU gone).
- resume: `vm start` of the saved VM until QEMU runs and the guest prints a COUNTER above the
          last one before the save.
- pause:  the guest's pause during `vm save` (the `seconds` of `vm save --json`) against the
          physical limit measured in the same cycle: state bytes / the write bandwidth of
          `dd if=/dev/zero bs=1M count=512 oflag=direct` into the state file's folder
          (ratio 1.0 = as fast as the disk allows).

The guest is built (or reused) in $WAYMARK_TEST_GUEST or /var/tmp/waymark-test-guest; homes go
to a temporary folder in $BENCH_DIR (default /var/tmp). The accelerator probe of a first start
is paid once per home by a warm-up boot that is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guestlog import SerialLog

WAYMARK = [sys.executable, "-m", "waymark"]
GUEST_DIR = os.environ.get("WAYMARK_TEST_GUEST", "/var/tmp/waymark-test-guest")
READY = re.compile(rb"^READY [0-9a-f-]{36}\r?$", re.MULTILINE)
TIMEOUT = 120.0
DD_MIB = 512


def sh(*argv: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout


def wait_for(what: str, check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout:g} s")
        time.sleep(0.02)


class Guest(SerialLog):
    """One VM of the test guest in its own home."""

    def __init__(self, root: Path, memory: str, image: dict[str, Any]) -> None:
        self.path = root / f"home-{memory}"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("WAYMARK_")},
                    "WAYMARK_HOME": str(self.path)}
        self.wm("vm", "create", "b", "--kernel", image["kernel"], "--initrd", image["initrd"],
                "--disk", image["disk"], "--memory", memory, "--append", image["append"])
        self.serial = Path(self.json("vm", "status", "b")["serial_log"])
        self.accelerator = "?"

    def wm(self, *args: str) -> str:
        return sh(*WAYMARK, *args, env=self.env)

    def json(self, *args: str) -> Any:
        return json.loads(self.wm(*args, "--json"))

    def boot(self) -> float:
        """Seconds from `vm start` to READY."""
        mark = self.mark()
        start = time.perf_counter()
        self.accelerator = self.json("vm", "start", "b")["accelerator"]
        wait_for("READY", lambda: READY.search(self.log(mark)) is not None)
        return time.perf_counter() - start

    def stop(self) -> None:
        subprocess.run([*WAYMARK, "vm", "stop", "b", "--force"], env=self.env,
                       capture_output=True, check=False)


def dd_bandwidth(folder: Path) -> float:
    """Bytes per second of a direct 512 MiB write into ``folder``."""
    target = folder / "dd-bench.tmp"
    try:
        start = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={DD_MIB}",
                        "oflag=direct"], check=True, capture_output=True)
        return DD_MIB * 2**20 / (time.perf_counter() - start)
    finally:
        target.unlink(missing_ok=True)


def cycle(guest: Guest) -> dict[str, float]:
    """boot, save, resume: one sample of each, and the pause against the disk's limit."""
    sample = {"boot": guest.boot()}
    wait_for("COUNTER 10", lambda: guest.last_counter() >= 10, 30.0)
    start = time.perf_counter()
    saved = guest.json("vm", "save", "b")
    sample["save"] = time.perf_counter() - start
    sample["pause"], sample["bytes"] = saved["seconds"], saved["bytes"]
    sample["bandwidth"] = dd_bandwidth(Path(saved["state_file"]).parent)
    sample["limit"] = saved["bytes"] / sample["bandwidth"]
    last = guest.last_counter()
    mark = guest.mark()
    start = time.perf_counter()
    guest.wm("vm", "start", "b")
    wait_for("COUNTER after the resume", lambda: guest.last_counter(mark) > last, 60.0)
    sample["resume"] = time.perf_counter() - start
    if READY.search(guest.log(mark)):
        raise RuntimeError("the saved guest booted afresh instead of resuming")
    guest.stop()
    return sample


def bench_size(root: Path, memory: str, image: dict[str, Any], runs: int) -> dict[str, Any]:
    guest = Guest(root, memory, image)
    try:
        guest.boot()  # warm-up: pays the accelerator probe, fills the page cache
        guest.stop()
        samples = [cycle(guest) for _ in range(runs)]
    finally:
        guest.stop()
    result: dict[str, Any] = {key: statistics.median(s[key] for s in samples)
                              for key in samples[0]}
    result["ratio"] = statistics.median(s["pause"] / s["limit"] for s in samples)
    result["accelerator"] = guest.accelerator
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="256M,1G", help="Guest memory sizes, comma-separated.")
    args = parser.parse_args()
    image = json.loads(sh(*WAYMARK, "guest", "build", "--dest", GUEST_DIR, "--json"))
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        results = {size: bench_size(Path(tmp), size, image, args.runs)
                   for size in args.sizes.split(",")}
    accelerators = ", ".join(sorted({r.pop("accelerator") for r in results.values()}))
    print(f"runtime benchmarks, medians of {args.runs}, {accelerators} "
          "(wall clock through the CLI):")
    for size, r in results.items():
        print(f"{size:>5}: boot to READY {r['boot']:.2f} s, save {r['save']:.2f} s, "
              f"resume until counting {r['resume']:.2f} s")
    for size, r in results.items():
        print(f"{size:>5}: save pause {r['pause']:.3f} s for {r['bytes'] / 2**20:.0f} MiB of "
              f"state; disk {r['bandwidth'] / 2**20:.0f} MiB/s (dd oflag=direct) -> limit "
              f"{r['limit']:.3f} s; pause/limit ratio {r['ratio']:.2f} (1.0 = disk-bound)")


if __name__ == "__main__":
    main()
