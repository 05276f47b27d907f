"""QEMU's command line of a VM whose name and paths hold commas: every value stays one value."""

from __future__ import annotations

import json
from pathlib import Path

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
