"""The QEMU command line of a VM: pure code from its configuration and disk chains.

Every image of a chain is its own ``-blockdev`` node, named from the image id (at most 31
characters, QEMU's limit), so later block jobs can name any layer. The machine type and CPU
model come from the VM's configuration, pinned, so a memory state restores on the machine it was
taken on.

Every VM has one CD drive (:func:`cd_drive`): an ``ide-cd`` on q35's built-in AHCI controller
(the SATA drive every OS installer reads without extra drivers, Windows' included), addressed
by its id :data:`CD_DRIVE`; its medium, when one is inserted, is a read-only raw node over a
read-only file. The boot order becomes ``bootindex`` properties on the first disk, the CD
drive and the first NIC (SeaBIOS and OVMF both honour them), counted from 1 so a ``-kernel``
(QEMU gives its loader bootindex 0) still comes first; ``-boot strict=on`` keeps the firmware
to the devices listed.

Every file under a node is opened by :func:`file_node`, which keeps the host's page cache when
the guest's block layer is reactivated (see there: it halves what each layer of each chain adds
to a standard checkpoint's pause).

``-blockdev`` takes JSON; every other option value built from a name, path or setting goes
through :func:`escaped`, so a comma in it cannot start another QEMU sub-option. (``-kernel``,
``-initrd``, ``-append`` and ``-pidfile`` take their argument whole: nothing to escape.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from waymark.model.hardware import HardwareConfig, Nic
from waymark.qemu import firmware

AGENT_PORT = "org.qemu.guest_agent.0"
AGENT_CHARDEV = "qga0"  # the agent socket's chardev (query-chardev says who is connected)
# QEMU's seccomp sandbox (waymark.qemu.confine): the strictest that keeps every feature working
# (a bridge NIC's tap device is handed over open, so no helper program needs spawn)
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
CD_DRIVE = "cd0"  # the CD drive's device id (QMP's blockdev-open-tray, -insert-medium ...)
MEDIA_NODE = "cdmedia"  # the block node of the medium a VM starts with


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


def agent_port_open(chardevs: list[dict[str, Any]]) -> bool:
    """Whether a program in the guest holds the agent's virtio-serial port open, from QMP's
    ``query-chardev`` answer (its ``frontend-open``, which QEMU sets when the guest opens the
    port and clears when it closes it). A QEMU that lists no agent chardev is given the benefit
    of the doubt (True: ask the agent)."""
    found = next((c for c in chardevs if c.get("label") == AGENT_CHARDEV), None)
    return found is None or bool(found.get("frontend-open", True))

def clock_setter_of(agent_socket: Path) -> Path:
    """Where the pid of the clock setter of the agent's socket is noted (beside it:
    :func:`waymark.guest.agent.set_clock`)."""
    return agent_socket.with_name(f"{agent_socket.name}.clock-setter")


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
    def clock_setter(self) -> Path:
        """The pid of the process setting the guest's clock (:func:`clock_setter_of`)."""
        return clock_setter_of(self.agent)

    @property
    def console(self) -> Path:
        return self.folder / "console.sock"

    @property
    def display(self) -> Path:
        """The folder of the VNC socket: QEMU's user's own (QEMU binds the socket itself, its
        VNC server takes no listening descriptor); everything else in ``run/`` is root's."""
        return self.folder / "display"

    @property
    def vnc(self) -> Path:
        """The graphical console: QEMU's VNC server, on this Unix socket only (never TCP)."""
        return self.display / "vnc.sock"

    @property
    def serial_log(self) -> Path:
        return self.folder / "serial.log"

    @property
    def pidfile(self) -> Path:
        return self.folder / "qemu.pid"

    @property
    def errors(self) -> Path:
        """QEMU's own messages (its stderr)."""
        return self.folder / "qemu.log"

    @property
    def last_exit(self) -> Path:
        """Why the VM last stopped (:func:`waymark.engine.running.presence.last_exit`)."""
        return self.folder / "last_exit.json"

    @property
    def runtime(self) -> Path:
        return self.folder / "runtime.json"

    def kept(self) -> list[Path]:
        """What a VM's runs leave behind it (logs, why it last stopped): deleted with the VM,
        or when it is stored in a library."""
        return [self.serial_log, self.errors, self.last_exit]

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
    # what QEMU opens instead of a path: /dev/fdset/N, /proc/self/fd/N (waymark.qemu.confine)
    files: Mapping[str, str] = field(default_factory=dict)
    # listening sockets (by path) and bridge NICs' tap devices (by NIC number) handed over open
    sockets: Mapping[str, int] = field(default_factory=dict)
    taps: Mapping[int, int] = field(default_factory=dict)
    # one end of a socket pair whose other end is the VM's swtpm (waymark.qemu.tpm)
    tpm: int | None = None
    # the display folder (RunFiles.display) handed over open: QEMU binds its VNC socket there
    display: int | None = None


def blockdevs(chain: DiskChain, files: Mapping[str, str] | None = None) -> list[str]:
    """The ``-blockdev`` arguments of one disk: every layer its own node, the active one
    writable; ``files``: what QEMU opens instead of an image's path."""
    files = files or {}
    if chain.passthrough is not None:
        driver = "host_device" if chain.passthrough.startswith("/dev/") else "file"
        raw = {"driver": "raw", "node-name": f"p{chain.disk_id[:24]}",
               "file": file_node(files.get(chain.passthrough, chain.passthrough), False,
                                 driver)}
        return ["-blockdev", json.dumps(raw)]
    args: list[str] = []
    for depth, layer in enumerate(reversed(chain.layers)):
        node: dict[str, object] = {
            "driver": layer.format, "node-name": node_name(layer.image_id),
            "read-only": depth != len(chain.layers) - 1,
            # the file keeps its access mode when QEMU reopens the format node
            # (waymark.qemu.confine); a user's pinned image is never written
            "file": file_node(files.get(layer.path, layer.path), layer.pinned,
                              **{"node-name": file_node_name(layer.image_id)})}
        if depth > 0:
            node["backing"] = node_name(chain.layers[len(chain.layers) - depth].image_id)
        elif layer.format == "qcow2" and not layer.pinned:
            node["backing"] = None  # a Waymark base: no backing file to look for
        args += ["-blockdev", json.dumps(node)]
    return args


def _disk_device(chain: DiskChain, boot: str = "") -> list[str]:
    drive = (f"p{chain.disk_id[:24]}" if chain.passthrough is not None
             else node_name(chain.layers[0].image_id))
    return ["-device", f"virtio-blk-pci,drive={drive},id=d{chain.disk_id[:12]},"
                       f"serial={chain.disk_id[:20]}{boot}"]


FIRMWARE_NODE = "fwcode"


def _firmware(launch: Launch) -> tuple[list[str], list[str]]:
    """A UEFI VM's ``-machine`` sub-options and arguments: the host's firmware code read-only
    in the first flash chip, the VM's variable store (its own chain) in the second."""
    hw = launch.hardware
    if not hw.uefi:
        return [], []
    store = next(chain for chain in launch.disks if chain.disk_id == hw.nvram)
    code = str(firmware.BUILDS[hw.firmware].code)
    node = {"driver": "raw", "node-name": FIRMWARE_NODE, "read-only": True,
            "file": file_node(launch.files.get(code, code), True)}
    options = firmware.machine_options(hw.firmware, FIRMWARE_NODE,
                                       node_name(store.layers[0].image_id))
    return options, ["-blockdev", json.dumps(node), *blockdevs(store, launch.files),
                     *firmware.global_options(hw.firmware)]


def _tpm(launch: Launch) -> list[str]:
    """A TPM 2.0 (CRB interface, what Windows and Linux expect on q35) backed by the VM's swtpm
    over the socket handed over open."""
    if launch.tpm is None:
        return []
    return ["-chardev", f"socket,id=tpm0c,fd={launch.tpm}",
            "-tpmdev", "emulator,id=tpm0,chardev=tpm0c", "-device", "tpm-crb,tpmdev=tpm0"]


def bootindex(hardware: HardwareConfig, device: str) -> str:
    """The ``,bootindex=N`` property of boot device ``device`` (a word of the VM's boot
    order), or nothing when the order leaves it out."""
    if device not in hardware.boot_order:
        return ""
    return f",bootindex={hardware.boot_order.index(device) + 1}"


def file_node(filename: str, read_only: bool, driver: str = "file",
              **extra: object) -> dict[str, object]:
    """The protocol node of an image file (``filename``: what QEMU opens).

    ``drop-cache`` off: when QEMU reactivates its block layer after migrating the guest into a
    memory state (every live standard checkpoint and save, at ``cont``), file-posix would
    otherwise drop the whole page cache of every file of every chain and re-read each image's
    header and tables from the disk while the guest is still stopped — about 0.55 ms a layer
    here, 0.25 ms without the drop (``bench/reactivation.py``), so a UEFI VM's variable store,
    a chain as deep as its disk's, doubled that part of the pause. Dropping is for migrations
    to another host over shared storage, whose page cache the other host's writes make stale;
    Waymark's migrations go into a file on this host, whose page cache is coherent. A
    migration between hosts must ask for it again on the receiving side."""
    return {"driver": driver, "filename": filename, "read-only": read_only,
            "drop-cache": False, **extra}


def media_node(filename: str, node: str = MEDIA_NODE) -> dict[str, object]:
    """The ``-blockdev``/``blockdev-add`` of an inserted ISO: raw, read-only, over a file
    opened read-only (``filename``: what QEMU opens, ``/dev/fdset/N``)."""
    return {"driver": "raw", "node-name": node, "read-only": True,
            "file": file_node(filename, True)}


def cd_drive(hardware: HardwareConfig, files: Mapping[str, str]) -> list[str]:
    """The VM's CD drive, with its medium when one is inserted, and the firmware kept to the
    boot order's devices."""
    medium: list[str] = []
    drive = ""
    if hardware.media:
        medium = ["-blockdev", json.dumps(media_node(files.get(hardware.media, hardware.media)))]
        drive = f",drive={MEDIA_NODE}"
    return [*medium, "-device", f"ide-cd,bus=ide.0,id={CD_DRIVE}{drive}"
                                f"{bootindex(hardware, 'cdrom')}", "-boot", "strict=on"]


def _nic(number: int, nic: Nic, tap: int | None, boot: str = "") -> list[str]:
    if nic.kind == "bridge" and tap is not None:
        netdev = f"tap,id=net{number},fd={tap}"
    elif nic.kind == "bridge":
        netdev = f"bridge,id=net{number},br={escaped(nic.bridge or '')}"
    else:
        forwards = (f"hostfwd={escaped(f)}" for f in nic.forwards)
        netdev = ",".join([f"user,id=net{number}", *forwards])
    return ["-netdev", netdev,
            "-device", f"virtio-net-pci,netdev=net{number},mac={escaped(nic.mac)}{boot}"]


def display(launch: Launch) -> list[str]:
    """The graphical console: a standard VGA (SeaBIOS and OVMF both drive it, on q35 and on
    i440fx) and QEMU's VNC server on a Unix socket only, no password (only root and QEMU's
    user reach the socket: docs/security.md). The folder's open descriptor stands for its path
    (QEMU's user cannot walk to it: ``run/`` is root's alone). Added last, so the devices
    before it keep the PCI addresses a memory state taken before VMs had a display knows."""
    folder = launch.run.display if launch.display is None else f"/proc/self/fd/{launch.display}"
    # the option's name given: without it an "=" in the path makes QEMU read a name there
    return ["-device", "VGA,id=video0",
            "-vnc", f"vnc=unix:{escaped(str(Path(folder) / launch.run.vnc.name))}"]


def _listening(launch: Launch, path: Path) -> str:
    fd = launch.sockets.get(str(path))
    return f"path={escaped(str(path))}" if fd is None else f"fd={fd}"


def argv(launch: Launch, qemu: str = "qemu-system-x86_64") -> list[str]:
    """QEMU's command line; it does not daemonize (the sandbox forbids fork): Waymark starts
    it in a session of its own (:func:`waymark.process.spawn`)."""
    hw, run, files = launch.hardware, launch.run, launch.files
    log = files.get(str(run.serial_log), str(run.serial_log))
    flash, firmware_args = _firmware(launch)
    machine = ",".join([hw.machine, f"accel={launch.accelerator}", *flash])
    args = [qemu, "-name", f"guest={escaped(launch.name)},debug-threads=on", "-uuid", launch.uuid,
            "-machine", machine, "-cpu", hw.cpu_model,
            "-m", f"{hw.memory_mib}M", "-smp", str(hw.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-shutdown",
            "-sandbox", SANDBOX,
            "-chardev", f"socket,id=qmp0,{_listening(launch, run.qmp)},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            "-chardev", f"socket,id=serial0,{_listening(launch, run.console)},server=on,"
                        f"wait=off,logfile={escaped(log)},logappend=on",
            "-serial", "chardev:serial0",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id={AGENT_CHARDEV},{_listening(launch, run.agent)},server=on,"
            "wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev={AGENT_CHARDEV},name={AGENT_PORT}"]
    if hw.kernel:
        args += ["-kernel", files.get(hw.kernel, hw.kernel)]
    if hw.initrd:
        args += ["-initrd", files.get(hw.initrd, hw.initrd)]
    if hw.append:
        args += ["-append", hw.append]
    args += firmware_args + _tpm(launch)
    guest_disks = [chain for chain in launch.disks if chain.disk_id != hw.nvram]
    for number, chain in enumerate(guest_disks):
        args += blockdevs(chain, files) + _disk_device(
            chain, bootindex(hw, "disk") if number == 0 else "")
    args += cd_drive(hw, files)
    for number, nic in enumerate(hw.nics):
        args += _nic(number, nic, launch.taps.get(number),
                     bootindex(hw, "network") if number == 0 else "")
    args += display(launch)
    if launch.incoming:
        args += ["-incoming", "defer"]
    return args + list(launch.extra)
