"""Backups of a running guest under real QEMU (TCG here), driven only through the CLI.

One VM of the test guest, ``g`` (with its agent), boots once for the module and is carried
through the tests in file order; each test first puts it in the state it needs, so any single
test also runs alone. The last test boots a second VM, ``bare``, with ``waymark.agent=off``
(``g`` is paused meanwhile, to spare the CPU).

What the guest does (see :mod:`waymark.testguest.scripts`): ``COUNTER <n>`` on its serial port about
five times a second, and every fifth counter ``LINE <m>`` appended to ``/data/log.txt`` with
``sync``. A backup of a running VM is QEMU's ``blockdev-backup`` inside a freeze of the guest's
file systems: the point's disk is clean (no journal to replay) and its log holds ``LINE 1..K``;
the guest never stops counting, and no checkpoint appears.
"""

from __future__ import annotations

import json
import signal
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
    readies,
    wait_for,
)
from tests.helpers import Waymark


@pytest.fixture(scope="module")
def vm(home: Waymark, image: dict[str, str]) -> Guest:
    """The guest with its agent (256 MiB; the VM's checkpoint type: production)."""
    return create(home, "g", image)


@pytest.fixture(scope="module")
def repo(home: Waymark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("backups") / "repo"
    home("backup", "repo", "init", str(path))
    return path


# --- helpers ----------------------------------------------------------------------------------

def assert_clean(wm: Waymark) -> None:
    checked = wm.run("check", "--json")
    assert checked.returncode == 0 and checked.json()["clean"], checked.stdout + checked.stderr


def checkpoint_count(guest: Guest) -> int:
    return int(guest.wm.json("vm", "show", guest.name)["checkpoint_count"])


def wait_agent(guest: Guest) -> None:
    wait_for(f"{guest.name}'s guest agent", lambda: guest.status()["agent"], 30.0, interval=0.5)


def latest(guest: Guest, mark: int = 0) -> int:
    """The last complete COUNTER printed since ``mark``."""
    return counters(guest.since(mark))[-1]


def backup(guest: Guest, repo: Path) -> dict[str, Any]:
    """``backup run`` of the guest, which must succeed; the point's manifest."""
    (row,) = guest.wm.json("backup", "run", guest.name, "--repo", str(repo))
    assert row["ok"] and row["vm"] == guest.name, row
    (path,) = repo.glob(f"vms/*/points/{row['point']['id']}.json")
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def assert_backed_up_whole(guest: Guest, repo: Path) -> None:
    """Every disk file is a point's (no temporary file left), every point verifies, and QEMU
    holds no backup job or target node any more."""
    named = {d["file"] for p in repo.glob("vms/*/points/*.json")
             for d in json.loads(p.read_text())["disks"]}
    files = {str(p.relative_to(repo)) for p in repo.glob("vms/*/disks/**/*") if p.is_file()}
    assert files == named, f"files no manifest names: {files - named}"
    rows = guest.wm.json("backup", "verify", "--repo", str(repo))
    assert all(r["problems"] == [] for r in rows), rows
    if guest.state() in ("running", "paused"):
        jobs = guest.qmp_command("query-jobs")
        assert not [j for j in jobs if j["id"].startswith("wm-backup-")], jobs
        nodes = [n["node-name"] for n in guest.qmp_command("query-named-block-nodes", flat=True)]
        assert not [n for n in nodes if n.startswith("wb")], nodes


def point_raw(repo: Path, point: dict[str, Any], dest: Path) -> Path:
    """The point's disk, restored with stock qemu-img, as a raw file."""
    (disk,) = point["disks"]
    return flatten(str(repo / disk["file"]), dest)


def kept_running(guest: Guest, mark: int, above: int) -> list[int]:
    """The guest counted on past ``above`` since ``mark`` without a gap or a reboot."""
    seen = guest.wait_counter_above(mark, above)
    assert seen == list(range(seen[0], seen[0] + len(seen))), seen
    assert readies(guest.since(mark)) == [] and STARTED not in guest.since(mark)
    assert guest.state() == "running"
    return seen


# --- g: the guest with its agent, in order ----------------------------------------------------

def test_a_running_guest_backs_up_application_consistent_and_restores_as_new(
        vm: Guest, repo: Path, tmp_path: Path) -> None:
    vm.ensure_running()
    wait_agent(vm)
    vm.wait_counter_above(0, latest(vm) + 6)  # a LINE record at least
    count = checkpoint_count(vm)
    mark = vm.mark()
    before = latest(vm)

    started = time.monotonic()
    point = backup(vm, repo)
    took = time.monotonic() - started
    assert point["consistency"].startswith("application-consistent"), point
    assert point["vm_state"] == "running" and point["kind"] == "full", point
    (disk,) = point["disks"]
    assert disk["virtual_size"] == 256 << 20, disk
    seen = kept_running(vm, mark, latest(vm) + 5)
    assert seen[0] <= before + 1, (before, seen[:3])
    print(f"backup of the running guest: {took:.1f} s, {disk['bytes'] >> 20} MiB; the guest "
          f"counted {seen[0]}..{seen[-1]} meanwhile")
    assert checkpoint_count(vm) == count, "a backup made a checkpoint"
    assert_backed_up_whole(vm, repo)

    # restoring into the running VM is refused before anything changes
    active = vm.active_image()
    refused = vm.wm.run("backup", "restore", vm.name, "--repo", str(repo), "--discard-current")
    assert refused.returncode == 5, refused
    assert_clear_error(refused, "running", "off")
    assert vm.active_image() == active and checkpoint_count(vm) == count
    assert vm.state() == "running"

    # as a new VM: a clean file system, its log numbered from 1
    made = vm.wm.json("backup", "restore", vm.name, "--repo", str(repo), "--point", point["id"],
                      "--as-new", "copy")
    copy = Guest(vm.wm, "copy")
    assert copy.id == made["restored_as"]["id"] != vm.id and copy.state() == "off"
    raw = flatten(copy.active_image(), tmp_path / "copy.raw")
    assert "needs_recovery" not in fs_features(raw), "the frozen point needs a journal replay"
    lines = log_lines(raw)
    assert lines and numbered(lines), lines[-3:]
    print(f"the point holds LINE 1..{len(lines)}")
    assert_clean(vm.wm)

    # the copy boots, while the original runs on
    mark = vm.mark()
    try:
        copy.boot()
        assert copy.qemus() and set(copy.qemus()).isdisjoint(vm.qemus())
    finally:
        vm.wm.run("vm", "stop", copy.name, "--force")
    assert copy.state() == "off" and copy.qemus() == []
    kept_running(vm, mark, latest(vm) + 3)
    assert checkpoint_count(vm) == count
    vm.wm("vm", "delete", copy.name, "--yes")
    assert_clean(vm.wm)


def test_a_paused_guest_is_backed_up_crash_consistent_and_stays_paused(vm: Guest, repo: Path
                                                                       ) -> None:
    vm.ensure_running()
    vm.wait_counter_above(vm.mark(), 0)
    count = checkpoint_count(vm)
    assert vm.wm.json("vm", "pause", vm.name) == {"state": "paused", "changed": True}
    frozen = vm.since()

    point = backup(vm, repo)
    assert point["consistency"].startswith("crash-consistent"), point
    assert "paused" in point["consistency"] and point["vm_state"] == "paused", point
    assert vm.state() == "paused"
    time.sleep(1.0)  # five counters' worth
    assert vm.since() == frozen, "the serial log grew while the VM was paused"
    assert checkpoint_count(vm) == count
    assert_backed_up_whole(vm, repo)

    mark = vm.mark()
    vm.wm("vm", "resume", vm.name)
    kept_running(vm, mark, counters(frozen)[-1] + 3)
    assert_clean(vm.wm)


def test_a_run_killed_as_its_copy_began_leaves_nodes_the_next_run_clears(
        vm: Guest, repo: Path) -> None:
    """Waymark killed once the live copy began leaves its job and its target's two nodes (the
    qcow2 node and the file node ``blockdev-create`` formatted through) in the VM's QEMU: the
    next run clears them all and takes a whole point; the VM runs on."""
    vm.ensure_running()
    killed = vm.wm.run("backup", "run", vm.name, "--repo", str(repo), "--json",
                       env=vm.wm.env(WAYMARK_FAILPOINT="backup-started"))
    assert killed.returncode == -signal.SIGKILL, killed
    nodes = [n["node-name"] for n in vm.qmp_command("query-named-block-nodes", flat=True)]
    assert [n for n in nodes if n.startswith("wbf")] and \
        [n for n in nodes if n.startswith("wb") and not n.startswith("wbf")], nodes

    point = backup(vm, repo)
    assert point["kind"] == "full", point  # the killed run's start proved nothing
    assert_backed_up_whole(vm, repo)
    assert vm.state() == "running"


# --- bare: the guest without its agent --------------------------------------------------------

def test_without_an_agent_a_running_guest_is_backed_up_crash_consistent(
        vm: Guest, repo: Path, image: dict[str, str], tmp_path: Path) -> None:
    if vm.state() == "running":
        vm.wm("vm", "pause", vm.name)  # spare the CPU for the second guest
    bare = create(vm.wm, "bare", image, append=f"{image['append']} waymark.agent=off")
    try:
        bare.boot()
        assert bare.status()["agent"] is False
        mark = bare.mark()
        point = backup(bare, repo)
        assert point["consistency"].startswith("crash-consistent: "), point
        reason = point["consistency"].removeprefix("crash-consistent: ")
        assert "agent" in reason, point
        print(f"without an agent: {point['consistency']}")
        assert point["vm_state"] == "running", point
        # not frozen: the point is a crash image of a mounted file system, whose journal a
        # restore replays (the contrast with the agent's application-consistent point)
        raw = point_raw(repo, point, tmp_path / "bare.raw")
        assert "needs_recovery" in fs_features(raw)
        lines = log_lines(raw)
        assert lines and numbered(lines), lines[-3:]
        kept_running(bare, mark, latest(bare) + 3)
        assert checkpoint_count(bare) == 0
        assert_backed_up_whole(bare, repo)
        listed = vm.wm.json("backup", "list", bare.name, "--repo", str(repo))
        assert [r["id"] for r in listed] == [point["id"]], listed
    finally:
        bare.wm.run("vm", "stop", bare.name, "--force")
    assert bare.qemus() == []
    assert_clean(vm.wm)
