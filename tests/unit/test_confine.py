"""QEMU's command line under confinement: the sandbox, no daemonizing, no path it must open."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from waymark.model.hardware import HardwareConfig
from waymark.qemu import cmdline, confine


def _launch(tmp_path: Path, given: confine.Handoff, chains: tuple[cmdline.DiskChain, ...],
            hardware: HardwareConfig) -> list[str]:
    run = cmdline.RunFiles(tmp_path / "run")
    launch = cmdline.Launch("vm", "0" * 32, hardware, chains, run, "tcg",
                            extra=tuple(given.args), files=given.files,
                            sockets=given.sockets, taps=given.taps, display=given.display)
    return cmdline.argv(launch)


def test_the_command_line_names_no_file_qemu_would_open(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    kernel = tmp_path / "vmlinuz"
    for path in (base, top, kernel):
        path.write_bytes(b"x")
    chain = cmdline.DiskChain("d" * 32, (cmdline.Layer("b" * 32, str(top), "qcow2"),
                                         cmdline.Layer("a" * 32, str(base), "raw", pinned=True)))
    hardware = HardwareConfig(memory_mib=256, cpus=1, kernel=str(kernel))
    run = cmdline.RunFiles(tmp_path / "run")
    run.folder.mkdir()
    given = confine.handoff(None, run, hardware, (chain,))
    try:
        argv = _launch(tmp_path, given, (chain,), hardware)
    finally:
        given.close()
    assert argv[argv.index("-sandbox") + 1] == cmdline.SANDBOX
    assert "-daemonize" not in argv and "-pidfile" not in argv and "-qmp" not in argv
    nodes = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    assert [n["file"]["filename"] for n in nodes] == ["/dev/fdset/2", "/dev/fdset/1"]
    assert [n["file"]["read-only"] for n in nodes] == [True, False]  # the user's file, ours
    text = " ".join(argv)
    assert str(tmp_path) not in text.replace(f"opaque={tmp_path}", "")
    assert argv[argv.index("-kernel") + 1].startswith("/proc/self/fd/")
    assert "logfile=/dev/fdset/" in text and "socket,id=qmp0,fd=" in text
    # the VNC socket: bound by QEMU in its own folder, reached through the folder's descriptor
    assert argv[argv.index("-vnc") + 1] == f"vnc=unix:/proc/self/fd/{given.display}/vnc.sock"
    assert run.display.is_dir() and run.display.stat().st_mode & 0o777 == 0o700


def test_one_descriptor_per_image_in_the_mode_qemu_keeps(tmp_path: Path) -> None:
    """Read-write for Waymark's images, read-only for a user's: never both (an fd set keeps
    every descriptor open, and a lock taken through one would outlive a switch)."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for path in (ours, theirs):
        path.write_bytes(b"x")
    given = confine.Handoff(None)
    try:
        given.image(str(ours), writable=True)
        given.image(str(theirs), writable=False)
        modes = [fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE for fd in given.fds]
    finally:
        given.close()
    assert modes == [os.O_RDWR, os.O_RDONLY]
    assert given.args == ["-add-fd", f"fd={given_fd(given.args[1])},set=1,opaque={ours}",
                          "-add-fd", f"fd={given_fd(given.args[3])},set=2,opaque={theirs}"]


def given_fd(option: str) -> int:
    return int(option.split(",", maxsplit=1)[0].removeprefix("fd="))


def test_qemus_filenames_map_back_to_paths() -> None:
    real = {"/dev/fdset/3": "/home/vms/x/disks/a.qcow2"}
    described = 'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "/dev/fdset/3"}}'
    assert confine.path_of("/dev/fdset/3", real) == "/home/vms/x/disks/a.qcow2"
    assert confine.path_of(described, real) == "/home/vms/x/disks/a.qcow2"
    assert confine.path_of("/elsewhere.qcow2", real) == "/elsewhere.qcow2"


def test_a_path_with_commas_stays_one_opaque_value_and_the_log_is_append_only(
        tmp_path: Path) -> None:
    folder = tmp_path / "a,set=9"
    folder.mkdir()
    disk, log = folder / "x,fd=0.qcow2", folder / "serial.log"
    disk.write_bytes(b"x")
    given = confine.Handoff(None)
    try:
        given.image(str(disk), writable=True)
        given.image(str(disk), writable=True)  # an image in two chains: one fd set
        given.log(str(log))
        flags = [fcntl.fcntl(fd, fcntl.F_GETFL) for fd in given.fds]
    finally:
        given.close()
    assert given.files == {str(disk): "/dev/fdset/1", str(log): "/dev/fdset/2"}
    assert given.args[1] == f"fd={given_fd(given.args[1])},set=1," \
                            f"opaque={str(disk).replace(',', ',,')}"
    assert len(given.args) == 4 and given.fds == []
    assert flags[1] & os.O_ACCMODE == os.O_WRONLY and flags[1] & os.O_APPEND


def test_the_cd_drives_iso_is_handed_over_read_only(tmp_path: Path) -> None:
    iso = tmp_path / "install,x.iso"
    iso.write_bytes(b"x")
    hardware = HardwareConfig(memory_mib=256, cpus=1, media=str(iso))
    run = cmdline.RunFiles(tmp_path / "run")
    run.folder.mkdir()
    given = confine.handoff(None, run, hardware, ())
    try:
        argv = _launch(tmp_path, given, (), hardware)
        first = given.args[1]  # disks (none here), boot files (none), then the ISO
        assert first.endswith("opaque=" + str(iso).replace(",", ",,"))
        mode = fcntl.fcntl(given_fd(first), fcntl.F_GETFL) & os.O_ACCMODE
    finally:
        given.close()
    assert mode == os.O_RDONLY
    (medium,) = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    assert medium["file"] == {"driver": "file", "filename": given.files[str(iso)],
                              "read-only": True, "drop-cache": False}
    assert given.files[str(iso)].startswith("/dev/fdset/")
