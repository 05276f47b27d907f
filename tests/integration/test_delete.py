"""``checkpoint delete``: one checkpoint, a subtree, or every match of a glob, through the real CLI.

Every test keeps the sha256 of what each checkpoint froze and of Now, deletes, and then checks
that the tree moved as Hyper-V's Remove-VMSnapshot would, that every remaining checkpoint and
Now kept their exact content, and that no image file was orphaned or lost.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Waymark, content_sha256, file_sha256, qemu_io_write, query

MIB = 1 << 20
KIB = 1 << 10
DELETE_TIMEOUT = 15


class Vm:
    """One single-disk VM driven through the CLI; remembers what each checkpoint froze."""

    def __init__(self, wm: Waymark, name: str, size: str = "4M") -> None:
        self.wm, self.name = wm, name
        self.id: str = wm.json("vm", "create", name, "--disk", size)["id"]
        self.expected: dict[str, str] = {}  # checkpoint id -> sha256 of its content

    def active(self) -> str:
        """The active image, from the catalog (cheaper than a CLI call)."""
        ((path,),) = query(self.wm.home, "SELECT i.path FROM disks d JOIN images i "
                                         "ON i.id = d.active_image_id WHERE d.vm_id = ?", self.id)
        return str(path)

    def write(self, offset: int, length: int, pattern: int) -> None:
        qemu_io_write(Path(self.active()), "qcow2", offset, length, pattern)

    def checkpoint(self, name: str) -> str:
        data = self.wm.json("checkpoint", "create", self.name, "--name", name)
        self.expected[data["id"]] = content_sha256(data["disks"][0]["frozen_image"])
        return str(data["id"])

    def apply(self, ref: str) -> None:
        self.wm("checkpoint", "apply", self.name, ref, "--discard-current")

    def listing(self) -> dict[str, Any]:
        data: dict[str, Any] = self.wm.json("checkpoint", "list", self.name)
        return data

    def parents(self) -> dict[str, str | None]:
        return {c["id"]: c["parent_id"] for c in self.listing()["checkpoints"]}

    def frozen(self, ckpt: str) -> str:
        disks = self.wm.json("checkpoint", "show", self.name, ckpt)["disks"]
        assert len(disks) == 1
        return str(disks[0]["frozen_image"])

    def assert_contents(self, ids: set[str] | list[str],
                        listing: dict[str, Any] | None = None) -> None:
        """Exactly these checkpoints remain, each with the content it froze."""
        listing = listing or self.listing()
        listed = {c["id"] for c in listing["checkpoints"]}
        assert listed == set(ids)
        for ckpt in listed:
            assert content_sha256(self.frozen(ckpt)) == self.expected[ckpt], \
                f"checkpoint {ckpt} lost its content"

    def now_sha(self, *, shown: bool = False) -> str:
        """Now's content; with ``shown``, its active image is the one `vm show` names."""
        active = self.active()
        if shown:
            assert self.wm.json("vm", "show", self.name)["disks"][0]["active_image"] == active
        return content_sha256(active)

    def snapshot(self) -> dict[str, str]:
        """Every file of the VM with its sha256: to prove that nothing changed."""
        folder = self.wm.home / "vms" / self.id
        return {str(p): file_sha256(p) for p in folder.rglob("*") if p.is_file()}

    def files(self) -> set[str]:
        return {str(p) for p in (self.wm.home / "vms" / self.id / "disks").iterdir()}

    def assert_no_orphans(self) -> None:
        owned = {p for (p,) in query(self.wm.home, "SELECT path FROM images WHERE vm_id = ? "
                                                   "AND pinned = 0", self.id)}
        files = self.files()
        assert files == owned, f"stray files {files - owned}, missing files {owned - files}"
        configs = {p.stem for p in (self.wm.home / "vms" / self.id / "checkpoints").glob("*")}
        listed = {c for (c,) in query(self.wm.home, "SELECT id FROM checkpoints WHERE vm_id = ?",
                                      self.id)}
        assert configs == listed, "checkpoint configuration files disagree with the tree"
        assert query(self.wm.home, "SELECT count(*) FROM intents WHERE status = 'pending'") \
            == [(0,)]

    def delete(self, *args: str) -> list[str]:
        try:
            result = self.wm.run("checkpoint", "delete", self.name, *args, "--json",
                                 timeout=DELETE_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"checkpoint delete {args} did not finish in "
                                 f"{DELETE_TIMEOUT} s (compaction never ends)") from None
        return [d["id"] for d in result.ok().json()["deleted"]]


def chain_length(path: str) -> int:
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
                         check=True, capture_output=True, text=True).stdout
    return len(json.loads(out))


def allocated(path: str) -> int:
    return Path(path).stat().st_blocks * 512


def build_chain(vm: Vm, names: list[str]) -> dict[str, str]:
    """Write a distinct pattern, then checkpoint, for each name: a chain of checkpoints."""
    ids = {}
    for number, name in enumerate(names):
        vm.write(number * 64 * KIB, 64 * KIB, 0x10 + number)
        ids[name] = vm.checkpoint(name)
    return ids


@pytest.mark.also_served
def test_deleting_a_middle_checkpoint_reparents_its_children(wm: Waymark) -> None:
    vm = Vm(wm, "middle")
    ids = build_chain(vm, ["A", "B", "C"])
    vm.write(MIB, 64 * KIB, 0x77)
    now = vm.now_sha()
    assert vm.parents() == {ids["A"]: None, ids["B"]: ids["A"], ids["C"]: ids["B"]}

    assert vm.delete("B") == [ids["B"]]

    listing = vm.listing()
    assert {c["id"]: c["parent_id"] for c in listing["checkpoints"]} == \
        {ids["A"]: None, ids["C"]: ids["A"]}
    assert listing["current_checkpoint_id"] == ids["C"]
    # B's layer was merged away: C's chain is one image shorter
    assert {c["id"]: c["chain_depth"] for c in listing["checkpoints"]} == \
        {ids["A"]: 1, ids["C"]: 2}
    vm.assert_contents([ids["A"], ids["C"]], listing)
    assert vm.now_sha(shown=True) == now
    vm.assert_no_orphans()


@pytest.mark.also_served
def test_deleting_the_current_checkpoint_moves_now_up(wm: Waymark) -> None:
    vm = Vm(wm, "current")
    ids = build_chain(vm, ["A", "B"])
    vm.write(2 * MIB, 128 * KIB, 0x5A)
    now = vm.now_sha()

    assert vm.delete(ids["B"][:10]) == [ids["B"]]  # by id prefix

    listing = vm.listing()
    assert listing["current_checkpoint_id"] == ids["A"]
    assert wm.json("vm", "show", vm.name)["current_checkpoint_id"] == ids["A"]
    vm.assert_contents([ids["A"]], listing)
    assert vm.now_sha(shown=True) == now, "Now's disk changed with its parent's deletion"
    vm.assert_no_orphans()
    assert len(vm.files()) == 2  # A's frozen base and Now's active image


@pytest.mark.also_served
def test_subtree_delete_keeps_nows_disk(wm: Waymark) -> None:
    vm = Vm(wm, "subtree")
    ids = build_chain(vm, ["A", "B", "C"])
    # a sibling branch under A that the subtree delete must not touch
    vm.apply("A")
    vm.write(3 * MIB, 64 * KIB, 0x44)
    ids["D"] = vm.checkpoint("D")
    vm.apply("C")
    vm.write(MIB, 192 * KIB, 0x99)  # Now, below C, which the subtree delete removes
    vm.write(0, 64 * KIB, 0x98)
    now = vm.now_sha()

    deleted = vm.delete("B", "--subtree")

    assert sorted(deleted) == sorted([ids["B"], ids["C"]])
    listing = vm.listing()
    assert {c["id"]: c["parent_id"] for c in listing["checkpoints"]} == \
        {ids["A"]: None, ids["D"]: ids["A"]}
    assert listing["current_checkpoint_id"] == ids["A"]
    assert vm.now_sha(shown=True) == now, "Now's disk content was lost with its parent's subtree"
    vm.assert_contents([ids["A"], ids["D"]], listing)
    vm.assert_no_orphans()


@pytest.mark.also_served
def test_subtree_delete_of_a_branch_without_now(wm: Waymark) -> None:
    """Deleting a branch Now is not on leaves a chain of images nothing references: all go.

    The graph must include an unreferenced image whose only child is an unreferenced leaf and
    whose id sorts first (the planner walks images by id), so branches are added until one has
    that order.
    """
    vm = Vm(wm, "branch")
    ids = build_chain(vm, ["A"])
    subtree: list[str] = []
    for round_ in range(8):
        vm.apply("A")
        vm.write(MIB, 128 * KIB, 0x20 + round_)
        subtree.append(vm.checkpoint(f"B{round_}"))
        vm.write(2 * MIB, 64 * KIB, 0x40 + round_)  # less than B's: C's image merges down
        subtree.append(vm.checkpoint(f"C{round_}"))
        upper, lower = (Path(vm.frozen(c)).stem for c in subtree[-2:])
        if upper < lower:
            break
    vm.apply("A")
    vm.write(3 * MIB, 64 * KIB, 0x21)
    now = vm.now_sha()

    assert sorted(vm.delete("B*", "--subtree", "--yes")) == sorted(subtree)

    listing = vm.listing()
    assert [c["id"] for c in listing["checkpoints"]] == [ids["A"]]
    assert listing["current_checkpoint_id"] == ids["A"]
    vm.assert_contents([ids["A"]], listing)
    assert vm.now_sha(shown=True) == now
    vm.assert_no_orphans()
    assert len(vm.files()) == 2


@pytest.mark.also_served
def test_glob_needs_yes_and_exact_references(wm: Waymark) -> None:
    vm = Vm(wm, "glob")
    ids = build_chain(vm, ["Keep", "Exp1", "Exp2", "Experiment 3"])
    vm.write(MIB, 64 * KIB, 0x66)
    now, files, parents = vm.now_sha(), vm.snapshot(), vm.parents()

    refused = wm.run("checkpoint", "delete", vm.name, "Exp*")
    assert refused.returncode == 2, refused.stderr
    assert "--yes" in refused.stderr and "3 checkpoints" in refused.stderr
    for name in ("Exp1", "Exp2", "Experiment 3"):
        assert name in refused.stderr
    none = wm.run("checkpoint", "delete", vm.name, "Nothing*", "--yes")
    assert none.returncode == 3, none.stderr
    assert "Nothing*" in none.stderr
    unknown = wm.run("checkpoint", "delete", vm.name, "Exp")  # not a pattern: exact name only
    assert unknown.returncode == 3, unknown.stderr
    assert vm.parents() == parents and vm.snapshot() == files

    deleted = vm.delete("Exp*", "--yes")

    assert sorted(deleted) == sorted([ids["Exp1"], ids["Exp2"], ids["Experiment 3"]])
    listing = vm.listing()
    assert listing["current_checkpoint_id"] == ids["Keep"]
    vm.assert_contents([ids["Keep"]], listing)
    assert vm.now_sha(shown=True) == now
    vm.assert_no_orphans()


@pytest.mark.also_served
def test_plain_reference_matches_one_checkpoint(wm: Waymark) -> None:
    vm = Vm(wm, "refs")
    build_chain(vm, ["dup", "dup"])
    other = vm.checkpoint("other")
    # a checkpoint named like another's id prefix: the exact name wins
    decoy = vm.checkpoint(other[:8])
    files = vm.snapshot()

    twice = wm.run("checkpoint", "delete", vm.name, "dup")
    assert twice.returncode == 4, twice.stderr
    assert "dup" in twice.stderr
    assert vm.snapshot() == files and len(vm.parents()) == 4

    assert vm.delete(other[:8]) == [decoy]
    assert other in vm.parents()
    assert vm.delete(other[:6]) == [other]
    vm.assert_contents(set(vm.expected) - {decoy, other})
    vm.assert_no_orphans()


@pytest.mark.also_served
def test_an_exact_name_wins_over_the_pattern_it_looks_like(wm: Waymark) -> None:
    vm = Vm(wm, "patches")
    ids = build_chain(vm, ["Patch [KB5001]*", "Patch K-other", "Patch 0-other"])
    # as a glob, 'Patch [KB5001]*' matches the other two and not itself
    assert vm.delete("Patch [KB5001]*") == [ids["Patch [KB5001]*"]]
    vm.assert_contents({ids["Patch K-other"], ids["Patch 0-other"]})

    # with no checkpoint so named, it is a glob again
    assert sorted(vm.delete("Patch [KB5001]*", "--yes")) == \
        sorted([ids["Patch K-other"], ids["Patch 0-other"]])
    vm.assert_contents(set())
    vm.assert_no_orphans()


def _merge_case(wm: Waymark, name: str, u_bytes: int, k_bytes: int) -> dict[str, Any]:
    """base (frozen by A) <- U (``u_bytes`` written, frozen by C) <- K (``k_bytes``, active);
    then delete C, which leaves U unreferenced with one child."""
    vm = Vm(wm, name)
    vm.write(0, 64 * KIB, 0x01)
    a = vm.checkpoint("A")
    vm.write(0, u_bytes, 0x02)
    c = vm.checkpoint("C")
    vm.write(64 * KIB, k_bytes, 0x03)
    u, k = vm.frozen(c), vm.active()
    assert chain_length(k) == 3
    now = vm.now_sha()
    assert vm.delete("C") == [c]
    vm.assert_contents([a])
    assert vm.now_sha(shown=True) == now
    vm.assert_no_orphans()
    kinds = [kind for (kind,) in query(wm.home, "SELECT kind FROM intents WHERE vm_id = ? "
                                                "ORDER BY id", vm.id)]
    return {"vm": vm, "u": u, "k": k, "kinds": kinds, "active": vm.active()}


def test_small_child_is_committed_down_into_its_parent(wm: Waymark) -> None:
    case = _merge_case(wm, "down", u_bytes=2 * MIB, k_bytes=64 * KIB)
    assert "commit_down" in case["kinds"] and "pull_up" not in case["kinds"]
    # the merged file (U's) took the active role; K's file is gone
    assert case["active"] == case["u"]
    assert not Path(case["k"]).exists()
    assert chain_length(case["active"]) == 2


def test_big_child_pulls_its_small_parent_up(wm: Waymark) -> None:
    case = _merge_case(wm, "up", u_bytes=64 * KIB, k_bytes=2 * MIB)
    assert "pull_up" in case["kinds"] and "commit_down" not in case["kinds"]
    assert case["active"] == case["k"]
    assert not Path(case["u"]).exists()
    assert chain_length(case["active"]) == 2


def test_space_reporting_with_a_shared_image(wm: Waymark) -> None:
    vm = Vm(wm, "space")
    ids = build_chain(vm, ["A"])
    vm.write(0, MIB, 0x0B)
    ids["B"] = vm.checkpoint("B")
    vm.write(MIB, 128 * KIB, 0x0C)
    ids["C"] = vm.checkpoint("C")
    vm.apply("B")
    vm.write(2 * MIB, 256 * KIB, 0x0D)
    ids["D"] = vm.checkpoint("D")
    b_image = vm.frozen("B")
    listing = {c["id"]: c for c in vm.listing()["checkpoints"]}
    assert all(c["shared_bytes"] == 0 for c in listing.values())
    assert listing[ids["B"]]["allocated_bytes"] == allocated(b_image) >= MIB
    now = vm.now_sha()

    assert vm.delete("B") == [ids["B"]]  # a branch point: its image now serves C and D

    assert Path(b_image).exists()
    listing = {c["id"]: c for c in vm.listing()["checkpoints"]}
    assert {k: c["parent_id"] for k, c in listing.items()} == \
        {ids["A"]: None, ids["C"]: ids["A"], ids["D"]: ids["A"]}
    shared = allocated(b_image)
    assert shared >= MIB
    for name in ("C", "D"):
        entry, frozen = listing[ids[name]], vm.frozen(ids[name])
        assert entry["shared_bytes"] == shared, name
        assert entry["allocated_bytes"] == allocated(frozen), name
        assert entry["chain_depth"] == chain_length(frozen) == 3, name
    assert listing[ids["A"]]["shared_bytes"] == 0
    assert listing[ids["A"]]["chain_depth"] == 1
    vm.assert_contents(set(listing), {"checkpoints": list(listing.values())})
    assert vm.now_sha(shown=True) == now
    vm.assert_no_orphans()  # the shared image is needed, not an orphan

    shown = wm.json("vm", "show", vm.name)
    active = shown["disks"][0]["active_image"]
    held = sum(allocated(p) for p in vm.files() if p != active)
    assert shown["checkpoint_space_bytes"] == held
    assert shown["checkpoint_space_bytes"] == shared + sum(
        listing[i]["allocated_bytes"] for i in listing)
    assert shown["checkpoint_count"] == 3
