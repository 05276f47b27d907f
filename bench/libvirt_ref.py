"""Reference: the guest pause of a libvirt live memory snapshot of the test guest (TCG).

    .venv/bin/python bench/libvirt_ref.py [--runs N] [--memory 256,1024]

Each run is, on a running guest,

    virsh snapshot-create-as DOMAIN --name refN --live \\
        --memspec file=refN.mem,snapshot=external --diskspec vda,snapshot=external,file=refN.qcow2

then ``virsh snapshot-delete DOMAIN refN --metadata``. One domain serves all runs of a memory
size: every snapshot puts a new overlay on top of vda (the chain grows by one per run, which
costs nothing measurable) and only the metadata is deleted, so the next snapshot starts from the
same kind of state. The memory file is measured (``state_bytes``) and then removed.

The guest is the one our runtime benchmark boots (:func:`waymark.testguest.build.build`, in
$WAYMARK_TEST_GUEST or /var/tmp/waymark-test-guest), defined the way Waymark starts its VMs:
``<domain type='qemu'>`` (TCG), machine pc-q35-7.2, CPU Westmere, 1 vCPU, direct kernel boot with
the guest's command line (``console=ttyS0``), a qcow2 overlay of the data disk as virtio vda, a
user-mode virtio NIC, the guest agent's virtio-serial port, and the serial console into a file
that is polled for ``READY`` and ``COUNTER n``. libvirt's extras that Waymark VMs lack are
switched off where it allows (USB controller, memory balloon).

What is measured, per run:

- ``pause_s``: the time the guest's vCPUs were stopped, from QEMU's own QMP events. A
  ``virsh qemu-monitor-event DOMAIN --loop`` runs during the snapshot; without ``--timestamp``
  it prints QEMU's event timestamps (microseconds, taken inside QEMU when the event is emitted),
  and the pause is RESUME minus STOP (summed, should QEMU stop the guest more than once). With
  ``--live``, libvirt migrates the memory to the file while the guest runs; QEMU stops the vCPUs
  for the last pass (STOP), then libvirt takes the disk snapshot and resumes them (RESUME). So
  this pause covers the final memory pass, the disk snapshot and libvirt's work in between; the
  ``downtime`` of libvirt's job-completed event would cover only the first part, and the
  domain lifecycle events (``virsh event``) are libvirt's re-emission of the same QMP events,
  with millisecond timestamps of their arrival. The run fails, rather than guess, when the
  listener missed the migration's start (it was not listening yet) or a STOP has no RESUME.
- ``wall_s``: wall clock around the whole ``virsh snapshot-create-as`` (virsh start-up and
  connection included).
- ``state_bytes``: the size of the memory file (pages the guest never touched are not written,
  so it is well below the guest's memory size).

Set-up (Debian 12, as root, no systemd): ``apt-get install libvirt-daemon-system``; in
/etc/libvirt/qemu.conf ``user = "root"``, ``group = "root"``, ``dynamic_ownership = 0`` (libvirt
then leaves the shared guest files' owners alone); then ``virtlogd -d; libvirtd -d``.
:func:`available` says why libvirt cannot be used, so a caller can fall back.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from waymark.model.hardware import DEFAULT_CPU_MODEL, MACHINE
from waymark.testguest.build import GuestImage, build

URI = "qemu:///system"
VIRSH = ["virsh", "--quiet", "--connect", URI]
GUEST_DIR = os.environ.get("WAYMARK_TEST_GUEST", "/var/tmp/waymark-test-guest")
AGENT_PORT = "org.qemu.guest_agent.0"
READY = re.compile(rb"^READY [0-9a-f-]{36}\r?$", re.MULTILINE)
COUNTER = re.compile(rb"^COUNTER (\d+)\r?$", re.MULTILINE)
EVENT = re.compile(r"^event (\w+) at (\d+)\.(\d+) for domain '.*?': (.*)$", re.MULTILINE)
BOOT_TIMEOUT = 180.0  # TCG on a shared, noisy machine
SNAPSHOT_TIMEOUT = 600.0
COMMAND_TIMEOUT = 60.0
LISTENER_START = 1.0  # seconds for virsh to connect and register before the snapshot starts
SETTLE_COUNTER = 10  # as bench/runtime.py: the guest has been counting for a while

Run = dict[str, float | int]


class LibvirtError(RuntimeError):
    """A virsh command failed, or the events of a snapshot did not give a pause."""


# --- virsh -----------------------------------------------------------------------------------

def virsh(*args: str, timeout: float = COMMAND_TIMEOUT) -> str:
    """stdout of ``virsh ARGS``; LibvirtError with virsh's message when it fails."""
    try:
        done = subprocess.run([*VIRSH, *args], capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as err:
        raise LibvirtError(f"virsh {' '.join(args)}: no answer within {timeout:g} s") from err
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip()).replace("\n", " ")
        raise LibvirtError(f"virsh {' '.join(args)}: {message}")
    return done.stdout


def available() -> str | None:
    """None when libvirt can run the test guest under TCG here, else the reason it cannot."""
    if shutil.which("virsh") is None:
        return "virsh is not installed (apt-get install libvirt-daemon-system)"
    try:
        version = virsh("version", timeout=30.0)
        virsh("domcapabilities", "--virttype", "qemu", "--arch", "x86_64", "--machine", MACHINE,
              timeout=30.0)
    except LibvirtError as err:
        return f"{err} (is libvirtd running? start it with: virtlogd -d; libvirtd -d)"
    if "hypervisor: QEMU" not in version:
        return f"libvirt at {URI} runs no QEMU hypervisor: {version.strip()!r}"
    return None


# --- the domain ------------------------------------------------------------------------------

def domain_xml(name: str, memory_mib: int, image: GuestImage, disk: Path, serial: Path) -> str:
    """The test guest as a TCG domain, shaped like a Waymark VM (see the module docstring)."""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine={quoteattr(MACHINE)}>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(image.append)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>{escape(DEFAULT_CPU_MODEL)}</model>
  </cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file={quoteattr(str(disk))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
    <serial type='file'>
      <source path={quoteattr(str(serial))}/>
      <target port='0'/>
    </serial>
    <channel type='unix'><target type='virtio' name={quoteattr(AGENT_PORT)}/></channel>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@contextlib.contextmanager
def defined_domain(xml: Path, name: str) -> Iterator[str]:
    """Define the domain from ``xml``; on the way out destroy and undefine it, come what may."""
    virsh("define", str(xml))
    try:
        yield name
    finally:
        remove_domain(name)


def remove_domain(name: str) -> None:
    """Destroy (if running) and undefine ``name`` with any snapshot metadata left."""
    with contextlib.suppress(LibvirtError):
        virsh("destroy", name)
    try:
        virsh("undefine", name, "--snapshots-metadata")
    except LibvirtError as err:
        print(f"warning: could not undefine domain {name}: {err}", file=sys.stderr)


# --- the guest's serial console --------------------------------------------------------------

def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise LibvirtError(f"no {what} within {timeout:g} s")
        time.sleep(0.05)


def read_log(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def last_counter(serial: Path) -> int:
    """The last complete ``COUNTER n`` line of the serial log, 0 before the first."""
    text = read_log(serial)
    found = COUNTER.findall(text[:text.rfind(b"\n") + 1])
    return int(found[-1]) if found else 0


def boot(name: str, serial: Path) -> None:
    """Start the domain and wait until the guest has booted and counts."""
    virsh("start", name)
    wait_for("READY on the serial console", lambda: READY.search(read_log(serial)) is not None,
             BOOT_TIMEOUT)
    wait_for(f"COUNTER {SETTLE_COUNTER}", lambda: last_counter(serial) >= SETTLE_COUNTER, 60.0)


# --- QMP events ------------------------------------------------------------------------------

def parse_events(text: str) -> list[tuple[str, float, str]]:
    """(name, QEMU's timestamp in seconds, data) of each line virsh printed for an event."""
    return [(m[1], int(m[2]) + int(m[3]) / 10 ** len(m[3]), m[4]) for m in EVENT.finditer(text)]


def vcpu_pause(events: list[tuple[str, float, str]]) -> float:
    """Seconds between STOP and RESUME (summed over pairs) in a live snapshot's events."""
    if not any(name == "MIGRATION" and '"setup"' in data for name, _, data in events):
        raise LibvirtError("the event listener missed the start of the memory migration")
    paused, stopped_at, pairs = 0.0, None, 0
    for name, at, _ in events:
        if name == "STOP" and stopped_at is None:
            stopped_at = at
        elif name == "RESUME" and stopped_at is not None:
            paused, stopped_at, pairs = paused + at - stopped_at, None, pairs + 1
    if pairs == 0 or stopped_at is not None:
        raise LibvirtError(f"no STOP/RESUME pair in the events: {[e[0] for e in events]}")
    return paused


def has_resumed(log: Path) -> bool:
    """Whether the listener has printed a RESUME after its last STOP."""
    names = [name for name, _, _ in parse_events(read_log(log).decode(errors="replace"))]
    stops = [index for index, name in enumerate(names) if name == "STOP"]
    return bool(stops) and "RESUME" in names[stops[-1]:]


@contextlib.contextmanager
def listening(name: str, log: Path) -> Iterator[None]:
    """``virsh qemu-monitor-event NAME --loop`` into ``log`` for the duration of the block."""
    with log.open("wb") as out:
        listener = subprocess.Popen([*VIRSH, "qemu-monitor-event", name, "--loop"],
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            time.sleep(LISTENER_START)
            if listener.poll() is not None:
                raise LibvirtError(f"virsh qemu-monitor-event exited: {read_log(log)!r}")
            yield
            # libvirt may return before the RESUME event reached the listener.
            with contextlib.suppress(LibvirtError):
                wait_for("RESUME event", lambda: has_resumed(log), 10.0)
        finally:
            stop(listener)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT ends ``--loop`` cleanly (output flushed); kill it if it does not go."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=10.0)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- the measurement -------------------------------------------------------------------------

def snapshot_once(name: str, folder: Path, index: int, serial: Path) -> Run:
    """One live external snapshot of the running domain: its pause, wall time and state size."""
    snapshot = f"ref{index}"
    memory, disk = folder / f"{snapshot}.mem", folder / f"{snapshot}.qcow2"
    events = folder / f"{snapshot}.events"
    with listening(name, events):
        start = time.perf_counter()
        virsh("snapshot-create-as", name, "--name", snapshot, "--live",
              "--memspec", f"file={memory},snapshot=external",
              "--diskspec", f"vda,snapshot=external,file={disk}", timeout=SNAPSHOT_TIMEOUT)
        wall = time.perf_counter() - start
    before = last_counter(serial)
    virsh("snapshot-delete", name, snapshot, "--metadata")
    state_bytes = memory.stat().st_size
    memory.unlink()
    pause = vcpu_pause(parse_events(events.read_text(errors="replace")))
    # The guest really runs again before the next run starts.
    wait_for("COUNTER after the snapshot", lambda: last_counter(serial) > before, 60.0)
    return {"pause_s": pause, "wall_s": wall, "state_bytes": state_bytes}


def libvirt_snapshot_pause(memory_mib: int, runs: int, workdir: Path,
                           image: GuestImage | None = None) -> list[Run]:
    """``runs`` live memory snapshots of the test guest with ``memory_mib`` MiB under libvirt.

    Files go to a temporary folder in ``workdir``, removed at the end; the domain is destroyed
    and undefined even when a run fails.
    """
    guest = image or build(Path(GUEST_DIR))
    folder = Path(tempfile.mkdtemp(prefix="libvirt-ref-", dir=workdir)).absolute()
    name = f"waymark-libvirt-ref-{uuid.uuid4().hex[:8]}"
    serial, disk, xml = folder / "serial.log", folder / "vda.qcow2", folder / "domain.xml"
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                        "-b", str(guest.disk), str(disk)], check=True, capture_output=True)
        xml.write_text(domain_xml(name, memory_mib, guest, disk, serial))
        with defined_domain(xml, name):
            boot(name, serial)
            return [snapshot_once(name, folder, index, serial) for index in range(runs)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- command line ----------------------------------------------------------------------------

def report(memory_mib: int, runs: list[Run]) -> str:
    pause = [float(r["pause_s"]) for r in runs]
    wall = statistics.median(float(r["wall_s"]) for r in runs)
    state = statistics.median(int(r["state_bytes"]) for r in runs)
    return (f"{memory_mib:>5} MiB: pause {statistics.median(pause):.3f} s "
            f"(min {min(pause):.3f}, max {max(pause):.3f}), virsh wall {wall:.3f} s, "
            f"state {state / 2**20:.0f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory", default="256,1024", help="Guest sizes in MiB, comma-separated.")
    args = parser.parse_args()
    reason = available()
    if reason is not None:
        print(f"libvirt is not available: {reason}", file=sys.stderr)
        return 1
    image = build(Path(GUEST_DIR))
    sizes = [int(size) for size in args.memory.split(",")]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        results = {size: libvirt_snapshot_pause(size, args.runs, Path(tmp), image)
                   for size in sizes}
    print(f"libvirt live memory snapshot (virsh snapshot-create-as --live), TCG, "
          f"medians of {args.runs}:")
    for size, runs in results.items():
        print(report(size, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
