"""Real guests under real QEMU (TCG here), driven only through the CLI.

One VM boots once for the module and is carried through the tests in file order (boot, pause,
refusals, save/resume, clean stop, truncated saved state, kill -9, stop --force, two starts at
once); each test first puts it in the state it needs (``ensure_running``/``ensure_off``), so any
single test also runs alone, with its own boot. The guest (``waymark guest build``) is cached in
``$WAYMARK_TEST_GUEST`` or ``/var/tmp/waymark-test-guest``; its data disk is the read-only base of
each VM's overlay and is never written.

What the guest does (see :mod:`waymark.testguest.scripts`): ``READY <boot-id>`` on its serial port
once up, then ``COUNTER <n>`` about five times a second (``n`` only in memory), and ``LINE <n>``
appended to ``/data/log.txt`` with ``sync`` about once a second.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest.guests import (
    Guest,
    assert_clear_error,
    counters,
    create,
    gone,
    readies,
    wait_for,
)
from tests.helpers import Waymark


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
    assert vm.wm.json("vm", "pause", vm.name) == {"state": "paused", "changed": True}
    # pausing a paused VM does nothing, with a notice (exit 0)
    assert vm.wm("vm", "pause", vm.name).stdout == f"{vm.name} is already paused: nothing to do.\n"
    status = vm.status()
    assert status["state"] == "paused" and status["agent"] is False
    assert vm.qemus() == [status["pid"]]
    frozen = vm.since()
    time.sleep(1.5)  # 7 counters' worth
    assert vm.since() == frozen, "the serial log grew while the VM was paused"
    last = max(counters(vm.since(mark)))

    assert vm.wm.json("vm", "resume", vm.name) == {"state": "running", "changed": True}
    assert vm.wm.json("vm", "resume", vm.name) == {"state": "running", "changed": False}
    seen = vm.wait_counter_above(mark, last + 2)
    assert seen == list(range(seen[0], seen[0] + len(seen))), f"paused at {last}: {seen}"
    assert vm.state() == "running"


def test_refuses_memory_changes_while_running(vm: Guest) -> None:
    vm.ensure_running()
    memory = vm.wm.run("vm", "set", vm.name, "--memory", "512M")
    assert memory.returncode == 5, memory
    assert_clear_error(memory, "--memory", "running")
    assert vm.wm.json("vm", "show", vm.name)["memory_mib"] == 256
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


def test_a_saved_state_damaged_inside_never_runs(vm: Guest) -> None:
    """A few bytes changed in the middle of the saved memory (QEMU may well load them: they are
    just guest RAM): the sha256 checked while QEMU loads the stream refuses it before the
    guest's CPUs run, and the VM stays saved with its state untouched."""
    vm.ensure_running()
    saved = vm.wm.json("vm", "save", vm.name)
    state_file = Path(saved["state_file"])
    fd = os.open(state_file, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(os.pread(fd, 3, saved["bytes"] // 2)[i] ^ 0xFF for i in range(3)),
                  saved["bytes"] // 2)
    finally:
        os.close(fd)

    mark = vm.mark()
    failed = vm.wm.run("vm", "start", vm.name)
    assert_clear_error(failed, "checksum", "--discard-saved-state")
    assert vm.state() == "saved" and vm.qemus() == []
    assert counters(vm.since(mark)) == [], "the damaged memory ran"
    assert state_file.stat().st_size == saved["bytes"]
    vm.wm.json("vm", "start", vm.name, "--discard-saved-state")


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
    assert out == {"state": "off", "how": "powered off", "changed": True}
    assert gone(pid) and vm.qemus() == []
    status = vm.status()
    assert status["state"] == "off" and status["pid"] is None
    assert status["last_exit"]["reason"] == "powered off"


def test_stop_force_on_a_saved_vm_discards_its_state(vm: Guest) -> None:
    """Hyper-V's "Delete Saved State": the VM is off and the next start boots fresh."""
    vm.ensure_running()
    vm.wm("vm", "save", vm.name)
    out = vm.wm.json("vm", "stop", vm.name, "--force")
    assert out == {"state": "off", "how": "saved state discarded", "changed": True}
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


def test_a_home_deeper_than_a_socket_address_runs_its_vm(home: Waymark,
                                                        image: dict[str, str]) -> None:
    """A Unix socket address holds 108 bytes and a VM's sockets live under its home: a VM of
    a deeper home starts, pauses, resumes and stops cleanly (its sockets bound and reached
    through their folder: :mod:`waymark.qemu.sockets`). It was refused at start (exit 73)."""
    deep = Waymark(home.home.parent / ("deep-" * 16) / "home")
    vm = create(deep, "deep", image)
    assert len(str(vm.qmp).encode()) > 108
    try:
        vm.boot()
        deep("vm", "pause", "deep")
        assert vm.state() == "paused"
        deep("vm", "resume", "deep")
        assert vm.state() == "running"
        stopped = deep.json("vm", "stop", "deep")  # clean: the guest agent, then QMP
        assert stopped["state"] == "off" and "shut down" in stopped["how"], stopped
        assert vm.qemus() == []
    finally:
        vm.ensure_off()
