"""The QEMU command line of a VM: pure code from its configuration and disk chains.

Every image of a chain is its own ``-blockdev`` node, named from the image id (at most 31
characters, QEMU's limit), so later block jobs can name any layer. The machine type and CPU
model come from the VM's configuration, pinned, so a memory state restores on the machine it was
taken on.

``-blockdev`` takes JSON; every other option value built from a name, path or setting goes
through :func:`escaped`, so a comma in it cannot start another QEMU sub-option. (``-kernel``,
``-initrd``, ``-append`` and ``-pidfile`` take their argument whole: nothing to escape.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from waymark.checkpoints.hardware import HardwareConfig, Nic

AGENT_PORT = "org.qemu.guest_agent.0"


def escaped(value: str) -> str:
    """``value`` inside QEMU's ``key=value,key=value`` option syntax: QEMU reads ``,,`` as one
    literal comma, so the value stays one value (a VM named ``x,process=y`` sets no option)."""
    return value.replace(",", ",,")


def node_name(image_id: str) -> str:
    return f"n{image_id[:24]}"


def file_node_name(image_id: str) -> str:
    return f"f{image_id[:24]}"


@dataclass(frozen=True)
class Layer:
    """One image of a disk's chain."""

    image_id: str
    path: str
    format: str
    pinned: bool = False


@dataclass(frozen=True)
class DiskChain:
    """A disk: its chain from the active image down to the base, or a pass-through path."""

    disk_id: str
    layers: tuple[Layer, ...] = ()
    passthrough: str | None = None


@dataclass(frozen=True)
class RunFiles:
    """Where a running VM keeps its sockets, pid file and logs."""

    folder: Path

    @property
    def qmp(self) -> Path:
        return self.folder / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.folder / "qga.sock"

    @property
    def console(self) -> Path:
        return self.folder / "console.sock"

    @property
    def serial_log(self) -> Path:
        return self.folder / "serial.log"

    @property
    def pidfile(self) -> Path:
        return self.folder / "qemu.pid"

    @property
    def runtime(self) -> Path:
        return self.folder / "runtime.json"

    @property
    def paused_state(self) -> Path:
        """The memory state of a paused VM that a checkpoint left in ``postmigrate``."""
        return self.folder / "paused.state"

    @property
    def paused_meta(self) -> Path:
        return self.folder / "paused.json"


@dataclass(frozen=True)
class Launch:
    name: str
    uuid: str
    hardware: HardwareConfig
    disks: tuple[DiskChain, ...]
    run: RunFiles
    accelerator: str
    incoming: bool = False
    extra: tuple[str, ...] = field(default_factory=tuple)


def blockdevs(chain: DiskChain) -> list[str]:
    """The ``-blockdev`` arguments of one disk: every layer its own node, the active one
    writable."""
    if chain.passthrough is not None:
        driver = "host_device" if chain.passthrough.startswith("/dev/") else "file"
        raw = {"driver": "raw", "node-name": f"p{chain.disk_id[:24]}",
               "file": {"driver": driver, "filename": chain.passthrough}}
        return ["-blockdev", json.dumps(raw)]
    args: list[str] = []
    for depth, layer in enumerate(reversed(chain.layers)):
        node: dict[str, object] = {
            "driver": layer.format, "node-name": node_name(layer.image_id),
            "read-only": depth != len(chain.layers) - 1,
            "file": {"driver": "file", "filename": layer.path,
                     "node-name": file_node_name(layer.image_id)}}
        if depth > 0:
            node["backing"] = node_name(chain.layers[len(chain.layers) - depth].image_id)
        elif layer.format == "qcow2" and not layer.pinned:
            node["backing"] = None  # a Waymark base: no backing file to look for
        args += ["-blockdev", json.dumps(node)]
    return args


def _disk_device(chain: DiskChain) -> list[str]:
    drive = (f"p{chain.disk_id[:24]}" if chain.passthrough is not None
             else node_name(chain.layers[0].image_id))
    return ["-device", f"virtio-blk-pci,drive={drive},id=d{chain.disk_id[:12]},"
                       f"serial={chain.disk_id[:20]}"]


def _nic(number: int, nic: Nic) -> list[str]:
    if nic.kind == "bridge":
        netdev = f"bridge,id=net{number},br={escaped(nic.bridge or '')}"
    else:
        forwards = (f"hostfwd={escaped(f)}" for f in nic.forwards)
        netdev = ",".join([f"user,id=net{number}", *forwards])
    return ["-netdev", netdev,
            "-device", f"virtio-net-pci,netdev=net{number},mac={escaped(nic.mac)}"]


def argv(launch: Launch, qemu: str = "qemu-system-x86_64") -> list[str]:
    hw, run = launch.hardware, launch.run
    args = [qemu, "-name", f"guest={escaped(launch.name)},debug-threads=on",
            "-uuid", launch.uuid,
            "-machine", f"{hw.machine},accel={launch.accelerator}", "-cpu", hw.cpu_model,
            "-m", f"{hw.memory_mib}M", "-smp", str(hw.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-shutdown",
            "-daemonize", "-pidfile", str(run.pidfile),
            "-qmp", f"unix:path={escaped(str(run.qmp))},server=on,wait=off",
            "-chardev", f"socket,id=serial0,path={escaped(str(run.console))},server=on,wait=off,"
                        f"logfile={escaped(str(run.serial_log))},logappend=on",
            "-serial", "chardev:serial0",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=qga0,path={escaped(str(run.agent))},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={AGENT_PORT}"]
    if hw.kernel:
        args += ["-kernel", hw.kernel]
    if hw.initrd:
        args += ["-initrd", hw.initrd]
    if hw.append:
        args += ["-append", hw.append]
    for chain in launch.disks:
        args += blockdevs(chain) + _disk_device(chain)
    for number, nic in enumerate(hw.nics):
        args += _nic(number, nic)
    if launch.incoming:
        args += ["-incoming", "defer"]
    return args + list(launch.extra)
