"""What the benchmarks on the real test guest share (bench/live.py, bench/merge.py,
bench/backup.py): commands and the CLI in a temporary Waymark home, VMs of the test guest, the
page cache, medians and the table they print.

Every VM made through a :class:`Home` is powered off (`vm stop --force`) by :meth:`Home.close`;
:func:`scratch_root` removes the temporary folder and turns SIGTERM into SystemExit, so the
clean-up in ``finally`` blocks also runs when a benchmark is stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from guestlog import SerialLog

from waymark.guest import agent
from waymark.qemu.cmdline import RunFiles

T = TypeVar("T")

WAYMARK = [sys.executable, "-m", "waymark"]
GUEST_DIR = os.environ.get("WAYMARK_TEST_GUEST", "/var/tmp/waymark-test-guest")
VM = "b"
READY = re.compile(rb"^READY [0-9a-f-]{36}\r?$", re.MULTILINE)
BOOT_TIMEOUT = 180.0  # TCG on a shared, noisy machine
COMMAND_TIMEOUT = 900.0
SETTLE_COUNTER = 10  # as bench/runtime.py and bench/libvirt_ref.py
MIB = 1 << 20


# --- commands --------------------------------------------------------------------------------

def sh(*argv: str, env: dict[str, str] | None = None) -> str:
    """stdout of ``argv``; a RuntimeError with its stderr when it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False,
                          timeout=COMMAND_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout:g} s")
        time.sleep(0.05)


def reporter(tag: str) -> Callable[[str], None]:
    """Progress lines on stderr, ``[tag] message``."""
    def say(message: str) -> None:
        print(f"[{tag}] {message}", file=sys.stderr, flush=True)
    return say


def drop_cached(path: Path) -> None:
    """Evict ``path``'s clean pages from the page cache (that file only), after writing back
    its dirty ones."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def median(values: Iterable[float]) -> float:
    return statistics.median(values)


def data_bytes(image: Path, depth: int | None = None, *, shared: bool = False) -> int:
    """Bytes of data ``qemu-img map`` finds in the image's chain (``depth``: only those of that
    layer, 0 being the image itself); ``shared`` reads an image a running QEMU holds (-U)."""
    extents = json.loads(sh("qemu-img", "map", "--output=json", "-f", "qcow2",
                            *(["-U"] if shared else []), str(image)))
    return sum(e["length"] for e in extents
               if e["data"] and (depth is None or e["depth"] == depth))


def qemu_io_write(image: Path, offset_mib: int, length_mib: int, pattern: int) -> None:
    """A byte pattern into an image nothing else has open (in requests of at most 1 GiB:
    qemu-io takes less than 2 GiB at once)."""
    chunks = [f"write -P {pattern} {start}M {min(1024, offset_mib + length_mib - start)}M"
              for start in range(offset_mib, offset_mib + length_mib, 1024)]
    sh("qemu-io", "-f", "qcow2", *(arg for chunk in chunks for arg in ("-c", chunk)),
       str(image))


# --- a Waymark home and the test guest -------------------------------------------------------

def test_guest_image() -> dict[str, Any]:
    """The test guest, built (or reused) in $WAYMARK_TEST_GUEST or the default folder."""
    image: dict[str, Any] = json.loads(sh(*WAYMARK, "guest", "build", "--dest", GUEST_DIR,
                                          "--json"))
    return image


class Home:
    """A Waymark home; :meth:`close` powers off every VM made in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("WAYMARK_")},
                    "WAYMARK_HOME": str(path)}
        self.vms: list[str] = []

    def wm(self, *args: str) -> str:
        return sh(*WAYMARK, *args, env=self.env)

    def json(self, *args: str) -> Any:
        return json.loads(self.wm(*args, "--json"))

    def create_vm(self, name: str, image: dict[str, Any], *options: str) -> None:
        self.vms.append(name)
        self.wm("vm", "create", name, "--kernel", image["kernel"], "--initrd", image["initrd"],
                "--append", image["append"], *options)

    def stop(self, name: str) -> None:
        """``vm stop --force``: powers off a live VM, discards a saved state; no error if off."""
        subprocess.run([*WAYMARK, "vm", "stop", name, "--force"], env=self.env,
                       capture_output=True, check=False, timeout=COMMAND_TIMEOUT)

    def close(self) -> None:
        for name in self.vms:
            self.stop(name)


class Guest(SerialLog):
    """The test guest as VM ``name`` of ``home``, with ``memory`` of memory; ``disks`` are
    further ``--disk`` values after the guest's own data disk."""

    def __init__(self, home: Home, memory: str, image: dict[str, Any], *disks: str,
                 name: str = VM, options: tuple[str, ...] = ()) -> None:
        self.home = home
        self.name = name
        home.create_vm(name, image, "--disk", image["disk"],
                       *(arg for disk in disks for arg in ("--disk", disk)), "--memory", memory,
                       *options)
        self.memory_mib = int(home.json("vm", "show", name)["memory_mib"])
        self.serial = Path(home.json("vm", "status", name)["serial_log"])
        self.accelerator = "?"

    def active_image(self, disk: int) -> Path:
        """The active image of the VM's disk number ``disk`` (0: the guest's data disk)."""
        return Path(self.home.json("vm", "show", self.name)["disks"][disk]["active_image"])

    def wait_counting(self, above: int, mark: int = 0, timeout: float = 60.0) -> None:
        wait_for(f"COUNTER above {above}", lambda: self.last_counter(mark) > above, timeout)

    def boot(self) -> None:
        mark = self.mark()
        self.accelerator = self.home.json("vm", "start", self.name)["accelerator"]
        wait_for("READY", lambda: READY.search(self.log(mark)) is not None, BOOT_TIMEOUT)
        self.wait_counting(SETTLE_COUNTER - 1, mark)

    def wait_agent(self) -> None:
        wait_for("guest agent", lambda: bool(self.home.json("vm", "status", self.name)["agent"]),
                 BOOT_TIMEOUT)

    def stop(self) -> None:
        self.home.stop(self.name)

    def start_program(self, path: str, *args: str) -> int:
        """Start a program in the guest through its agent (`guest-exec`, not waited for); its
        pid in the guest. The agent's socket is free again when this returns."""
        async def run() -> int:
            async with agent.connect(RunFiles(self.serial.parent).agent, self.name) as guest:
                started = await guest.command("guest-exec", 10.0, path=path, arg=list(args))
            return int(started["pid"])
        return asyncio.run(run())


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """SIGTERM raises SystemExit, so the clean-up in ``finally`` blocks runs."""
    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def scratch_root() -> Iterator[Path]:
    """A temporary folder in $BENCH_DIR (default /var/tmp), removed at the end, with SIGTERM
    turned into SystemExit meanwhile."""
    with exit_on_sigterm(), \
            tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        yield Path(tmp)


@contextmanager
def scratch_home() -> Iterator[Home]:
    """A Waymark home in a :func:`scratch_root`; every VM made in it is powered off at the
    end, before the folder goes."""
    with scratch_root() as root:
        home = Home(root / "home")
        try:
            yield home
        finally:
            home.close()


# --- the table -------------------------------------------------------------------------------

Row = tuple[str, ...]
HEADER: Row = ("measure", "guest", "ours", "ours min-max", "reference", "ratio", "target",
               "result")


def seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1.0 else f"{value:.2f} s"


def mib(value: float) -> str:
    return f"{value / MIB:.0f} MiB"


def mib_per_s(value: float) -> str:
    """Bytes per second as MiB/s."""
    return f"{value / MIB:.0f} MiB/s"


def row(measure: str, guest: str, values: list[float], reference: str = "-",
        ratio: float | None = None, target: str = "-", ok: bool | None = None,
        fmt: Callable[[float], str] = seconds) -> Row:
    """One line: the median of ``values`` (ours), their range, the reference and the ratio."""
    return (measure, guest, fmt(median(values)), f"{fmt(min(values))}-{fmt(max(values))}",
            reference, "-" if ratio is None else f"{ratio:.2f}", target,
            "" if ok is None else "PASS" if ok else "FAIL")


def table(rows: Sequence[Row], header: Row = HEADER) -> str:
    grid = [header, *rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
