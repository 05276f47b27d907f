"""Real guests under real QEMU (TCG here), driven only through the CLI.

One VM boots once for the module and is carried through the tests in file order (boot, pause,
refusals, save/resume, clean stop, truncated saved state, kill -9, stop --force, two starts at
once); each test first puts it in the state it needs (``ensure_running``/``ensure_off``), so any
single test also runs alone, with its own boot. The guest (``waymark guest build``) is cached in
``$WAYMARK_TEST_GUEST`` or ``/var/tmp/waymark-test-guest``; its data disk is the read-only base of
each VM's overlay and is never written.

What the guest does (see :mod:`waymark.guest.scripts`): ``READY <boot-id>`` on its serial port
once up, then ``COUNTER <n>`` about five times a second (``n`` only in memory), and ``LINE <n>``
appended to ``/data/log.txt`` with ``sync`` about once a second.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.helpers import Result, Waymark

GUEST_DIR = Path(os.environ.get("WAYMARK_TEST_GUEST", "/var/tmp/waymark-test-guest"))
BOOT_TIMEOUT = 60.0  # TCG on a busy 2-core machine; a boot normally takes a few seconds
READY_RE = re.compile(r"^READY [0-9a-f-]{36}$", re.MULTILINE)
COUNTER_RE = re.compile(r"^COUNTER (\d+)$", re.MULTILINE)
LIVE = ("running", "paused")

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
        """Live QEMU processes of this VM (any process naming its QMP socket)."""
        return processes_naming(str(self.qmp))

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


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Waymark]:
    """A home for the module; at the end every VM in it is powered off, and any QEMU still
    naming the home is killed (so a failed test never leaves one running)."""
    if shutil.which("qemu-system-x86_64") is None:
        raise RuntimeError("missing qemu-system-x86_64 (apt-get install -y qemu-system-x86)")
    wm = Waymark(tmp_path_factory.mktemp("runtime") / "home")
    yield wm
    listed = wm.run("vm", "list", "--json")
    for row in json.loads(listed.stdout) if listed.returncode == 0 else []:
        if row["state"] in LIVE:
            wm.run("vm", "stop", row["name"], "--force")
    leftovers = processes_naming(str(wm.home))
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert leftovers == [], f"QEMU processes left running after vm stop --force: {leftovers}"


@pytest.fixture(scope="module")
def image(home: Waymark) -> dict[str, str]:
    """kernel, initrd, disk and append of the test guest, built once and cached."""
    # a first build downloads Debian packages: give it time
    built: dict[str, str] = home.run("guest", "build", "--dest", str(GUEST_DIR), "--json",
                                     timeout=1800).ok().json()
    return built


def create(wm: Waymark, name: str, image: dict[str, str], **paths: str) -> Guest:
    files = {**image, **paths}
    wm("vm", "create", name, "--kernel", files["kernel"], "--initrd", files["initrd"],
       "--disk", files["disk"], "--memory", "256M", "--append", files["append"])
    return Guest(wm, name)


@pytest.fixture(scope="module")
def vm(home: Waymark, image: dict[str, str]) -> Guest:
    """The shared guest (256 MiB); the tests carry it from one state to the next."""
    return create(home, "g", image)


# --- the shared guest, in order ---------------------------------------------------------------

def test_boot_reaches_ready_and_the_agent(vm: Guest) -> None:
    mark = vm.mark()
    started = time.monotonic()
    out = vm.wm.json("vm", "start", vm.name)
    assert out["state"] == "running" and out["accelerator"] in ("kvm", "tcg")
    ready = vm.wait_ready(mark)
    print(f"READY {time.monotonic() - started:.1f} s after vm start: {ready}")
    assert vm.qemus() == [out["pid"]]
    status = wait_for("guest agent answer", lambda: (s := vm.status())["agent"] and s, 30.0,
                      interval=0.5)
    assert status["state"] == "running" and status["pid"] == out["pid"]
    assert status["serial_log"] == str(vm.serial)
    assert status["uptime_seconds"] is not None and status["uptime_seconds"] >= 0
    assert len(readies(vm.since(mark))) == 1
    vm.wait_counter_above(mark, 2)


def test_pause_stops_the_counter_and_resume_restarts_it(vm: Guest) -> None:
    vm.ensure_running()
    mark = vm.mark()
    vm.wait_counter_above(mark, 0)  # it is counting
    assert vm.wm.json("vm", "pause", vm.name) == {"state": "paused"}
    status = vm.status()
    assert status["state"] == "paused" and status["agent"] is False
    assert vm.qemus() == [status["pid"]]
    frozen = vm.since()
    time.sleep(1.5)  # 7 counters' worth
    assert vm.since() == frozen, "the serial log grew while the VM was paused"
    last = max(counters(vm.since(mark)))

    assert vm.wm.json("vm", "resume", vm.name) == {"state": "running"}
    seen = vm.wait_counter_above(mark, last + 2)
    assert seen == list(range(seen[0], seen[0] + len(seen))), f"paused at {last}: {seen}"
    assert vm.state() == "running"


def test_refuses_checkpoints_and_memory_changes_while_running(vm: Guest) -> None:
    vm.ensure_running()
    checkpoint = vm.wm.run("checkpoint", "create", vm.name)
    assert checkpoint.returncode == 5, checkpoint
    assert_clear_error(checkpoint, "running")
    memory = vm.wm.run("vm", "set", vm.name, "--memory", "512M")
    assert_clear_error(memory, "--memory")
    shown = vm.wm.json("vm", "show", vm.name)
    assert shown["memory_mib"] == 256 and shown["checkpoint_count"] == 0
    assert vm.state() == "running"


def test_save_then_start_resumes_the_memory(vm: Guest) -> None:
    vm.ensure_running()
    vm.wait_counter_above(vm.mark(), 0)
    before = vm.status()
    boots = len(readies(vm.since()))

    saved = vm.wm.json("vm", "save", vm.name)
    assert saved["bytes"] > 0 and 0 <= saved["seconds"] < 60
    state_file = Path(saved["state_file"])
    assert state_file.stat().st_size == saved["bytes"]
    assert gone(before["pid"]), "QEMU still runs after vm save"
    assert vm.qemus() == []
    status = vm.status()
    assert status["state"] == "saved" and status["pid"] is None
    assert status["saved_state"] == str(state_file)
    text = vm.since()
    last = max(counters(text))
    time.sleep(0.5)
    assert vm.since() == text, "the serial log grew while the VM was saved"

    mark = vm.mark()
    out = vm.wm.json("vm", "start", vm.name)
    assert out["state"] == "running" and out["pid"] != before["pid"]
    assert vm.qemus() == [out["pid"]]
    seen = vm.wait_counter_above(mark, last + 3)
    assert last < seen[0] <= last + 3, f"saved at {last}, resumed with {seen}"
    assert seen == list(range(seen[0], seen[0] + len(seen))), seen
    assert readies(vm.since(mark)) == [], "the guest booted again instead of resuming"
    assert len(readies(vm.since())) == boots
    assert not state_file.exists(), "the consumed saved state is still there"
    assert "saved_state" not in vm.status()


def test_clean_stop_leaves_a_complete_data_file(vm: Guest, tmp_path: Path) -> None:
    vm.ensure_running()
    wait_for("COUNTER 11 (two LINE records)", lambda: counters(vm.since())[-1:] >= [11], 20.0)
    pid = vm.status()["pid"]
    mark = vm.mark()
    out = vm.wm.json("vm", "stop", vm.name)
    assert out["state"] == "off" and "shut down" in out["how"]
    assert gone(pid) and vm.qemus() == []
    status = vm.status()
    assert status["state"] == "off" and status["pid"] is None
    assert status["last_exit"]["reason"] == out["how"]
    assert "SHUTDOWN poweroff" in vm.since(mark)

    raw = tmp_path / "data.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", vm.active_image(), str(raw)],
                   check=True)
    fs = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True,
                        check=True).stdout
    assert re.search(r"^Filesystem state:\s+clean$", fs, re.MULTILINE), fs
    log = subprocess.run(["debugfs", "-R", "cat /log.txt", str(raw)], capture_output=True,
                         text=True, check=True).stdout
    lines = log.splitlines()
    assert len(lines) >= 2 and log.endswith("\n"), repr(log[-200:])
    assert lines == [f"LINE {n}" for n in range(1, len(lines) + 1)], lines[-10:]


def test_truncated_saved_state_is_refused_then_discarded(vm: Guest) -> None:
    vm.ensure_running()
    saved = vm.wm.json("vm", "save", vm.name)
    state_file = Path(saved["state_file"])
    assert state_file == vm.wm.home / "vms" / vm.id / "saved" / "state.bin"
    os.truncate(state_file, saved["bytes"] // 2)

    mark = vm.mark()
    failed = vm.wm.run("vm", "start", vm.name)
    assert_clear_error(failed, "--discard-saved-state")
    assert vm.state() == "saved"
    assert vm.qemus() == []

    fresh = vm.wm.json("vm", "start", vm.name, "--discard-saved-state")
    assert fresh["state"] == "running"
    vm.wait_ready(mark)
    seen = vm.wait_counter_above(mark, 2)
    assert seen[0] == 1, f"a fresh boot counts from 1, not {seen[:3]}"
    assert not state_file.exists()


def test_kill_9_is_reported_and_the_vm_starts_again(vm: Guest) -> None:
    vm.ensure_running()
    pid = vm.status()["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for("the killed QEMU to go", lambda: gone(pid), 10.0)

    status = vm.status()
    assert status["state"] == "off" and status["pid"] is None
    reason = status["last_exit"]["reason"]
    assert "crashed" in reason or "killed" in reason, status["last_exit"]
    assert vm.wm.json("vm", "list")[0]["state"] == "off"

    mark = vm.mark()
    out = vm.wm.json("vm", "start", vm.name)
    assert out["pid"] != pid and vm.qemus() == [out["pid"]]
    vm.wait_ready(mark)


def test_stop_force_powers_off(vm: Guest) -> None:
    vm.ensure_running()
    pid = vm.status()["pid"]
    out = vm.wm.json("vm", "stop", vm.name, "--force")
    assert out == {"state": "off", "how": "powered off"}
    assert gone(pid) and vm.qemus() == []
    status = vm.status()
    assert status["state"] == "off" and status["pid"] is None
    assert status["last_exit"]["reason"] == "powered off"


def test_stop_force_on_a_saved_vm_discards_its_state(vm: Guest) -> None:
    """Hyper-V's "Delete Saved State": the VM is off and the next start boots fresh."""
    vm.ensure_running()
    vm.wm("vm", "save", vm.name)
    out = vm.wm.json("vm", "stop", vm.name, "--force")
    assert out == {"state": "off", "how": "saved state discarded"}
    assert vm.status()["state"] == "off" and "saved_state" not in vm.status()
    assert not list((vm.wm.home / "vms").glob("*/saved/state.bin"))
    mark = vm.mark()
    vm.wm("vm", "start", vm.name)
    vm.wait_ready(mark)


def test_a_saved_vms_checkpoint_holds_its_memory(vm: Guest) -> None:
    """Checkpoint a saved VM (with --checkpoint-first, before applying an older checkpoint):
    it holds the saved memory; applying it leaves the VM saved, and start resumes there."""
    vm.ensure_off()
    vm.wm("checkpoint", "create", vm.name, "--name", "before-save")
    vm.ensure_running()
    time.sleep(1.0)
    vm.wm("vm", "save", vm.name)
    saved_at = counters(vm.since())[-1]
    done = vm.wm.json("checkpoint", "apply", vm.name, "before-save", "--checkpoint-first")
    assert vm.status()["state"] == "off"  # before-save is disk-only: Now's memory went with Now
    assert not list((vm.wm.home / "vms").glob("*/saved/*"))
    safety = vm.wm.json("checkpoint", "show", vm.name, done["safety_checkpoint_id"][:12])
    assert safety["has_memory"] and safety["kind"] == "standard"
    listing = vm.wm.run("checkpoint", "list", vm.name).ok().stdout
    assert "▶" in listing and "■" in listing
    vm.wm("checkpoint", "apply", vm.name, safety["id"], "--discard-current")
    assert vm.status()["state"] == "saved"
    mark = vm.mark()
    vm.wm("vm", "start", vm.name)
    after = vm.wait_counter_above(mark, saved_at)
    assert saved_at < after[0] <= saved_at + 3, (saved_at, after[:3])
    assert readies(vm.since(mark)) == []
    vm.wm("vm", "stop", vm.name, "--force")
    # exported, the memory travels with the checkpoint: the imported VM is saved and resumes
    bundle = vm.wm.home / "bundle-with-memory"
    vm.wm("checkpoint", "export", vm.name, safety["id"], str(bundle))
    assert (bundle / "memory.state").is_file()
    vm.wm("vm", "import", str(bundle), "--name", "clone")
    clone = Guest(vm.wm, "clone")
    assert clone.status()["state"] == "saved"
    vm.wm("vm", "start", "clone")
    resumed = clone.wait_counter_above(0, saved_at)
    assert saved_at < resumed[0] <= saved_at + 3 and readies(clone.since()) == []
    vm.wm("vm", "stop", "clone", "--force")
    vm.wm("vm", "delete", "clone", "--yes")
    vm.wm("checkpoint", "delete", vm.name, "*", "--yes")


def test_two_starts_at_once_run_one_qemu(vm: Guest) -> None:
    vm.ensure_off()
    mark = vm.mark()
    argv = [sys.executable, "-m", "waymark", "vm", "start", vm.name]
    procs = [subprocess.Popen(argv, env=vm.wm.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(proc.wait(timeout=120), *proc.communicate()) for proc in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    _, _, err = next(r for r in results if r[0] != 0)
    assert "Traceback" not in err and err.startswith("error: "), err
    assert "already running" in err or "busy" in err, err
    vm.wait_ready(mark)
    time.sleep(1.0)
    assert len(vm.qemus()) == 1, vm.qemus()
    assert vm.status()["pid"] == vm.qemus()[0]
    assert len(readies(vm.since(mark))) == 1
    assert vm.since(mark).count("--- waymark: starting") == 1


# --- bad input, on VMs of their own (none of them boots) --------------------------------------

@pytest.mark.parametrize(("part", "fragments"), [("disk", ()), ("kernel", ("--kernel",))])
def test_start_with_a_missing_file(home: Waymark, image: dict[str, str], tmp_path: Path,
                                   part: str, fragments: tuple[str, ...]) -> None:
    """A VM whose disk image or kernel file vanished fails to start, naming the file."""
    copy = tmp_path / f"{part}-copy"
    shutil.copyfile(image[part], copy)
    vm = create(home, f"no{part}", image, **{part: str(copy)})
    copy.unlink()
    failed = home.run("vm", "start", vm.name)
    assert_clear_error(failed, *fragments, str(copy))
    assert vm.state() == "off" and vm.qemus() == []
