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

Set-up: none beyond the Debian packages (``libvirt-daemon-system``, ``libvirt-clients``) and root.
:func:`own_daemon` starts a libvirtd of its own for the measurement and stops it at the end: in a
private mount namespace (``unshare -m``) whose /etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt and /var/log/libvirt are folders of a temporary directory, so the host's
libvirt configuration and state are neither read nor written (no systemd, no system libvirtd
needed). Its qemu.conf runs QEMU as root with ``dynamic_ownership = 0`` and no security driver
(libvirt leaves the shared guest files' owners and labels alone) and QEMU's output in plain
files (no virtlogd); its sockets are in that directory too, and virsh connects with
``qemu:///system?socket=DIR/libvirt-sock``. The daemon's first connection probes QEMU's
capabilities (5-10 s under load), which is done before anything is timed.
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
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from waymark.model.hardware import DEFAULT_CPU_MODEL, MACHINE
from waymark.testguest.build import GuestImage, build

LIBVIRT_FOLDERS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt",
                   "/var/log/libvirt")  # bound to the daemon's own folders in its namespace
DAEMON_START = 60.0  # seconds for the daemon's socket to appear
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


# --- virsh and the daemon --------------------------------------------------------------------

@dataclass(frozen=True)
class Virsh:
    """virsh connected to one libvirt daemon."""

    uri: str

    @property
    def argv(self) -> list[str]:
        return ["virsh", "--quiet", "--connect", self.uri]

    def __call__(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """stdout of ``virsh ARGS``; LibvirtError with virsh's message when it fails."""
        try:
            done = subprocess.run([*self.argv, *args], capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as err:
            raise LibvirtError(f"virsh {' '.join(args)}: no answer within {timeout:g} s") from err
        if done.returncode != 0:
            message = (done.stderr.strip() or done.stdout.strip()).replace("\n", " ")
            raise LibvirtError(f"virsh {' '.join(args)}: {message}")
        return done.stdout


def available() -> str | None:
    """None when this script can start a libvirt daemon of its own here, else the reason."""
    for program, package in (("virsh", "libvirt-clients"), ("libvirtd", "libvirt-daemon"),
                             ("unshare", "util-linux")):
        if shutil.which(program) is None:
            return f"{program} is not installed (apt-get install {package})"
    if os.geteuid() != 0:
        return "the libvirt daemon of the reference needs root (its own mount namespace)"
    missing = [folder for folder in LIBVIRT_FOLDERS[:3] if not Path(folder).is_dir()]
    if missing:
        return f"{', '.join(missing)} missing: is libvirt-daemon-system installed?"
    return None


def bound(folder: Path, target: str) -> Path:
    """The daemon's own folder that stands for the host's ``target`` in its namespace."""
    return folder / target.strip("/").replace("/", "-")


def daemon_files(folder: Path) -> str:
    """The daemon's folders and configuration in ``folder``; the shell line that starts it."""
    for target in LIBVIRT_FOLDERS:
        bound(folder, target).mkdir()
    (folder / "sock").mkdir()
    etc = bound(folder, "/etc/libvirt")
    (etc / "libvirtd.conf").write_text(
        f'unix_sock_dir = "{folder / "sock"}"\nunix_sock_rw_perms = "0700"\n'
        'auth_unix_rw = "none"\nauth_unix_ro = "none"\n')
    (etc / "qemu.conf").write_text(
        'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nsecurity_driver = "none"\n'
        'stdio_handler = "file"\n')
    binds = [f"mount --bind {bound(folder, target)} {target}" for target in LIBVIRT_FOLDERS
             if Path(target).is_dir()]
    return " && ".join([*binds, "exec libvirtd -f /etc/libvirt/libvirtd.conf"])


@contextlib.contextmanager
def own_daemon(workdir: Path) -> Iterator[Virsh]:
    """A libvirtd of its own (see the module docstring), stopped and its folder removed at the
    end; yields virsh connected to it, its capabilities already probed."""
    folder = Path(tempfile.mkdtemp(prefix="libvirtd-", dir=workdir)).absolute()
    log = folder / "libvirtd.log"
    try:
        script = daemon_files(folder)
        with log.open("wb") as out:
            daemon = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                       "sh", "-c", script], stdout=out, stderr=subprocess.STDOUT)
        try:
            socket = folder / "sock" / "libvirt-sock"
            wait_for("the libvirt daemon's socket",
                     lambda: socket.exists() or daemon.poll() is not None, DAEMON_START)
            if daemon.poll() is not None:
                raise LibvirtError(f"libvirtd exited ({daemon.returncode}): "
                                   f"{read_log(log).decode(errors='replace')[-2000:]}")
            virsh = Virsh(f"qemu:///system?socket={socket}")
            probe(virsh)
            yield virsh
        finally:
            stop(daemon, signal.SIGTERM)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def probe(virsh: Virsh) -> None:
    """The daemon runs QEMU and can run the test guest's machine under TCG."""
    version = virsh("version", timeout=120.0)
    if "hypervisor: QEMU" not in version:
        raise LibvirtError(f"libvirt at {virsh.uri} runs no QEMU hypervisor: "
                           f"{version.strip()!r}")
    virsh("domcapabilities", "--virttype", "qemu", "--arch", "x86_64", "--machine", MACHINE,
          timeout=120.0)


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
def defined_domain(virsh: Virsh, xml: Path, name: str) -> Iterator[str]:
    """Define the domain from ``xml``; on the way out destroy and undefine it, come what may."""
    virsh("define", str(xml))
    try:
        yield name
    finally:
        remove_domain(virsh, name)


def remove_domain(virsh: Virsh, name: str) -> None:
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


def boot(virsh: Virsh, name: str, serial: Path) -> None:
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
def listening(virsh: Virsh, name: str, log: Path) -> Iterator[None]:
    """``virsh qemu-monitor-event NAME --loop`` into ``log`` for the duration of the block."""
    with log.open("wb") as out:
        listener = subprocess.Popen([*virsh.argv, "qemu-monitor-event", name, "--loop"],
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


def stop(process: subprocess.Popen[bytes], how: signal.Signals = signal.SIGINT) -> None:
    """Signal ``how`` (SIGINT ends ``--loop`` cleanly, output flushed); kill it if it does not
    go."""
    if process.poll() is None:
        process.send_signal(how)
    try:
        process.wait(timeout=10.0)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- the measurement -------------------------------------------------------------------------

def snapshot_once(virsh: Virsh, name: str, folder: Path, index: int, serial: Path) -> Run:
    """One live external snapshot of the running domain: its pause, wall time and state size."""
    snapshot = f"ref{index}"
    memory, disk = folder / f"{snapshot}.mem", folder / f"{snapshot}.qcow2"
    events = folder / f"{snapshot}.events"
    with listening(virsh, name, events):
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

    A libvirt daemon of its own runs for the duration (:func:`own_daemon`). Files go to a
    temporary folder in ``workdir``, removed at the end; the domain is destroyed and undefined
    and the daemon stopped even when a run fails.
    """
    guest = image or build(Path(GUEST_DIR))
    folder = Path(tempfile.mkdtemp(prefix="libvirt-ref-", dir=workdir)).absolute()
    name = f"waymark-libvirt-ref-{uuid.uuid4().hex[:8]}"
    serial, disk, xml = folder / "serial.log", folder / "vda.qcow2", folder / "domain.xml"
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                        "-b", str(guest.disk), str(disk)], check=True, capture_output=True)
        xml.write_text(domain_xml(name, memory_mib, guest, disk, serial))
        with own_daemon(workdir) as virsh, defined_domain(virsh, xml, name):
            boot(virsh, name, serial)
            return [snapshot_once(virsh, name, folder, index, serial) for index in range(runs)]
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
