"""Fault injection on a running guest: Waymark SIGKILLed at every journal point of its live
operations, then the next command's recovery must leave one whole outcome and a guest that runs.

``WAYMARK_FAILPOINT=N`` kills the command just before its N-th journal point; a normal run with
``WAYMARK_FAILPOINT_LOG`` lists the points (``<N> <label>`` lines), so each point is run exactly
once. One VM of the test guest boots once for the module and is reused: after each kill,
``waymark check`` (its start runs recovery) must report nothing, the operation must have happened
whole or not at all, and the guest must run on: QEMU running (not stopped or in
``postmigrate``), its block graph exactly the catalog's active chain, its COUNTER lines advancing,
no freeze guard left, and a ``productiononly`` checkpoint possible within 15 s (a guest left
frozen cannot be frozen again, and that type fails rather than fall back).

The operations: ``checkpoint create --type standard`` (memory migrated live, disks switched),
``--type production`` (frozen through the agent, switched, thawed), and ``checkpoint apply
--checkpoint-first`` of a running VM (live safety checkpoint, power off, apply, install the
target's memory, compaction). Then QEMU itself dies after a killed checkpoint, and a checkpoint
that recovery completed is applied to prove its memory state whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.guest.guests import Guest, counters, create, gone, processes_naming, readies, wait_for
from tests.helpers import Waymark, content_sha256, file_sha256, query

KILLED = -9
PRODUCTION_WITHIN = 15.0  # a guard that outlived Waymark thaws within HOLD_LIMIT (10 s)
STARTING = "--- waymark: starting"

NAME = "lf"
STANDARD = ["checkpoint", "create", NAME, "--type", "standard"]
PRODUCTION = ["checkpoint", "create", NAME, "--type", "production"]
CREATE_POINTS = ["step:create_image", "step:claim_file", "step:write_file", "nodes-added"]


@pytest.fixture(scope="module")
def vm(home: Waymark, image: dict[str, str]) -> Guest:
    """The shared guest, booted once; every point adds up to two checkpoints, hence the limit."""
    guest = create(home, NAME, image)
    home("vm", "set", guest.name, "--max-checkpoints", "500")
    guest.boot()
    return guest


@pytest.fixture(scope="module")
def completed() -> dict[str, Any]:
    """What the standard sweep saw when recovery completed a checkpoint killed at 'switched'."""
    return {}


# --- observing the VM -------------------------------------------------------------------------

@dataclass(frozen=True)
class Before:
    ids: frozenset[str]
    current: str | None


def before(vm: Guest) -> Before:
    """The VM's checkpoints and current one, from the catalog (no command: none recovers)."""
    return Before(*catalog_tree(vm))


def catalog_tree(vm: Guest) -> tuple[frozenset[str], str | None]:
    ids = query(vm.wm.home, "SELECT id FROM checkpoints WHERE vm_id = ?", vm.id)
    (current,), = query(vm.wm.home, "SELECT current_checkpoint_id FROM vms WHERE id = ?", vm.id)
    return frozenset(i for (i,) in ids), current


def journal_points(vm: Guest, command: list[str], log: Path) -> list[str]:
    """The labels of the points a normal run of ``command`` passes, in order (it runs it)."""
    log.unlink(missing_ok=True)
    vm.wm.run(*command, env=vm.wm.env(WAYMARK_FAILPOINT_LOG=str(log))).ok()
    rows = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert [int(n) for n, _ in rows] == list(range(len(rows))), rows
    return [label for _, label in rows]


def kill_at(vm: Guest, command: list[str], point: int | str) -> None:
    result = vm.wm.run(*command, env=vm.wm.env(WAYMARK_FAILPOINT=str(point)))
    assert result.returncode == KILLED, \
        f"{command} with WAYMARK_FAILPOINT={point} was not killed: {result}"


def recover(vm: Guest) -> None:
    """``waymark check``: its start runs recovery; then it must find nothing at all."""
    result = vm.wm.run("check", "--json")
    assert result.stdout, f"waymark check printed nothing: {result}"
    report = json.loads(result.stdout)
    assert report["findings"] == [], f"waymark check after recovery: {report['findings']}"
    assert report["clean"] and result.returncode == 0, result
    assert_files_match_catalog(vm)


def assert_files_match_catalog(vm: Guest) -> None:
    """No pending intent; the VM's disks/ holds exactly its catalog images and its checkpoint
    folder exactly one description per checkpoint plus the memory states they record."""
    home = vm.wm.home
    assert query(home, "SELECT id, kind FROM intents WHERE status = 'pending'") == []
    images = {p for (p,) in query(home, "SELECT path FROM images WHERE vm_id = ? AND NOT pinned",
                                  vm.id)}
    disks = home / "vms" / vm.id / "disks"
    assert {str(p) for p in disks.iterdir()} == images
    (folder,), = query(home, "SELECT checkpoint_dir FROM vms WHERE id = ?", vm.id)
    rows = query(home, "SELECT id, memory_path FROM checkpoints WHERE vm_id = ?", vm.id)
    wanted = {f"{c}.json" for c, _ in rows} | {Path(m).name for _, m in rows if m}
    assert {p.name for p in Path(folder).iterdir()} == wanted


def new_checkpoint(vm: Guest, was: Before) -> tuple[dict[str, Any] | None, str | None]:
    """The one checkpoint the killed command left (``checkpoint show``) or None, and the
    current checkpoint; every checkpoint that was there is still there."""
    ids, current = catalog_tree(vm)
    assert was.ids <= ids, f"checkpoints vanished: {was.ids - ids}"
    added = ids - was.ids
    assert len(added) <= 1, f"several checkpoints appeared: {added}"
    if not added:
        assert current == was.current
        return None, current
    shown: dict[str, Any] = vm.wm.json("checkpoint", "show", vm.name, *added)
    assert shown["parent_id"] == was.current
    return shown, current


def whole(vm: Guest, ckpt: dict[str, Any]) -> str:
    """Assert a checkpoint is complete; returns what it is."""
    if ckpt["kind"] == "production":
        assert not ckpt["has_memory"] and ckpt["fallback_reason"] is None, ckpt
        return "production"
    if ckpt["has_memory"]:
        assert ckpt["kind"] == "standard", ckpt
        memory = Path(ckpt["memory_state"])
        (digest,), = query(vm.wm.home, "SELECT memory_sha256 FROM checkpoints WHERE id = ?",
                           ckpt["id"])
        assert memory.stat().st_size > 1 << 20, f"{memory}: {memory.stat().st_size} bytes"
        assert file_sha256(memory) == digest, f"{memory} does not match its recorded sha256"
        return "standard with memory"
    assert ckpt["kind"] == "disk-only", ckpt
    assert "Waymark was interrupted" in (ckpt["fallback_reason"] or ""), ckpt
    return "disk-only"


def created(vm: Guest, was: Before) -> tuple[str, str | None]:
    """What a killed checkpoint create left: the outcome and the new checkpoint's id."""
    ckpt, _ = new_checkpoint(vm, was)
    if ckpt is None:
        return "nothing", None
    assert ckpt["is_current"], ckpt
    return whole(vm, ckpt), ckpt["id"]


def chain(vm: Guest) -> tuple[str, set[str]]:
    """The catalog's active image of the VM's disk and every file of its backing chain."""
    rows = {i: (path, parent) for i, path, parent in
            query(vm.wm.home, "SELECT id, path, parent_id FROM images WHERE vm_id = ?", vm.id)}
    (active,), = query(vm.wm.home, "SELECT active_image_id FROM disks WHERE vm_id = ?", vm.id)
    files, image = set(), active
    while image is not None:
        path, image = rows[image]
        files.add(path)
    return rows[active][0], files


def guards(vm: Guest) -> list[int]:
    """Freeze guard processes of this VM (they name its agent socket; QEMU names its QMP
    socket too)."""
    qemus = set(vm.qemus())
    return [p for p in processes_naming(str(vm.run_dir / "qga.sock")) if p not in qemus]


def assert_counting(vm: Guest) -> None:
    """New COUNTER lines appear, one after the other."""
    mark = vm.mark()
    seen = wait_for("two new COUNTER lines", lambda: (c := counters(vm.since(mark)))[1:] and c,
                    15.0)
    assert seen == list(range(seen[0], seen[0] + len(seen))), seen


def assert_runs_on(vm: Guest) -> None:
    """The guest runs, with the disks the catalog says, unfrozen, and can be checkpointed."""
    (state,), = query(vm.wm.home, "SELECT state FROM vms WHERE id = ?", vm.id)
    assert state == "running", f"the catalog says the VM is {state}"
    assert vm.qemus() == [int((vm.run_dir / "qemu.pid").read_text())]
    qemu = vm.qmp_command("query-status")
    assert qemu["status"] == "running", f"QEMU is {qemu['status']}"
    active, files = chain(vm)
    path = vm.qemu_file()
    tops = [path(d["inserted"]["file"]) for d in vm.qmp_command("query-block")
            if "inserted" in d]
    assert tops == [active], f"QEMU writes {tops}, the catalog says {active}"
    nodes = {path(n["file"]) for n in vm.qmp_command("query-named-block-nodes", flat=True)
             if n["drv"] == "file"}
    assert nodes == files, f"QEMU's extra files {nodes - files}, missing {files - nodes}"
    assert_counting(vm)
    wait_for("no freeze guard left", lambda: guards(vm) == [], 12.0)
    deadline = time.monotonic() + PRODUCTION_WITHIN
    while True:
        done = vm.wm.run("checkpoint", "create", vm.name, "--type", "productiononly", "--json")
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert done.returncode == 0, f"no production checkpoint within {PRODUCTION_WITHIN:g} s: {done}"
    assert done.json()["kind"] == "production"


# --- the sweep --------------------------------------------------------------------------------

def sweep(vm: Guest, command: list[str], points: list[str],
          one: Callable[[int, Before], str]) -> tuple[list[str], list[str]]:
    """Kill ``command`` before each point in turn, then ``one`` recovers, checks and names the
    outcome. A failed point is recorded (with the VM made to run again) and the sweep goes on,
    so one run shows every point."""
    seen, problems = [], []
    vm.ensure_running()  # a listing run of apply leaves it saved
    for n, label in enumerate(points):
        started = time.monotonic()
        try:
            was = before(vm)
            kill_at(vm, command, n)
            seen.append(one(n, was))
        except AssertionError as err:
            seen.append("FAILED")
            problems.append(f"killed before point {n} ({label}): {err}".splitlines()[0])
            vm.ensure_running()
        print(f"point {n} {label}: {seen[-1]} ({time.monotonic() - started:.1f} s)")
    return seen, problems


def test_kill_standard_checkpoint_at_every_point(vm: Guest, tmp_path: Path,
                                                 completed: dict[str, Any]) -> None:
    vm.ensure_running()
    points = journal_points(vm, STANDARD, tmp_path / "points.log")
    assert points == [*CREATE_POINTS, "migrated", "switched", "commit"]

    def one(n: int, was: Before) -> str:
        at_kill = vm.since()
        recover(vm)
        outcome, ckpt_id = created(vm, was)
        if points[n] == "switched" and outcome == "standard with memory":
            completed.update(id=ckpt_id, serial=at_kill)
        assert_runs_on(vm)
        return outcome

    seen, problems = sweep(vm, STANDARD, points, one)
    assert problems == [], "\n".join(problems)
    # before the switch QEMU is told to forget it all and the guest resumes: nothing happened;
    # once the disks switched, recovery completes it, with its whole memory state
    assert seen == ["nothing"] * 5 + ["standard with memory"] * 2


def test_a_completed_checkpoint_resumes_where_it_was_taken(vm: Guest,
                                                           completed: dict[str, Any]) -> None:
    """The checkpoint recovery completed at 'switched' holds the memory of the guest stopped
    at the migration's end: applied, the counter goes on from there, without a boot."""
    assert completed, "the standard sweep completed no checkpoint at 'switched'"
    vm.ensure_running()
    # killed at 'switched', the guest was stopped: its serial log ended at the checkpoint
    taken = counters(completed["serial"])[-1]
    partial = not completed["serial"].endswith("\n")  # stopped mid-line: it ends after resume
    mark = vm.mark()
    vm.wm("checkpoint", "apply", vm.name, completed["id"], "--discard-current", "--start")

    def resumed() -> list[int]:
        text = vm.since(mark)
        return counters(text[text.rfind(STARTING):]) if STARTING in text else []

    seen = wait_for("counters after the resume", lambda: (c := resumed())[2:] and c, 15.0)
    assert seen[0] == taken + 1 or (partial and seen[0] == taken + 2), \
        f"taken at {taken} (mid-line: {partial}), resumed with {seen[:5]}"
    assert seen == list(range(seen[0], seen[0] + len(seen))), seen
    assert readies(vm.since(mark)) == [], "the guest booted instead of resuming"
    recover(vm)
    assert_runs_on(vm)


def test_kill_production_checkpoint_at_every_point(vm: Guest, tmp_path: Path) -> None:
    vm.ensure_running()
    wait_for("the guest agent", lambda: vm.status()["agent"], 30.0, interval=0.5)
    points = journal_points(vm, PRODUCTION, tmp_path / "points.log")
    assert points == [*CREATE_POINTS, "frozen-switched", "commit"]

    def one(n: int, was: Before) -> str:
        recover(vm)
        outcome, _ = created(vm, was)
        assert_runs_on(vm)
        return outcome

    seen, problems = sweep(vm, PRODUCTION, points, one)
    assert problems == [], "\n".join(problems)
    assert seen == ["nothing"] * 4 + ["production"] * 2


def test_kill_apply_checkpoint_first_at_every_point(vm: Guest, tmp_path: Path) -> None:
    """A running VM: the safety checkpoint is taken live (production, the VM's type), the VM
    turned off, the standard target applied and its memory installed (the VM is saved)."""
    vm.ensure_running()
    target = vm.wm.json("checkpoint", "create", vm.name, "--name", "target", "--type",
                        "standard")["id"]
    (target_disk,), = query(vm.wm.home, "SELECT i.path FROM frozen_images f JOIN images i "
                                        "ON i.id = f.image_id WHERE f.checkpoint_id = ?", target)
    command = ["checkpoint", "apply", vm.name, target, "--checkpoint-first"]
    points = journal_points(vm, command, tmp_path / "points.log")
    assert points == [*CREATE_POINTS, "frozen-switched", "commit",  # the safety checkpoint
                      "step:create_image", "commit",  # the apply
                      "step:copy_file", "step:write_file", "commit",  # its memory installed
                      "step:delete_file", "commit"]  # compaction

    def one(n: int, was: Before) -> str:
        recover(vm)
        safety, current = new_checkpoint(vm, was)
        state = vm.state()
        if safety is None:
            outcome = "nothing"
        else:
            assert whole(vm, safety) == "production"
            assert current in (target, safety["id"]), current
            outcome = "applied" if current == target else "safety checkpoint only"
        if outcome == "applied":
            assert target_disk in chain(vm)[1], "applied, but Now is not on the target's disk"
        mark = vm.mark()
        if state != "running":
            vm.ensure_running()  # off: it boots; saved: it resumes the target's memory
        if state == "saved":
            assert readies(vm.since(mark)) == [], "the saved VM booted instead of resuming"
        assert_runs_on(vm)
        return f"{outcome}, {state}"

    seen, problems = sweep(vm, command, points, one)
    assert problems == [], "\n".join(problems)
    # killed before the power-off the VM runs on; after it, it is off until applied, then saved
    assert seen == ["nothing, running"] * 4 + ["safety checkpoint only, running"] * 2 \
        + ["safety checkpoint only, off"] * 2 + ["applied, saved"] * 5


def holds_data(path: str) -> bool:
    """Some cluster of this image itself (not its backing files) holds data."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", path],
                         capture_output=True, text=True, check=True).stdout
    return any(e["data"] and e["depth"] == 0 for e in json.loads(out))


@pytest.mark.parametrize("point", ["switched", "commit"])
def test_qemu_dies_after_a_killed_standard_checkpoint(vm: Guest, point: str) -> None:
    """Waymark killed at ``point``, then QEMU killed before any other command: recovery finds
    QEMU gone and must keep whatever the guest wrote. Killed at 'switched', the guest never ran
    on the new overlay (stopped since the migration ended), so either outcome keeps every
    byte; at 'commit' it ran and wrote to it, so the checkpoint must be kept."""
    vm.ensure_running()
    was = before(vm)
    disks = vm.wm.home / "vms" / vm.id / "disks"
    files = set(disks.iterdir())
    kill_at(vm, STANDARD, point)
    (overlay,) = set(disks.iterdir()) - files
    if point == "commit":  # the guest appends a LINE and syncs about once a second
        wait_for("the guest's writes on the new overlay", lambda: holds_data(str(overlay)),
                 15.0, interval=0.5)
    else:
        time.sleep(1.0)  # it would have written by now, had it run
        assert not holds_data(str(overlay)), "the guest ran after the switch"
    (pid,) = vm.qemus()  # no Waymark command runs before QEMU dies: none may recover first
    os.kill(pid, signal.SIGKILL)
    wait_for("the killed QEMU to go", lambda: gone(pid), 10.0)
    at_crash = content_sha256(overlay)  # the guest's disk as QEMU left it

    recover(vm)
    assert vm.state() == "off"
    outcome, _ = created(vm, was)
    print(f"QEMU killed after Waymark at {point}: {outcome}")
    assert outcome in ("nothing", "standard with memory")
    if point == "commit":
        assert outcome == "standard with memory"
    assert content_sha256(chain(vm)[0]) == at_crash, "recovery lost what the guest wrote"

    mark = vm.boot()
    assert "WARNING" not in vm.since(mark), vm.since(mark)[-2000:]  # its file system mounted
    assert_runs_on(vm)
