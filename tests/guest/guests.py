"""Shared helpers of the real-guest tests: a VM of the test guest driven through the CLI, and
the module-scoped fixtures that build the guest once and power every VM off at the end."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tests.helpers import Result, Waymark
from waymark.qemu import monitor

GUEST_DIR = Path(os.environ.get("WAYMARK_TEST_GUEST", "/var/tmp/waymark-test-guest"))
BOOT_TIMEOUT = 60.0  # TCG on a busy 2-core machine; a boot normally takes a few seconds
READY_RE = re.compile(r"^READY [0-9a-f-]{36}$", re.MULTILINE)
COUNTER_RE = re.compile(r"^COUNTER (\d+)$", re.MULTILINE)
LIVE = ("running", "paused")
STARTED = "--- waymark: starting"  # what Waymark writes into the serial log at each start

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:g} s")
        time.sleep(interval)


def counters(text: str) -> list[int]:
    """The COUNTER values of complete lines (a line still being written is left out)."""
    return [int(n) for n in COUNTER_RE.findall(text[:text.rfind("\n") + 1])]


def readies(text: str) -> list[str]:
    return READY_RE.findall(text)


def gone(pid: int) -> bool:
    """The process is gone (or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(") ")[2][:1] == "Z"


def processes_naming(needle: str) -> list[int]:
    """Pids of live processes whose command line contains ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle.encode() in cmdline and not gone(int(entry.name)):
            found.append(int(entry.name))
    return found


def assert_clear_error(result: Result, *fragments: str) -> None:
    """Failed with a one-line ``error:`` message naming each fragment, and no traceback."""
    assert result.returncode != 0, f"{result.args} succeeded:\n{result.stdout}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in: {result.stderr}"


class Guest:
    """A VM of the test guest, driven through the CLI; its serial log read as bytes."""

    def __init__(self, wm: Waymark, name: str) -> None:
        self.wm = wm
        self.name = name
        shown = wm.json("vm", "show", name)
        self.id: str = shown["id"]
        self.run_dir = wm.home / "vms" / self.id / "run"
        self.qmp = self.run_dir / "qmp.sock"
        self.serial = self.run_dir / "serial.log"

    # --- what it is doing ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self.wm.json("vm", "status", self.name)
        return data

    def state(self) -> str:
        return str(self.status()["state"])

    def qemus(self) -> list[int]:
        """Live QEMU processes of this VM (any process naming its run folder: QEMU gets its
        files and sockets open, their paths in its fd sets' opaque texts)."""
        return processes_naming(f"{self.run_dir}/")

    def mark(self) -> int:
        try:
            return self.serial.stat().st_size
        except FileNotFoundError:
            return 0

    def since(self, mark: int = 0) -> str:
        try:
            data = self.serial.read_bytes()[mark:]
        except FileNotFoundError:
            return ""
        return data.decode(errors="replace").replace("\r", "")

    def active_image(self) -> str:
        return str(self.wm.json("vm", "show", self.name)["disks"][0]["active_image"])

    def qmp_command(self, command: str, **arguments: Any) -> Any:
        """One QMP query on the running QEMU's monitor, for what the CLI does not show (run
        it only while no Waymark command talks to the VM: the monitor takes one client)."""
        return monitor.query(self.qmp, self.name, command, timeout=10.0, **arguments)

    def qemu_file(self) -> Callable[[str], str]:
        """Maps a filename the running QEMU reports to the file's path: QEMU is handed its images
        open, so it names ``/dev/fdset/N`` (the set's opaque text is the path) or, for a qcow2
        node, ``json:{...}`` whose ``file`` names it."""
        fdsets = {f"/dev/fdset/{s['fdset-id']}": fd["opaque"]
                  for s in self.qmp_command("query-fdsets") for fd in s["fds"]}

        def path(filename: str) -> str:
            if filename.startswith("json:"):
                filename = json.loads(filename[len("json:"):])["file"]["filename"]
            return fdsets.get(filename, filename)
        return path

    # --- driving it ---------------------------------------------------------------------------

    def wait_ready(self, mark: int, timeout: float = BOOT_TIMEOUT) -> str:
        try:
            return wait_for("READY line", lambda: READY_RE.search(self.since(mark)),
                            timeout).group(0)
        except AssertionError:
            raise AssertionError(f"{self.name}: no READY within {timeout:g} s; serial log tail:"
                                 f"\n{self.since(mark)[-2000:]}") from None

    def wait_counter_above(self, mark: int, value: int, timeout: float = 20.0) -> list[int]:
        """The counters printed after ``mark``, once one of them exceeds ``value``."""
        def check() -> list[int]:
            seen = counters(self.since(mark))
            return seen if seen and max(seen) > value else []
        return wait_for(f"COUNTER above {value}", check, timeout)

    def boot(self, *options: str) -> int:
        """Start it from off and wait for READY; returns the serial log mark before the start."""
        mark = self.mark()
        self.wm("vm", "start", self.name, *options)
        self.wait_ready(mark)
        return mark

    def ensure_running(self) -> None:
        state = self.state()
        if state == "paused":
            self.wm("vm", "resume", self.name)
        elif state == "saved":
            mark = self.mark()
            self.wm("vm", "start", self.name)
            self.wait_counter_above(mark, 0)
        elif state == "off":
            self.boot()
        assert self.state() == "running"

    def ensure_off(self) -> None:
        state = self.state()
        if state == "saved":
            self.wm("vm", "start", self.name, "--discard-saved-state")
            state = "running"
        if state in LIVE:
            self.wm("vm", "stop", self.name, "--force")
        assert self.state() == "off"
        assert self.qemus() == []


# --- the guest agent -------------------------------------------------------------------------

def _agent_call(sock: socket.socket, replies: Any, name: str, **arguments: Any) -> Any:
    sock.sendall(json.dumps({"execute": name, "arguments": arguments}).encode())
    while True:  # skip what an earlier client left unread
        try:
            reply = json.loads(replies.readline())
        except ValueError:
            continue
        if "error" in reply:
            raise AssertionError(f"guest agent {name}: {reply['error']}")
        if name != "guest-sync" or reply.get("return") == arguments["id"]:
            return reply["return"]


def _agent_exec_once(vm: Guest, path: str, args: Sequence[str]) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5.0)
        sock.connect(str(vm.run_dir / "qga.sock"))
        replies = sock.makefile("rb")
        _agent_call(sock, replies, "guest-sync", id=random.randrange(1 << 30))
        pid = _agent_call(sock, replies, "guest-exec", path=path, arg=list(args),
                          **{"capture-output": True})["pid"]
        deadline = time.monotonic() + 20.0
        while not (status := _agent_call(sock, replies, "guest-exec-status", pid=pid))["exited"]:
            assert time.monotonic() < deadline, f"{path} in the guest did not exit"
            time.sleep(0.2)
        return base64.b64decode(status.get("out-data", "")).decode(errors="replace")


def agent_exec(vm: Guest, path: str, *args: str, timeout: float = 30.0) -> str:
    """Run a program in the guest through its agent (retried until the agent answers); its
    output."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _agent_exec_once(vm, path, args)
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def create(wm: Waymark, name: str, image: dict[str, str], **paths: str) -> Guest:
    files = {**image, **paths}
    wm("vm", "create", name, "--kernel", files["kernel"], "--initrd", files["initrd"],
       "--disk", files["disk"], "--memory", "256M", "--append", files["append"])
    return Guest(wm, name)


# --- a guest's data disk, read offline --------------------------------------------------------

def flatten(image: str, dest: Path) -> Path:
    """The disk as the guest sees it (its whole backing chain) as a raw file; ``-U`` because a
    running QEMU may hold the chain locked (a frozen image never changes)."""
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", image, str(dest)], check=True,
                   capture_output=True)
    return dest


def fs_features(raw: Path) -> list[str]:
    out = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True,
                         check=True).stdout
    found = re.search(r"^Filesystem features:\s+(.*)$", out, re.MULTILINE)
    assert found, out
    return found.group(1).split()


def log_lines(raw: Path) -> list[str]:
    """The lines of the guest's /data/log.txt in a flattened copy, its journal replayed first
    (e2fsck changes the copy only)."""
    fsck = subprocess.run(["e2fsck", "-fy", str(raw)], capture_output=True, text=True,
                          check=False)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr
    log = subprocess.run(["debugfs", "-R", "cat /log.txt", str(raw)], capture_output=True,
                         text=True, check=True).stdout
    assert log.endswith("\n"), repr(log[-200:])
    return log.splitlines()


def numbered(lines: list[str]) -> bool:
    """``LINE 1`` to ``LINE N``: no gap, no duplicate."""
    return lines == [f"LINE {n}" for n in range(1, len(lines) + 1)]
