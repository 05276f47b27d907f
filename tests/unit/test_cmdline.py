"""QEMU's command line of a VM whose name and paths hold commas: every value stays one value."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from waymark.model.hardware import HardwareConfig, Nic
from waymark.qemu import cmdline

NAME = "web,process=evil,debug-threads=off"
FOLDER = Path("/srv/x=y,a,b=c/vms/1234/run")
DISK = "/srv/a,b=c/disks/x,file=/etc/shadow.qcow2"


def qemu_opts(text: str) -> list[tuple[str, str]]:
    """QEMU's ``key=value,key=value`` syntax as QEMU reads it (``,,`` is one literal comma; an
    item with no ``=`` before its first comma is the implied key's value, key "")."""
    pairs = []
    while text:
        cut = min((text.find(c) for c in "=," if c in text), default=len(text))
        key = text[:cut] if cut < len(text) and text[cut] == "=" else ""
        value, text = _value(text[cut + 1:] if key else text)
        pairs.append((key, value))
    return pairs


def _value(text: str) -> tuple[str, str]:
    """The value at the start of ``text`` and what follows its separating comma."""
    value, i = "", 0
    while i < len(text):
        if text[i] == "," and text[i + 1:i + 2] != ",":
            return value, text[i + 1:]
        value += text[i]
        i += 2 if text[i] == "," else 1
    return value, ""


def launch() -> cmdline.Launch:
    hardware = HardwareConfig(memory_mib=64, cpus=1, nics=[
        Nic(mac="52:54:00:12:34:56", forwards=["tcp::2222-:22"])])
    chain = cmdline.DiskChain("d" * 32, (cmdline.Layer("i" * 32, DISK, "qcow2"),))
    return cmdline.Launch(NAME, "0" * 8 + "-0000-0000-0000-" + "0" * 12, hardware, (chain,),
                          cmdline.RunFiles(FOLDER), "tcg")


def option(args: list[str], flag: str, nth: int = 0) -> str:
    return [args[i + 1] for i, a in enumerate(args) if a == flag][nth]


def test_escaped_doubles_commas() -> None:
    assert cmdline.escaped("a,b,,c") == "a,,b,,,,c"
    assert cmdline.escaped("plain") == "plain"


def test_a_name_with_commas_sets_no_other_option() -> None:
    args = cmdline.argv(launch())
    assert qemu_opts(option(args, "-name")) == [("guest", NAME), ("debug-threads", "on")]


def test_paths_with_commas_stay_one_value() -> None:
    args = cmdline.argv(launch())  # no sockets handed over: QEMU is given their paths
    qmp = dict(qemu_opts(option(args, "-chardev", 0)))
    assert (qmp["id"], qmp["path"]) == ("qmp0", str(FOLDER / "qmp.sock"))
    serial = dict(qemu_opts(option(args, "-chardev", 1)))
    assert (serial["path"], serial["logfile"]) == (str(FOLDER / "console.sock"),
                                                   str(FOLDER / "serial.log"))
    assert dict(qemu_opts(option(args, "-chardev", 2)))["path"] == str(FOLDER / "qga.sock")
    blockdev = json.loads(option(args, "-blockdev"))  # JSON: a comma needs no escaping
    assert blockdev["file"]["filename"] == DISK


# --- every builder, one by one ----------------------------------------------------------------

BASE, MIDDLE, TOP = "b" * 32, "m" * 32, "t" * 32


def chain_of(*layers: cmdline.Layer) -> cmdline.DiskChain:
    return cmdline.DiskChain("d" * 32, layers)


def test_node_names_fit_qemus_limit_and_tell_format_from_file() -> None:
    assert cmdline.node_name("x" * 40) == "n" + "x" * 24
    assert cmdline.file_node_name("x" * 40) == "f" + "x" * 24
    assert len(cmdline.node_name("x" * 40)) <= 31


def test_a_chain_is_one_node_per_layer_active_writable_each_backed_by_the_next() -> None:
    chain = chain_of(cmdline.Layer(TOP, "/v/top.qcow2", "qcow2"),
                     cmdline.Layer(MIDDLE, "/v/mid.qcow2", "qcow2"),
                     cmdline.Layer(BASE, "/v/base.qcow2", "qcow2"))
    args = cmdline.blockdevs(chain)
    assert args[::2] == ["-blockdev"] * 3
    base, middle, top = (json.loads(a) for a in args[1::2])  # the base first: QEMU needs it
    assert [n["node-name"] for n in (base, middle, top)] == [
        cmdline.node_name(BASE), cmdline.node_name(MIDDLE), cmdline.node_name(TOP)]
    assert [n["read-only"] for n in (base, middle, top)] == [True, True, False]
    assert base["backing"] is None  # a Waymark base: no backing file to look for
    assert middle["backing"] == cmdline.node_name(BASE)
    assert top["backing"] == cmdline.node_name(MIDDLE)
    assert top["file"] == {"driver": "file", "filename": "/v/top.qcow2",
                           "node-name": cmdline.file_node_name(TOP), "read-only": False,
                           # the page cache survives reactivation: see cmdline.file_node
                           "drop-cache": False}


def test_a_users_pinned_base_is_opened_read_only_with_its_own_backing_rules() -> None:
    chain = chain_of(cmdline.Layer(TOP, "/v/top.qcow2", "qcow2"),
                     cmdline.Layer(BASE, "/theirs/base.qcow2", "qcow2", pinned=True))
    base, top = (json.loads(a) for a in cmdline.blockdevs(chain)[1::2])
    assert base["file"]["read-only"] is True and base["read-only"] is True
    assert "backing" not in base  # QEMU follows the user's image as it is
    assert top["file"]["read-only"] is False and top["backing"] == cmdline.node_name(BASE)


def test_a_raw_base_gets_no_backing_key() -> None:
    (raw,) = (json.loads(a) for a in cmdline.blockdevs(
        chain_of(cmdline.Layer(BASE, "/v/base.raw", "raw")))[1::2])
    assert raw["driver"] == "raw" and "backing" not in raw and raw["read-only"] is False


def test_handed_over_files_replace_the_paths() -> None:
    chain = chain_of(cmdline.Layer(TOP, "/v/top.qcow2", "qcow2"),
                     cmdline.Layer(BASE, "/v/base.qcow2", "qcow2"))
    files = {"/v/top.qcow2": "/dev/fdset/1", "/v/base.qcow2": "/dev/fdset/2"}
    nodes = [json.loads(a) for a in cmdline.blockdevs(chain, files)[1::2]]
    assert [n["file"]["filename"] for n in nodes] == ["/dev/fdset/2", "/dev/fdset/1"]


@pytest.mark.parametrize(("path", "driver"), [("/dev/sdb", "host_device"),
                                              ("/srv/disk,x.img", "file")])
def test_a_passthrough_disk_is_one_raw_node_on_its_path(path: str, driver: str) -> None:
    chain = cmdline.DiskChain("p" * 32, passthrough=path)
    flag, node = cmdline.blockdevs(chain)
    assert flag == "-blockdev"
    assert json.loads(node) == {"driver": "raw", "node-name": "p" * 25,
                                "file": {"driver": driver, "filename": path,
                                         "read-only": False, "drop-cache": False}}
    handed = json.loads(cmdline.blockdevs(chain, {path: "/dev/fdset/4"})[1])
    assert handed["file"]["filename"] == "/dev/fdset/4"


def test_each_disk_is_a_virtio_device_on_its_active_node() -> None:
    chain = chain_of(cmdline.Layer(TOP, "/v/top.qcow2", "qcow2"),
                     cmdline.Layer(BASE, "/v/base.qcow2", "qcow2"))
    passthrough = cmdline.DiskChain("p" * 32, passthrough="/dev/sdb")
    args = cmdline.argv(with_hardware(HardwareConfig(memory_mib=64, cpus=1),
                                      disks=(chain, passthrough)))
    assert option(args, "-device", 2) == (f"virtio-blk-pci,drive={cmdline.node_name(TOP)},"
                                          f"id=d{'d' * 12},serial={'d' * 20},bootindex=1")
    assert option(args, "-device", 3) == f"virtio-blk-pci,drive={'p' * 25},id=d{'p' * 12}," \
                                         f"serial={'p' * 20}"


def with_hardware(hardware: HardwareConfig, **changes: Any) -> cmdline.Launch:
    return dataclasses.replace(launch(), hardware=hardware, **changes)


def test_the_machine_as_configured_and_no_defaults_no_display_no_fork() -> None:
    hardware = HardwareConfig(memory_mib=512, cpus=3, machine="pc-q35-8.0", cpu_model="max")
    args = cmdline.argv(with_hardware(hardware, accelerator="kvm"), qemu="/opt/qemu")
    assert args[0] == "/opt/qemu"
    assert option(args, "-machine") == "pc-q35-8.0,accel=kvm"
    assert (option(args, "-cpu"), option(args, "-m"), option(args, "-smp")) == \
        ("max", "512M", "3")
    assert option(args, "-uuid") == launch().uuid
    assert option(args, "-sandbox") == cmdline.SANDBOX
    assert {"-nodefaults", "-no-user-config", "-no-shutdown"} <= set(args)
    assert option(args, "-display") == "none"
    assert "-daemonize" not in args and "-incoming" not in args
    for absent in ("-kernel", "-initrd", "-append", "-netdev"):
        assert absent not in args


def test_the_guest_agent_port_and_qmp_monitor() -> None:
    args = cmdline.argv(launch())
    assert option(args, "-mon") == "chardev=qmp0,mode=control"
    assert option(args, "-serial") == "chardev:serial0"
    assert f"virtserialport,bus=vser0.0,chardev=qga0,name={cmdline.AGENT_PORT}" in args


def test_boot_files_are_given_whole_or_as_handed_over() -> None:
    hardware = HardwareConfig(memory_mib=64, cpus=1, kernel="/k,1/vmlinuz",
                              initrd="/k,1/initrd", append="console=ttyS0 root=/dev/vda,x")
    args = cmdline.argv(with_hardware(hardware))
    assert (option(args, "-kernel"), option(args, "-initrd"), option(args, "-append")) == \
        ("/k,1/vmlinuz", "/k,1/initrd", "console=ttyS0 root=/dev/vda,x")
    handed = cmdline.argv(with_hardware(hardware, files={"/k,1/vmlinuz": "/proc/self/fd/7"}))
    assert option(handed, "-kernel") == "/proc/self/fd/7"
    assert option(handed, "-initrd") == "/k,1/initrd"


def test_listening_sockets_handed_over_are_given_by_descriptor() -> None:
    run = cmdline.RunFiles(FOLDER)
    sockets = {str(run.qmp): 11, str(run.console): 12, str(run.agent): 13}
    args = cmdline.argv(dataclasses.replace(launch(), sockets=sockets))
    assert [dict(qemu_opts(option(args, "-chardev", n))).get("fd") for n in range(3)] == \
        ["11", "12", "13"]
    assert all("path" not in dict(qemu_opts(option(args, "-chardev", n))) for n in range(3))


def test_a_user_nic_forwards_each_rule_as_one_value() -> None:
    nic = Nic(mac="52:54:00:00:00:01", forwards=["tcp::2222-:22", "udp:127.0.0.1:53-:53"])
    args = cmdline.argv(with_hardware(HardwareConfig(memory_mib=64, cpus=1, nics=[nic])))
    assert qemu_opts(option(args, "-netdev")) == [
        ("", "user"), ("id", "net0"), ("hostfwd", "tcp::2222-:22"),
        ("hostfwd", "udp:127.0.0.1:53-:53")]
    # (the last device before the display, which comes last)
    assert option(args, "-device", -2) == "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01"


def test_a_bridge_nic_uses_its_tap_device_when_handed_one_else_the_bridge_helper() -> None:
    nics = [Nic(mac="52:54:00:00:00:01"),
            Nic(mac="52:54:00:00:00:02", kind="bridge", bridge="br0")]
    hardware = HardwareConfig(memory_mib=64, cpus=1, nics=nics)
    helper = cmdline.argv(with_hardware(hardware))
    assert option(helper, "-netdev", 1) == "bridge,id=net1,br=br0"
    tapped = cmdline.argv(with_hardware(hardware, taps={1: 9}))
    assert option(tapped, "-netdev", 1) == "tap,id=net1,fd=9"
    assert option(tapped, "-device", -2) == "virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02"


def test_an_incoming_vm_waits_for_its_state_and_extra_arguments_come_last() -> None:
    args = cmdline.argv(dataclasses.replace(launch(), incoming=True,
                                            extra=("-add-fd", "fd=3,set=1")))
    assert args[-4:] == ["-incoming", "defer", "-add-fd", "fd=3,set=1"]


def test_run_files_live_in_the_run_folder_and_logs_outlive_a_run() -> None:
    run = cmdline.RunFiles(Path("/r"))
    assert [p.name for p in (run.qmp, run.agent, run.console, run.serial_log, run.pidfile,
                             run.errors, run.last_exit, run.runtime, run.paused_state,
                             run.paused_meta)] == [
        "qmp.sock", "qga.sock", "console.sock", "serial.log", "qemu.pid", "qemu.log",
        "last_exit.json", "runtime.json", "paused.state", "paused.json"]
    assert {p.parent for p in run.kept()} == {Path("/r")}
    assert run.kept() == [run.serial_log, run.errors, run.last_exit]


# --- the CD drive and the boot order ------------------------------------------------------------

def devices(args: list[str], kind: str) -> list[dict[str, str]]:
    """The ``-device`` options of driver ``kind``, as QEMU reads them."""
    found = [dict(qemu_opts(a)) for i, a in enumerate(args) if args[i - 1] == "-device"]
    return [d for d in found if d[""] == kind]


def test_every_vm_has_an_empty_cd_drive_on_the_ahci_bus_by_default() -> None:
    args = cmdline.argv(launch())
    (drive,) = devices(args, "ide-cd")
    assert drive == {"": "ide-cd", "bus": "ide.0", "id": cmdline.CD_DRIVE, "bootindex": "2"}
    assert all(json.loads(b)["node-name"] != cmdline.MEDIA_NODE
               for b in (args[i + 1] for i, a in enumerate(args) if a == "-blockdev"))
    assert option(args, "-boot") == "strict=on"  # only the devices of the order are tried


def test_an_inserted_iso_is_a_read_only_raw_node_on_a_read_only_file() -> None:
    iso = "/srv/isos,x=y/debian,file=/etc/shadow.iso"
    hardware = HardwareConfig(memory_mib=64, cpus=1, media=iso)
    for files, filename in (({}, iso), ({iso: "/dev/fdset/9"}, "/dev/fdset/9")):
        args = cmdline.argv(with_hardware(hardware, files=files))
        nodes = [json.loads(args[i + 1]) for i, a in enumerate(args) if a == "-blockdev"]
        (medium,) = [n for n in nodes if n["node-name"] == cmdline.MEDIA_NODE]
        assert medium == {"driver": "raw", "node-name": cmdline.MEDIA_NODE, "read-only": True,
                          "file": {"driver": "file", "filename": filename, "read-only": True,
                                   "drop-cache": False}}
        assert devices(args, "ide-cd")[0]["drive"] == cmdline.MEDIA_NODE


@pytest.mark.parametrize(("order", "disk", "cdrom", "nic"), [
    (["disk", "cdrom"], "1", "2", None),
    (["cdrom", "disk"], "2", "1", None),
    (["network", "cdrom", "disk"], "3", "2", "1"),
    (["cdrom"], None, "1", None)])
def test_the_boot_order_is_bootindex_on_the_first_disk_cd_drive_and_first_nic(
        order: list[str], disk: str | None, cdrom: str | None, nic: str | None) -> None:
    hardware = HardwareConfig(memory_mib=64, cpus=1, boot_order=order, nics=[
        Nic(mac="52:54:00:12:34:56"), Nic(mac="52:54:00:12:34:57")])
    second = cmdline.DiskChain("e" * 32, (cmdline.Layer("j" * 32, "/v/2.qcow2", "qcow2"),))
    args = cmdline.argv(with_hardware(hardware, disks=(*launch().disks, second)))
    disks, nics = devices(args, "virtio-blk-pci"), devices(args, "virtio-net-pci")
    assert [d.get("bootindex") for d in disks] == [disk, None]
    assert devices(args, "ide-cd")[0].get("bootindex") == cdrom
    assert [n.get("bootindex") for n in nics] == [nic, None]


def test_a_direct_kernel_keeps_booting_first() -> None:
    """QEMU gives a -kernel's loader bootindex 0: Waymark's indexes start at 1 below it."""
    hardware = HardwareConfig(memory_mib=64, cpus=1, kernel="/k/vmlinuz",
                              boot_order=["cdrom", "disk"])
    args = cmdline.argv(with_hardware(hardware))
    indexes = [int(d["bootindex"]) for kind in ("virtio-blk-pci", "ide-cd")
               for d in devices(args, kind) if "bootindex" in d]
    assert sorted(indexes) == [1, 2]


@pytest.mark.parametrize("machine", ["pc-q35-7.2", "pc-i440fx-7.2"])
def test_a_standard_vga_and_vnc_on_a_unix_socket_only(machine: str) -> None:
    """The graphical console: one std VGA (SeaBIOS and OVMF drive it, q35 and i440fx alike),
    added after every other device (their PCI addresses stay those an older memory state
    knows), and VNC on the Unix socket in the handed-over display folder: no TCP address, no
    WebSocket port, no second display."""
    hardware = HardwareConfig(memory_mib=64, cpus=1, machine=machine)
    args = cmdline.argv(with_hardware(hardware, display=7, incoming=True))
    assert option(args, "-display") == "none"
    devices = [a for a in args if a.startswith(("virtio-", "ide-cd", "VGA"))]
    assert devices[-1] == "VGA,id=video0" and args.count("VGA,id=video0") == 1
    assert [a for a in args if a == "-vnc"] == ["-vnc"]
    assert option(args, "-vnc") == "vnc=unix:/proc/self/fd/7/vnc.sock"
    assert args.index("-vnc") < args.index("-incoming")
    # without a handed-over folder (not used by Waymark's start): the folder's own path
    plain = cmdline.argv(with_hardware(HardwareConfig(memory_mib=64, cpus=1, machine=machine)))
    path = cmdline.escaped(str(FOLDER / "display" / "vnc.sock"))  # (its commas: one value)
    assert option(plain, "-vnc") == f"vnc=unix:{path}"
    for text in (option(args, "-vnc"), option(plain, "-vnc")):
        assert len(qemu_opts(text)) == 1, text  # no websocket=, to=, password ... option
