"""Live checkpoints of real guests under real QEMU (TCG here), driven only through the CLI.

Two VMs of the test guest, each booted once for the module and carried through its tests in
file order; each test first puts its VM in the state it needs, so any single test also runs
alone. ``g`` runs the guest agent (production checkpoints freeze its file systems); ``bare`` boots
with ``waymark.agent=off`` (no agent: the fallbacks, the refusals).

What the guest does (see :mod:`waymark.testguest.scripts`): ``COUNTER <n>`` on its serial port about
five times a second (``n`` only in memory: a restored memory continues at saved + 1), and every
fifth counter ``LINE <m>`` appended to ``/data/log.txt`` with ``sync`` (``m`` continues from the
file's last line: a restored disk continues its own numbering). So a memory checkpoint is exact
when the counter resumes at the checkpoint's value + 1 and the file holds ``LINE 1..N`` with no
gap or duplicate across the apply; and while ``/data`` is frozen the counter stalls at its next
multiple of five (the append blocks).
"""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.guest.guests import (
    STARTED,
    Guest,
    assert_clear_error,
    counters,
    create,
    flatten,
    fs_features,
    log_lines,
    numbered,
    processes_naming,
    readies,
    wait_for,
)
from tests.helpers import Waymark


@pytest.fixture(scope="module")
def vm(home: Waymark, image: dict[str, str]) -> Guest:
    """The guest with its agent (256 MiB; the VM's checkpoint type: production)."""
    return create(home, "g", image)


@pytest.fixture(scope="module")
def bare(home: Waymark, image: dict[str, str]) -> Guest:
    """The guest booted without its agent."""
    return create(home, "bare", image, append=f"{image['append']} waymark.agent=off")


# --- helpers ----------------------------------------------------------------------------------

def assert_clean(wm: Waymark) -> None:
    checked = wm.run("check", "--json")
    assert checked.returncode == 0 and checked.json()["clean"], checked.stdout + checked.stderr


def checkpoint_count(guest: Guest) -> int:
    return int(guest.wm.json("vm", "show", guest.name)["checkpoint_count"])


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def wait_agent(guest: Guest) -> None:
    wait_for(f"{guest.name}'s guest agent", lambda: guest.status()["agent"], 30.0, interval=0.5)


def latest(guest: Guest, mark: int) -> int:
    """The last complete COUNTER printed since ``mark``."""
    return counters(guest.since(mark))[-1]


def after_start(guest: Guest, mark: int) -> str:
    """The serial log since the (single) start after ``mark``: what the restored guest printed
    (before it, the VM that was turned off may still have printed a line or two)."""
    text = guest.since(mark)
    assert text.count(STARTED) == 1, text[-2000:]
    return text[text.index(STARTED):]


def counters_after_start(guest: Guest, mark: int, above: int, timeout: float = 20.0
                         ) -> list[int]:
    """The counters the restored guest printed, once one of them exceeds ``above``."""
    def check() -> list[int]:
        text = guest.since(mark)
        seen = counters(text[text.find(STARTED):]) if STARTED in text else []
        return seen if seen and seen[-1] > above else []
    return wait_for(f"a counter above {above} after the start", check, timeout)


def resumes_at(text: str) -> int:
    """The first complete COUNTER a guest stopped after printing ``text`` prints on resuming:
    the next one, or the one after when it was stopped in the middle of a line (the rest of
    that line comes out after Waymark's start banner, which breaks it)."""
    return counters(text)[-1] + (1 if text.endswith("\n") else 2)


def consecutive(seen: list[int]) -> bool:
    return seen == list(range(seen[0], seen[0] + len(seen)))


def disk_lines(image: str, tmp: Path, name: str) -> list[str]:
    return log_lines(flatten(image, tmp / f"{name}.raw"))


def clean_stop(guest: Guest) -> None:
    out = guest.wm.json("vm", "stop", guest.name)
    assert out["state"] == "off" and "shut down" in out["how"], out
    assert guest.qemus() == []


def shown(guest: Guest, ckpt: str) -> dict[str, Any]:
    data: dict[str, Any] = guest.wm.json("checkpoint", "show", guest.name, ckpt)
    return data


# --- g: the guest with its agent, in order ----------------------------------------------------

def test_standard_checkpoint_resumes_exactly_where_it_was_taken(vm: Guest, tmp_path: Path
                                                                 ) -> None:
    """Taken while the guest counts and writes; applied, the guest continues at the very next
    counter, and its data file's numbering continues with no gap or duplicate."""
    vm.ensure_running()
    start = vm.mark()
    vm.wait_counter_above(start, 11)  # two LINE records at least
    last_before = latest(vm, start)
    ckpt = vm.wm.json("checkpoint", "create", vm.name, "--type", "standard", "--name", "here",
                      "--notes", "taken live\nwhile it counts")
    last_after = latest(vm, start)
    assert ckpt["kind"] == "standard" and ckpt["requested_type"] == "standard", ckpt
    assert ckpt["notes"] == "taken live\nwhile it counts", ckpt  # kept by the live part
    assert ckpt["has_memory"] and Path(ckpt["memory_state"]).is_file(), ckpt
    for private in (ckpt["memory_state"], ckpt["disks"][0]["frozen_image"],  # guest RAM, data
                    vm.active_image(), vm.run_dir / "serial.log"):
        assert stat.S_IMODE(os.stat(private).st_mode) & 0o077 == 0, private  # owner-only
    assert ckpt["fallback_reason"] is None and ckpt["freeze_seconds"] is None, ckpt
    assert 0 < ckpt["pause_seconds"] < 10, ckpt
    held = disk_lines(ckpt["disks"][0]["frozen_image"], tmp_path, "held")
    assert len(held) >= 2 and numbered(held), held
    print(f"counters {last_before}..{last_after} around the checkpoint, {len(held)} lines held,"
          f" paused {ckpt['pause_seconds'] * 1000:.0f} ms")

    vm.wait_counter_above(start, last_after + 10)  # Now moves on: two more LINE records
    mark = vm.mark()
    applied = vm.wm.json("checkpoint", "apply", vm.name, "here", "--discard-current", "--start")
    assert applied["state"] == "running" and applied["safety_checkpoint_id"] is None
    seen = counters_after_start(vm, mark, last_after + 10)  # two LINE records after the resume
    assert last_before < seen[0] <= last_after + 1, \
        f"checkpoint taken between COUNTER {last_before} and {last_after}, resumed at {seen[:3]}"
    assert consecutive(seen), seen
    assert readies(after_start(vm, mark)) == [], "the guest booted instead of resuming"

    clean_stop(vm)
    lines = disk_lines(vm.active_image(), tmp_path, "now")
    assert numbered(lines), lines
    assert len(lines) >= len(held) + 2, (len(held), lines[-3:])
    assert_clean(vm.wm)


def test_a_paused_vm_is_checkpointed_without_running(vm: Guest) -> None:
    """Paused: checkpoints take its memory without resuming it (production falls back, as its
    agent is paused too); it stays paused, saves, resumes; a paused checkpoint applies
    exactly."""
    vm.ensure_running()
    vm.wait_counter_above(vm.mark(), 0)
    assert vm.wm.json("vm", "pause", vm.name) == {"state": "paused", "changed": True}
    frozen = vm.since()
    expected = resumes_at(frozen)

    first = vm.wm.json("checkpoint", "create", vm.name, "--name", "paused")  # VM: production
    assert first["kind"] == "standard" and first["requested_type"] == "production", first
    assert "paused" in first["fallback_reason"], first
    assert first["has_memory"] and first["pause_seconds"] is None, first
    second = vm.wm.json("checkpoint", "create", vm.name, "--type", "standard")
    assert second["kind"] == "standard" and second["fallback_reason"] is None, second
    assert second["has_memory"] and second["parent_id"] == first["id"], second
    count = checkpoint_count(vm)
    refused = vm.wm.run("checkpoint", "create", vm.name, "--type", "productiononly")
    assert refused.returncode == 5, refused
    assert_clear_error(refused, "productiononly", "paused")
    assert checkpoint_count(vm) == count
    time.sleep(1.0)  # five counters' worth
    assert vm.since() == frozen, "the serial log grew while the VM was paused"
    assert vm.state() == "paused"

    saved = vm.wm.json("vm", "save", vm.name)
    assert saved["bytes"] > 0 and vm.state() == "saved"
    mark = vm.mark()
    vm.wm("vm", "start", vm.name)
    seen = counters_after_start(vm, mark, expected + 2)
    assert seen[0] == expected and consecutive(seen), f"paused at {frozen[-40:]!r}: {seen[:3]}"
    assert readies(after_start(vm, mark)) == []

    mark = vm.mark()
    applied = vm.wm.json("checkpoint", "apply", vm.name, "paused", "--discard-current", "--start")
    assert applied["state"] == "running"
    seen = counters_after_start(vm, mark, expected + 2)
    assert seen[0] == expected and consecutive(seen), f"paused at {frozen[-40:]!r}: {seen[:3]}"
    assert readies(after_start(vm, mark)) == []
    assert_clean(vm.wm)


def test_an_exported_live_checkpoint_imports_saved_and_resumes(vm: Guest, tmp_path: Path
                                                               ) -> None:
    vm.ensure_running()
    start = vm.mark()
    vm.wait_counter_above(start, 0)
    last_before = latest(vm, start)
    ckpt = vm.wm.json("checkpoint", "create", vm.name, "--type", "standard")
    last_after = latest(vm, start)
    assert ckpt["kind"] == "standard" and ckpt["has_memory"]
    vm.wm("vm", "pause", vm.name)  # spare the CPU for the clone

    bundle = tmp_path / "bundle"
    vm.wm("checkpoint", "export", vm.name, ckpt["id"], str(bundle))
    assert (bundle / "memory.state").is_file()
    imported = vm.wm.json("vm", "import", str(bundle), "--name", "live-clone")
    assert imported["state"] == "saved" and imported["id"] != vm.id
    clone = Guest(vm.wm, "live-clone")
    try:
        vm.wm("vm", "start", clone.name)
        seen = counters_after_start(clone, 0, last_before + 3)
        assert last_before < seen[0] <= last_after + 1, \
            f"checkpoint taken between COUNTER {last_before} and {last_after}, clone: {seen[:3]}"
        assert consecutive(seen) and readies(clone.since()) == []
    finally:
        vm.wm.run("vm", "stop", clone.name, "--force")
    vm.wm("vm", "delete", clone.name, "--yes")
    assert_clean(vm.wm)


def test_sigkill_while_frozen_thaws_the_guest_and_settles_the_checkpoint(vm: Guest) -> None:
    """Waymark SIGKILLed right after the disk switch, the guest frozen: the guard thaws it,
    and the next command commits the checkpoint (its disks switched)."""
    vm.ensure_running()
    wait_agent(vm)
    count = checkpoint_count(vm)
    guard = f"waymark/guest/freezer.py\0{vm.run_dir / 'qga.sock'}"
    killed = vm.wm.run("checkpoint", "create", vm.name, "--type", "production", "--name",
                       "killed", env=vm.wm.env(WAYMARK_FAILPOINT="frozen-switched"))
    assert killed.returncode == -signal.SIGKILL, killed
    died = time.monotonic()
    mark = vm.mark()
    frozen_at = latest(vm, 0)
    # counting passes a multiple of five only once that LINE append (to /data) went through
    vm.wait_counter_above(mark, frozen_at + 6, timeout=15.0)
    print(f"the guest wrote again {time.monotonic() - died:.1f} s after the kill")
    wait_for("the freeze guard to exit", lambda: processes_naming(guard) == [], 15.0)
    assert vm.state() == "running"

    again = vm.wm.json("checkpoint", "create", vm.name, "--type", "production")
    assert again["kind"] == "production" and again["fallback_reason"] is None, again
    settled = shown(vm, "killed")
    assert settled["kind"] == "production" and not settled["has_memory"], settled
    assert again["parent_id"] == settled["id"]
    assert checkpoint_count(vm) == count + 2
    assert vm.state() == "running"
    assert_clean(vm.wm)


def test_production_checkpoint_is_quiesced_and_applies_to_a_fresh_boot(vm: Guest,
                                                                       tmp_path: Path) -> None:
    """Its frozen disk is clean (no journal to replay), unlike a standard one's; applied, the VM
    is off, boots, and its data file continues from the checkpoint's last line."""
    vm.ensure_running()
    wait_agent(vm)
    start = vm.mark()
    vm.wait_counter_above(start, latest(vm, 0) + 5)  # a LINE record since
    prod = vm.wm.json("checkpoint", "create", vm.name, "--name", "quiet")  # the VM's type
    assert prod["kind"] == "production" and prod["requested_type"] == "production", prod
    assert prod["fallback_reason"] is None and not prod["has_memory"], prod
    assert prod["memory_state"] is None and prod["pause_seconds"] is None, prod
    assert 0 < prod["freeze_seconds"] < 10, prod
    std = vm.wm.json("checkpoint", "create", vm.name, "--type", "standard")

    quiet = flatten(prod["disks"][0]["frozen_image"], tmp_path / "quiet.raw")
    assert "needs_recovery" not in fs_features(quiet)
    live = flatten(std["disks"][0]["frozen_image"], tmp_path / "live.raw")
    assert "needs_recovery" in fs_features(live)
    held = log_lines(quiet)
    assert held and numbered(held), held

    vm.wait_counter_above(start, latest(vm, 0) + 10)  # Now moves on: two more LINE records
    applied = vm.wm.json("checkpoint", "apply", vm.name, "quiet", "--discard-current")
    assert applied["state"] == "off"
    assert vm.state() == "off" and vm.qemus() == []
    assert not list((vm.wm.home / "vms" / vm.id).glob("saved/*"))

    mark = vm.boot()  # READY: a fresh boot
    vm.wait_counter_above(mark, 10)  # two LINE records after the boot
    clean_stop(vm)
    lines = disk_lines(vm.active_image(), tmp_path, "now")
    assert lines[:len(held)] == held and numbered(lines), (held[-3:], lines)
    assert len(lines) >= len(held) + 2, (len(held), lines[-3:])
    assert_clean(vm.wm)


# --- bare: the guest without its agent, in order ----------------------------------------------

def test_without_an_agent_production_falls_back_and_productiononly_refuses(bare: Guest
                                                                           ) -> None:
    bare.ensure_running()
    assert bare.status()["agent"] is False
    fell = bare.wm.json("checkpoint", "create", bare.name, "--type", "production")
    assert fell["kind"] == "standard" and fell["requested_type"] == "production", fell
    assert fell["has_memory"] and fell["pause_seconds"] is not None, fell
    assert fell["fallback_reason"] and "agent" in fell["fallback_reason"], fell
    assert fell["freeze_seconds"] is None, fell

    count = checkpoint_count(bare)
    folder = bare.wm.home / "vms" / bare.id
    files = files_under(folder)
    mark = bare.mark()
    refused = bare.wm.run("checkpoint", "create", bare.name, "--type", "productiononly")
    assert refused.returncode == 5, refused
    assert_clear_error(refused, "productiononly", "agent")
    assert checkpoint_count(bare) == count
    assert files_under(folder) == files
    assert bare.state() == "running"
    bare.wait_counter_above(mark, latest(bare, 0) + 3)  # it still counts
    assert_clean(bare.wm)


def test_a_saved_vm_keeps_its_hardware_unless_its_state_is_discarded(bare: Guest) -> None:
    bare.ensure_running()
    bare.wm("vm", "save", bare.name)
    for change in (("vm", "set", bare.name, "--memory", "512M"),
                   ("vm", "disk", "add", bare.name, "64M")):
        refused = bare.wm.run(*change)
        assert refused.returncode == 5, refused
        assert_clear_error(refused, "saved", "--discard-saved-state")
    shown_vm = bare.wm.json("vm", "show", bare.name)
    assert shown_vm["state"] == "saved" and shown_vm["memory_mib"] == 256, shown_vm
    assert len(shown_vm["disks"]) == 1, shown_vm

    changed = bare.wm.json("vm", "set", bare.name, "--memory", "512M", "--discard-saved-state")
    assert changed["state"] == "off" and changed["memory_mib"] == 512, changed
    assert not list((bare.wm.home / "vms" / bare.id).glob("saved/*"))
    bare.wm("vm", "set", bare.name, "--memory", "256M")
    assert_clean(bare.wm)


def test_disabled_checkpoints_are_refused_in_every_state(bare: Guest) -> None:
    bare.ensure_off()
    count = checkpoint_count(bare)
    bare.wm("vm", "set", bare.name, "--checkpoint-type", "disabled")
    try:
        # (no need to wait for the boot: a VM that is starting runs)
        for state, command in (("off", None), ("running", "start"), ("saved", "save")):
            if command:
                bare.wm("vm", command, bare.name)
            for wanted in ((), ("--type", "standard")):
                refused = bare.wm.run("checkpoint", "create", bare.name, *wanted)
                assert refused.returncode == 5, (state, refused)
                assert_clear_error(refused, "disabled", "--checkpoint-type")
            assert bare.state() == state
        assert checkpoint_count(bare) == count
    finally:
        bare.wm("vm", "set", bare.name, "--checkpoint-type", "production")
    bare.wm("vm", "stop", bare.name, "--force")  # a saved VM: its saved state is discarded
    assert bare.state() == "off" and bare.qemus() == []
    assert_clean(bare.wm)
