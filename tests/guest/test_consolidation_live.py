"""Consolidation of a running VM (docs/engine.md, "Consolidation"): a running test guest with more
than DEPTH checkpoints is consolidated live (QEMU's graph becomes A -> S and A's header says the
same), keeps counting, and every live operation after that (a checkpoint, a delete) first
relinks A onto its real chain live, so every checkpoint stays exact and ``check`` clean. Then
Waymark SIGKILLed at every journal point of a live link (``vm consolidate``) and of a live
unlink (``vm set --consolidate off``), one booted guest reused: after the next command's
recovery QEMU's graph and A's header agree and match the catalog, the guest runs on, nothing is
lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.guest.guests import Guest, create
from tests.helpers import Waymark, content_sha256, query

GUEST_ERRORS = ("I/O error", "EXT4-fs error", "Buffer I/O", "Read-only file system")
NAME = "lcons"


def header_chain(path: str) -> list[str]:
    """The files of ``path``'s chain as its headers name them, top first."""
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
                         check=True, capture_output=True, text=True).stdout
    return [str(Path(info["filename"])) for info in json.loads(out)]


def qemu_chain(vm: Guest) -> list[str]:
    """The running QEMU's chain of the VM's one disk, active image first."""
    path = vm.qemu_file()
    (device,) = [d for d in vm.qmp_command("query-block") if d.get("inserted")]
    image, chain = device["inserted"]["image"], []
    while image:
        chain.append(path(image["filename"]))
        image = image.get("backing-image")
    return chain


def catalog_chain(vm: Guest) -> list[str]:
    """The active image's real chain in the catalog, top first."""
    rows = dict(query(vm.wm.home, "SELECT path, (SELECT p.path FROM images p WHERE "
                                  "p.id = i.parent_id) FROM images i WHERE i.vm_id = ?", vm.id))
    chain = [vm.active_image()]
    while rows.get(chain[-1]):
        chain.append(rows[chain[-1]])
    return chain


def consolidation(vm: Guest) -> tuple[str, bool] | None:
    found = query(vm.wm.home, "SELECT path, linked FROM consolidations WHERE vm_id = ?", vm.id)
    return (str(found[0][0]), bool(found[0][1])) if found else None


def assert_agrees(vm: Guest) -> None:
    """QEMU's graph is A's header chain, and the catalog's: A -> S when linked, else the real
    chain; no node of the other kind is left in QEMU."""
    chain, record = qemu_chain(vm), consolidation(vm)
    assert chain == header_chain(chain[0]), "QEMU and A's header disagree"
    if record is not None and record[1]:
        assert chain == [vm.active_image(), record[0]]
    else:
        assert chain == catalog_chain(vm)
    nodes = {n["node-name"] for n in vm.qmp_command("query-named-block-nodes", flat=True)}
    assert not any(node.startswith("c") for node in nodes) or (record and record[1]), nodes


def frozen(vm: Guest) -> dict[str, str]:
    """Each checkpoint's frozen image file (its id -> path)."""
    return dict(query(vm.wm.home, "SELECT f.checkpoint_id, i.path FROM frozen_images f JOIN "
                                  "images i ON i.id = f.image_id WHERE i.vm_id = ?", vm.id))


def contents(vm: Guest) -> dict[str, str]:
    return {ckpt: content_sha256(path) for ckpt, path in frozen(vm).items()}


def assert_runs_on(vm: Guest, mark: int) -> None:
    """The guest's counter still advances and it saw no I/O error since ``mark``."""
    last = max([0, *vm.wait_counter_above(mark, 0)])
    vm.wait_counter_above(vm.mark(), 0)
    assert last > 0
    seen = vm.since(mark)
    assert not [e for e in GUEST_ERRORS if e in seen], seen[-2000:]


def assert_clean(wm: Waymark) -> None:
    checked = wm.run("check", "--json")
    assert checked.returncode == 0 and checked.json()["clean"], checked.stdout + checked.stderr
    assert query(wm.home, "SELECT id, kind FROM intents WHERE status = 'pending'") == []


@pytest.fixture(scope="module")
def vm(home: Waymark, image: dict[str, str]) -> Guest:
    """The shared guest, booted once, with 5 checkpoints (deeper than DEPTH) taken live."""
    guest = create(home, NAME, image)
    guest.boot()
    for i in range(5):
        home("checkpoint", "create", NAME, "--name", f"c{i}", "--type", "standard")
    return guest


def test_a_running_vm_is_consolidated_live_and_relinked_before_each_change(vm: Guest) -> None:
    wm, mark = vm.wm, vm.mark()
    exact = contents(vm)
    assert len(qemu_chain(vm)) == 7  # the active image, 5 checkpoints, the base

    assert wm.json("vm", "consolidate", NAME)["disks"][0]["action"] == "built"
    record = consolidation(vm)
    assert record is not None and record[1]
    assert qemu_chain(vm) == [vm.active_image(), record[0]]  # two hops, in QEMU itself
    assert_agrees(vm)
    assert wm.json("vm", "show", NAME)["consolidation"]["linked_disks"] == 1
    assert_runs_on(vm, mark)

    live = wm.json("checkpoint", "create", NAME, "--name", "after", "--type", "standard")
    layer = live["disks"][0]["frozen_image"]
    assert header_chain(layer)[1:] == catalog_chain(vm)[2:]  # a frozen image never names S
    assert consolidation(vm) == (record[0], False)
    assert_agrees(vm)
    exact[live["id"]] = content_sha256(layer)
    assert wm.json("vm", "consolidate", NAME)["disks"][0]["action"] == "advanced"
    assert qemu_chain(vm) == [vm.active_image(), record[0]]
    assert_agrees(vm)

    middle = next(c for c in wm.json("checkpoint", "list", NAME)["checkpoints"]
                  if c["name"] == "c2")
    wm("checkpoint", "delete", NAME, middle["id"])
    exact.pop(middle["id"])
    assert_agrees(vm)
    assert wm.json("vm", "consolidate", NAME)["disks"][0]["action"] in ("advanced", "built",
                                                                        "linked")
    assert len(qemu_chain(vm)) == 2
    assert_agrees(vm)
    assert contents(vm) == exact  # every checkpoint holds what it held when it was taken
    assert_runs_on(vm, mark)
    assert_clean(wm)


def journal_points(wm: Waymark, command: list[str], log: Path) -> int:
    log.unlink(missing_ok=True)
    wm.run(*command, env=wm.env(WAYMARK_FAILPOINT_LOG=str(log))).ok()
    return len(log.read_text().splitlines())


def sweep(vm: Guest, command: list[str], reset: list[list[str]], tmp: Path) -> list[str]:
    """``command`` killed at each of its journal points (``reset`` run before each run);
    after each, recovery leaves QEMU, A's header and the catalog agreeing and the guest
    running. The labels of the points."""
    wm = vm.wm

    def prepare() -> None:
        for args in reset:
            wm(*args)
    prepare()
    points = journal_points(wm, command, tmp / "points.log")
    labels = [line.split(" ", 1)[1] for line in (tmp / "points.log").read_text().splitlines()]
    for n in range(points):
        prepare()
        mark = vm.mark()
        killed = wm.run(*command, env=wm.env(WAYMARK_FAILPOINT=str(n)))
        assert killed.returncode == -signal.SIGKILL, f"{command} at point {n}: {killed}"
        assert_clean(wm)  # its start recovers
        assert_agrees(vm)
        assert_runs_on(vm, mark)
    return labels


def test_a_kill_at_every_point_of_a_live_link_and_unlink_loses_nothing(
        vm: Guest, tmp_path: Path) -> None:
    wm = vm.wm
    wm("vm", "consolidate", NAME)
    exact = contents(vm)
    on, off = ["vm", "set", NAME, "--consolidate", "on"], ["vm", "set", NAME,
                                                            "--consolidate", "off"]
    linked = sweep(vm, ["vm", "consolidate", NAME], [off, on], tmp_path)
    assert "step:qmp_link" in linked, linked
    unlinked = sweep(vm, off, [on, ["vm", "consolidate", NAME]], tmp_path)
    assert "step:qmp_link" in unlinked, unlinked
    wm(*on)
    assert wm.json("vm", "consolidate", NAME)["disks"][0]["action"] == "built"
    assert_agrees(vm)
    assert contents(vm) == exact
    assert_clean(wm)



def test_qemu_dead_after_a_killed_link_recovery_writes_the_header_and_the_vm_boots_again(
        vm: Guest, tmp_path: Path) -> None:
    """Waymark killed just before the live link, then QEMU killed too: recovery links A by its
    header alone (the VM is off now); the next start boots on the real chain (the boot
    unlinks first) and a consolidation links it live again."""
    wm = vm.wm
    on, off = ["vm", "set", NAME, "--consolidate", "on"], ["vm", "set", NAME,
                                                            "--consolidate", "off"]
    wm(*off)
    wm(*on)
    command = ["vm", "consolidate", NAME]
    journal_points(wm, command, tmp_path / "points.log")
    labels = [line.split(" ", 1)[1] for line in (tmp_path / "points.log").read_text().splitlines()]
    wm(*off)
    wm(*on)
    exact = contents(vm)
    killed = wm.run(*command, env=wm.env(WAYMARK_FAILPOINT=str(labels.index("step:qmp_link"))))
    assert killed.returncode == -signal.SIGKILL, killed
    for pid in vm.qemus():
        os.kill(pid, signal.SIGKILL)
    assert_clean(wm)
    assert vm.state() == "off"
    record = consolidation(vm)
    assert record is not None and record[1]
    assert header_chain(vm.active_image()) == [vm.active_image(), record[0]]

    mark = vm.boot()
    assert qemu_chain(vm) == catalog_chain(vm)  # unlinked before QEMU opened it
    assert_agrees(vm)
    assert wm.json("vm", "consolidate", NAME)["disks"][0]["action"] == "linked"
    assert qemu_chain(vm) == [vm.active_image(), record[0]]
    assert_runs_on(vm, mark)
    assert contents(vm) == exact
    assert_clean(wm)


def test_a_linked_vm_saved_and_resumed_is_linked_again_live(vm: Guest) -> None:
    """A save keeps A's header on S; the resumed QEMU reads the real chain (the command line
    names it), so the consolidation links it again, live."""
    wm = vm.wm
    vm.ensure_running()
    wm("vm", "consolidate", NAME)
    record = consolidation(vm)
    assert record is not None and record[1]
    wm("vm", "save", NAME)
    mark = vm.mark()
    wm("vm", "start", NAME)
    assert qemu_chain(vm) == catalog_chain(vm)  # resumed on the real chain
    assert wm.json("vm", "consolidate", NAME)["disks"][0]["action"] == "linked"
    assert qemu_chain(vm) == [vm.active_image(), record[0]]
    assert_agrees(vm)
    assert_runs_on(vm, mark)
    assert_clean(wm)
