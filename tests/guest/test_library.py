"""A real guest stored in a library share and deployed back, under real QEMU (TCG here), driven
only through the CLI (:mod:`waymark.usecases.library.store_deploy`).

One VM of the test guest boots once (what it prints and writes: see :mod:`tests.guest.test_live`)
and gets a branched checkpoint tree::

    m       standard, taken live (memory and disks)
    |- d1   taken off, after the guest ran on from m and shut down (disks only)
    `- d2   production, taken live after m was applied and resumed (disks only, quiesced)
       Now  saved with ``vm save``, a little after d2

Each checkpoint's disk content (its frozen image flattened by ``qemu-img``) and m's memory state
are hashed, and the three contents differ. Then:

- ``vm store`` (the VM saved) moves it into a library: it is gone from ``vm list`` and from the
  home's ``vms/`` folder, ``vm start`` fails with exit 3 naming the library, and ``library
  list`` shows it saved, with the tree, Now under d2 and memory in m only.
- ``vm deploy`` brings it back: the same id, name and tree (every checkpoint's fields), every
  frozen image with the same content and m's memory state with the same sha256, the library
  emptied, ``check`` clean. ``vm start`` resumes the saved state at the very next counter (no
  boot).
- Every checkpoint applied: d1 and d2 leave it off with exactly their disk content; m leaves it
  saved with m's disk content, and started it resumes at m's counter + 1 (no boot), and its data
  file's ``LINE`` numbering continues with no gap or duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.guest.guests import Guest, assert_clear_error, create, numbered, readies
from tests.guest.test_live import (
    after_start,
    assert_clean,
    clean_stop,
    consecutive,
    counters_after_start,
    disk_lines,
    latest,
    resumes_at,
    shown,
    wait_agent,
)
from tests.helpers import Waymark, content_sha256, file_sha256

# what a checkpoint is, as ``checkpoint list`` shows it, that a store and deploy must keep
KEPT = ("id", "name", "parent_id", "created_at", "kind", "has_memory", "requested_type",
        "fallback_reason", "skipped_disks", "pause_seconds", "freeze_seconds")


def tree(vm: Guest) -> dict[str, Any]:
    """The checkpoint tree: the current checkpoint, and each checkpoint's kept fields by name."""
    listed = vm.wm.json("checkpoint", "list", vm.name)
    return {"current_checkpoint_id": listed["current_checkpoint_id"],
            "checkpoints": {c["name"]: {k: c[k] for k in KEPT} for c in listed["checkpoints"]}}


def frozen_content(vm: Guest, ckpt: str) -> str:
    (disk,) = shown(vm, ckpt)["disks"]
    return content_sha256(disk["frozen_image"])


def apply_disk_only(vm: Guest, ckpt: str, content: str) -> None:
    """Applied, a disk-only checkpoint leaves the VM off with exactly its disk content."""
    applied = vm.wm.json("checkpoint", "apply", vm.name, ckpt, "--discard-current")
    assert applied["state"] == "off", applied
    assert vm.state() == "off" and vm.qemus() == []
    assert content_sha256(vm.active_image()) == content, f"the disk after applying {ckpt}"


@dataclass
class Recorded:
    """What the VM held before the store."""

    last_before: int  # the last COUNTER before m was taken
    last_after: int  # the last COUNTER once m was taken
    held: list[str]  # m's data file
    ids: dict[str, str]  # checkpoint name -> id
    tree: dict[str, Any]
    contents: dict[str, str]  # checkpoint name -> content sha256 of its frozen image
    memory: str  # sha256 of m's memory state
    expected: int  # the COUNTER the saved guest prints next


def branched_tree(vm: Guest, tmp: Path) -> Recorded:
    """m, d1 and d2 (see the module docstring), the VM left saved."""
    wm = vm.wm
    # m: standard, live
    mark = vm.boot()
    vm.wait_counter_above(mark, 11)  # two LINE records at least
    last_before = latest(vm, mark)
    m = wm.json("checkpoint", "create", vm.name, "--type", "standard", "--name", "m")
    last_after = latest(vm, mark)
    assert m["kind"] == "standard" and m["has_memory"] and m["parent_id"] is None, m
    held = disk_lines(m["disks"][0]["frozen_image"], tmp, "m")
    assert len(held) >= 2 and numbered(held), held

    # d1: the guest runs on (two more LINE records), shuts down, its disks are checkpointed
    vm.wait_counter_above(mark, last_after + 10)
    clean_stop(vm)
    d1 = wm.json("checkpoint", "create", vm.name, "--name", "d1")
    assert not d1["has_memory"] and d1["parent_id"] == m["id"], d1
    on_d1 = disk_lines(d1["disks"][0]["frozen_image"], tmp, "d1")
    assert numbered(on_d1) and len(on_d1) >= len(held) + 2, (held, on_d1)

    # d2: m applied (saved there) and resumed, the guest runs on, a production checkpoint
    applied = wm.json("checkpoint", "apply", vm.name, "m", "--discard-current")
    assert applied["state"] == "saved", applied
    mark = vm.mark()
    wm("vm", "start", vm.name)
    counters_after_start(vm, mark, last_after + 5)  # a LINE record since
    wait_agent(vm)
    d2 = wm.json("checkpoint", "create", vm.name, "--type", "production", "--name", "d2")
    assert d2["kind"] == "production" and d2["fallback_reason"] is None, d2
    assert not d2["has_memory"] and d2["parent_id"] == m["id"], d2
    on_d2 = disk_lines(d2["disks"][0]["frozen_image"], tmp, "d2")
    assert numbered(on_d2) and len(on_d2) > len(held), (held, on_d2)

    # Now: the guest runs on, saved
    vm.wait_counter_above(mark, latest(vm, mark) + 3)
    saved = wm.json("vm", "save", vm.name)
    assert saved["bytes"] > 0 and vm.state() == "saved" and vm.qemus() == []
    rec = Recorded(last_before, last_after, held,
                   ids={c["name"]: c["id"] for c in (m, d1, d2)}, tree=tree(vm),
                   contents={name: frozen_content(vm, name) for name in ("m", "d1", "d2")},
                   memory=file_sha256(m["memory_state"]), expected=resumes_at(vm.since()))
    assert rec.tree["current_checkpoint_id"] == d2["id"], rec.tree
    assert len(set(rec.contents.values())) == 3, rec.contents
    print(f"m between COUNTER {last_before} and {last_after}, {len(held)} lines; d1 "
          f"{len(on_d1)} lines, d2 {len(on_d2)}; saved {saved['bytes'] >> 20} MiB, resumes at "
          f"COUNTER {rec.expected}")
    return rec


def store(vm: Guest, library: Path, rec: Recorded) -> None:
    """Stored: gone from this host, refused, listed by the library with its tree."""
    wm = vm.wm
    stored = wm.json("vm", "store", vm.name, "--library", str(library))
    assert (stored["vm_name"], stored["vm_id"], stored["checkpoint_count"]) == \
        (vm.name, vm.id, 3), stored
    assert vm.name not in [row["name"] for row in wm.json("vm", "list")]
    folder = wm.home / "vms" / vm.id
    assert not folder.exists() or [p for p in folder.rglob("*") if p.is_file()] == []
    refused = wm.run("vm", "start", vm.name)
    assert refused.returncode == 3, refused
    assert_clear_error(refused, "stored in the library", str(library))
    (entry,) = wm.json("library", "list", "--library", str(library))["vms"]
    assert (entry["id"], entry["name"], entry["status"], entry["state"], entry["clash"]) == \
        (vm.id, vm.name, "stored", "saved", None), entry
    assert entry["current_checkpoint_id"] == rec.ids["d2"], entry
    m = rec.ids["m"]
    assert {c["name"]: (c["id"], c["parent_id"], c["has_memory"]) for c in entry["checkpoints"]} \
        == {"m": (m, None, True), "d1": (rec.ids["d1"], m, False),
            "d2": (rec.ids["d2"], m, False)}, entry["checkpoints"]
    print(f"stored {stored['files']} files, {stored['bytes'] >> 20} MiB")


def deploy(vm: Guest, library: Path, rec: Recorded) -> None:
    """Deployed: the same VM, tree, disk contents and memory state; the library emptied."""
    wm = vm.wm
    deployed = wm.json("vm", "deploy", vm.name, "--library", str(library))
    assert (deployed["vm_name"], deployed["vm_id"], deployed["state"],
            deployed["checkpoint_count"]) == (vm.name, vm.id, "saved", 3), deployed
    assert Guest(wm, vm.name).id == vm.id and vm.state() == "saved"
    assert tree(vm) == rec.tree
    assert {name: frozen_content(vm, name) for name in rec.contents} == rec.contents
    moved = shown(vm, "m")["memory_state"]
    assert Path(moved).is_relative_to(wm.home / "vms" / vm.id), moved
    assert file_sha256(moved) == rec.memory
    assert wm.json("library", "list", "--library", str(library))["vms"] == []
    assert_clean(wm)


def test_a_stored_vm_deploys_with_its_tree_and_every_checkpoint_applies_exactly(
        home: Waymark, image: dict[str, str], tmp_path: Path) -> None:
    vm = create(home, "lib", image)
    rec = branched_tree(vm, tmp_path)
    library = tmp_path / "library"
    home("library", "init", str(library))
    store(vm, library, rec)
    deploy(vm, library, rec)

    # the saved state resumes exactly
    mark = vm.mark()
    home("vm", "start", vm.name)
    seen = counters_after_start(vm, mark, rec.expected + 2)
    assert seen[0] == rec.expected and consecutive(seen), \
        f"saved before COUNTER {rec.expected}: {seen[:3]}"
    assert readies(after_start(vm, mark)) == [], "the guest booted instead of resuming"

    # every checkpoint applied
    apply_disk_only(vm, "d1", rec.contents["d1"])
    apply_disk_only(vm, "d2", rec.contents["d2"])
    applied = home.json("checkpoint", "apply", vm.name, "m", "--discard-current")
    assert applied["state"] == "saved", applied
    assert content_sha256(vm.active_image()) == rec.contents["m"], "the disk after applying m"
    mark = vm.mark()
    home("vm", "start", vm.name)
    seen = counters_after_start(vm, mark, rec.last_after + 10)  # two LINE records since
    assert rec.last_before < seen[0] <= rec.last_after + 1, \
        f"m taken between COUNTER {rec.last_before} and {rec.last_after}, resumed at {seen[:3]}"
    assert consecutive(seen), seen
    assert readies(after_start(vm, mark)) == [], "the guest booted instead of resuming"
    clean_stop(vm)
    lines = disk_lines(vm.active_image(), tmp_path, "now")
    assert numbered(lines), lines
    assert len(lines) >= len(rec.held) + 2, (len(rec.held), lines[-3:])
    assert_clean(home)
