"""Fault injection: kill waymark at every journal point of an operation, then check that the next
command's recovery loses nothing and leaves exactly one consistent outcome.

``WAYMARK_FAILPOINT=N`` makes the process SIGKILL itself just before its N-th journal point (each
file step of each driven intent, and each intent's commit). The points of an operation are
enumerated from the journal rows a normal run of it writes. Every N starts from the same state:
it is built once, copied aside, and copied back to the same path (images name each other by
absolute path) before each run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Waymark, content_sha256, file_sha256, qemu_io_write, query
from tests.tpm_host import nv_write

MIB = 1 << 20
KILLED = -9
# The compaction marker intent has no steps and is never driven (compaction marks it committed
# in one UPDATE), so it holds no journal point.
MARKER = "compact"


def intents(home: Path) -> list[tuple[Any, ...]]:
    """The journal, oldest first: (id, created_at, kind, steps, status)."""
    return query(home, "SELECT id, created_at, kind, steps, status FROM intents ORDER BY id")


def new_intents(home: Path, before: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Intents written since ``before`` was read (SQLite may reuse the ids of deleted rows)."""
    old = {(row[0], row[1]) for row in before}
    return [row for row in intents(home) if (row[0], row[1]) not in old]


def journal_points(rows: list[tuple[Any, ...]]) -> list[int]:
    """Journal points per intent, in order: each step, then the commit (markers have none)."""
    return [len(json.loads(steps)) + 1 for _, _, kind, steps, _ in rows if kind != MARKER]


@dataclass(frozen=True)
class Ckpt:
    parent_id: str | None
    name: str
    content: dict[str, str]  # disk id -> sha256 of the frozen chain
    tpm: str | None = None  # sha256 of its TPM state (a VM with a TPM)


@dataclass
class VmState:
    """One VM as the catalog and its image files say it is."""

    id: str
    name: str
    current: str | None
    active: dict[str, str]  # attached disk id -> sha256 of the active chain
    checkpoints: dict[str, Ckpt] = field(default_factory=dict)
    tpm: str | None = None  # sha256 of Now's TPM state (a VM with a TPM)


def vm_ids(home: Path) -> dict[str, str]:
    return {name: vm_id for vm_id, name in query(home, "SELECT id, name FROM vms")}


def read_state(home: Path, vm_id: str) -> VmState:
    (name, current, config), = query(
        home, "SELECT name, current_checkpoint_id, config FROM vms WHERE id = ?", vm_id)
    attached = json.loads(config)["disks"]
    active = dict(query(home, "SELECT d.id, i.path FROM disks d JOIN images i "
                              "ON i.id = d.active_image_id WHERE d.vm_id = ?", vm_id))
    now_tpm = home / "vms" / vm_id / "tpm" / "tpm2-00.permall"
    state = VmState(vm_id, name, current, {d: content_sha256(active[d]) for d in attached},
                    tpm=file_sha256(now_tpm) if now_tpm.is_file() else None)
    frozen: dict[str, dict[str, str]] = {}
    for ckpt_id, disk_id, path in query(
            home, "SELECT f.checkpoint_id, f.disk_id, i.path FROM frozen_images f "
                  "JOIN images i ON i.id = f.image_id WHERE i.vm_id = ?", vm_id):
        frozen.setdefault(ckpt_id, {})[disk_id] = content_sha256(path)
    for ckpt_id, parent, ckpt_name, tpm in query(
            home, "SELECT id, parent_id, name, tpm_state FROM checkpoints WHERE vm_id = ?",
            vm_id):
        state.checkpoints[ckpt_id] = Ckpt(parent, ckpt_name, frozen.get(ckpt_id, {}),
                                          tpm and hashlib.sha256(base64.b64decode(tpm))
                                          .hexdigest())
    return state


def assert_catalog_matches_files(home: Path) -> None:
    """Per VM, the files Waymark owns are exactly the catalog's images (no stray file, none
    missing), and there is one description file per checkpoint; no folder of an unknown VM."""
    for (path,) in query(home, "SELECT path FROM images"):
        assert Path(path).is_file(), f"the catalog names {path}, which does not exist"
    known = set(vm_ids(home).values())
    for folder in (home / "vms").iterdir() if (home / "vms").exists() else []:
        assert folder.name in known, f"{folder} belongs to no VM"
    for vm_id in known:
        owned = {p for (p,) in query(home, "SELECT path FROM images WHERE vm_id = ? AND NOT "
                                           "pinned", vm_id)}
        disks = home / "vms" / vm_id / "disks"
        on_disk = {str(p) for p in disks.rglob("*") if p.is_file()} if disks.exists() else set()
        assert on_disk == owned, f"stray files {on_disk - owned}, missing {owned - on_disk}"
        (folder,), = query(home, "SELECT checkpoint_dir FROM vms WHERE id = ?", vm_id)
        ckpts = {c for (c,) in query(home, "SELECT id FROM checkpoints WHERE vm_id = ?", vm_id)}
        files = {p.name for p in Path(folder).iterdir()} if Path(folder).exists() else set()
        assert files == {f"{c}.json" for c in ckpts}


def assert_finished(home: Path) -> None:
    """Nothing is left to do: no pending intent, and compaction left no image that nothing
    needs (every owned image is active, frozen by a checkpoint, or shared by two children)."""
    assert query(home, "SELECT id, kind, next_step FROM intents WHERE status = 'pending'") == []
    for vm_id in vm_ids(home).values():
        rows = query(home, "SELECT id, path, pinned, parent_id FROM images WHERE vm_id = ?",
                     vm_id)
        needed = {i for (i,) in query(home, "SELECT active_image_id FROM disks WHERE vm_id = ?",
                                      vm_id)}
        needed |= {i for (i,) in query(
            home, "SELECT f.image_id FROM frozen_images f JOIN checkpoints c "
                  "ON c.id = f.checkpoint_id WHERE c.vm_id = ?", vm_id)}
        parents = [p for *_, p in rows if p is not None]
        for image_id, path, pinned, _ in rows:
            assert pinned or image_id in needed or parents.count(image_id) > 1, \
                f"{path} is neither pinned, active, frozen nor shared: compaction left it"


def assert_settled(home: Path) -> None:
    assert_catalog_matches_files(home)
    assert_finished(home)


class Sweep:
    """One starting state, restorable any number of times at the home the ``wm`` fixture uses."""

    def __init__(self, wm: Waymark, tmp_path: Path) -> None:
        self.wm = wm
        self.template = tmp_path / "template"

    def freeze(self) -> None:
        shutil.copytree(self.wm.home, self.template, symlinks=True)

    @contextmanager
    def fresh(self) -> Iterator[Waymark]:
        shutil.rmtree(self.wm.home, ignore_errors=True)
        shutil.copytree(self.template, self.wm.home, symlinks=True)
        yield self.wm

    def points(self, command: list[str]) -> list[int]:
        """Run ``command`` normally from the starting state; the journal points per intent."""
        with self.fresh() as wm:
            before = intents(wm.home)
            wm(*command)
            points = journal_points(new_intents(wm.home, before))
        assert points, f"{command} wrote no journal intent"
        return points

    def kill_at(self, command: list[str], n: int) -> Waymark:
        """Restore the starting state and run ``command`` killed before journal point ``n``."""
        with self.fresh() as wm:
            result = wm.run(*command, env=wm.env(WAYMARK_FAILPOINT=str(n)))
        assert result.returncode == KILLED, \
            f"{command} with WAYMARK_FAILPOINT={n} was not killed: {result}"
        return wm

    def past_the_end(self, command: list[str], total: int) -> None:
        """With the failpoint one past the last point, the command completes: none was missed."""
        with self.fresh() as wm:
            wm.run(*command, env=wm.env(WAYMARK_FAILPOINT=str(total))).ok()
            assert_settled(wm.home)


def active_paths(home: Path, vm_name: str) -> list[Path]:
    (config,), = query(home, "SELECT config FROM vms WHERE name = ?", vm_name)
    paths = dict(query(home, "SELECT d.id, i.path FROM disks d JOIN images i "
                             "ON i.id = d.active_image_id"))
    return [Path(paths[d]) for d in json.loads(config)["disks"]]


def build_vm_with_history(wm: Waymark, disks: int = 2) -> tuple[str, str]:
    """VM ``v`` with 1 or 2 disks: A, then B (current), then unsaved writes. Returns (A, B).
    ``disks=0``: a UEFI VM with a TPM and one disk, whose variable store and TPM change too."""
    platform = ["--firmware", "uefi", "--tpm", "on"] if disks == 0 else []
    wm("vm", "create", "v", *["--disk", "1M", "--disk", "2M"][:2 * max(disks, 1)], *platform)
    ids = []
    for name, patterns in (("A", (0x0A, 0x1A)), ("B", (0x0B, 0x1B)), (None, (0x0C, 0x1C))):
        for index, path in enumerate(active_paths(wm.home, "v")):
            offset = (len(ids) * 65536) + (index * MIB if disks else 0)
            qemu_io_write(path, "qcow2", offset, 65536, patterns[index])
        if platform:
            nv_write(wm.home / "vms" / vm_ids(wm.home)["v"] / "tpm", f"tpm-{name}")
        if name is not None:
            ids.append(wm.json("checkpoint", "create", "v", "--name", name)["id"])
    return ids[0], ids[1]


def recover_and_read(wm: Waymark, vm_id: str, problems: list[str] | None = None) -> VmState:
    """The next command after a crash, ``checkpoint list`` (it runs recovery first), and the
    state it leaves, from the catalog and the image files.

    Its recovery must finish everything. When ``problems`` is given, what it left undone is
    recorded there instead of failing at once, and ``vm show`` (the command after it) must then
    finish it."""
    listing = wm.json("checkpoint", "list", "v")
    assert_catalog_matches_files(wm.home)
    try:
        assert_finished(wm.home)
        unfinished = False
    except AssertionError as err:
        if problems is None:
            raise
        problems.append(f"after the first command: {err}".splitlines()[0])
        unfinished = True
    state = read_state(wm.home, vm_id)
    assert listing["vm_id"] == vm_id
    assert {c["id"] for c in listing["checkpoints"]} == set(state.checkpoints)
    assert listing["current_checkpoint_id"] == state.current
    if problems is None or unfinished:
        shown = wm.json("vm", "show", "v")
        assert_settled(wm.home)
        assert shown["current_checkpoint_id"] == state.current
        disks = [*shown["disks"], *filter(None, [shown["firmware_variables"]])]
        assert [Path(d["active_image"]) for d in disks] == active_paths(wm.home, "v")
        assert read_state(wm.home, vm_id) == state
    return state


def assert_kept(pre: VmState, post: VmState) -> None:
    """Every checkpoint that existed still exists, with its parent, name and exact content."""
    for ckpt_id, ckpt in pre.checkpoints.items():
        assert post.checkpoints.get(ckpt_id) == ckpt, f"checkpoint {ckpt.name} was damaged"


def new_checkpoint(pre: VmState, post: VmState) -> str | None:
    added = set(post.checkpoints) - set(pre.checkpoints)
    assert len(added) <= 1, f"several checkpoints appeared: {added}"
    return added.pop() if added else None


def outcome_create(pre: VmState, post: VmState) -> str:
    assert_kept(pre, post)
    assert post.active == pre.active, "checkpoint create changed the active disks' content"
    assert post.tpm == pre.tpm, "checkpoint create changed Now's TPM state"
    added = new_checkpoint(pre, post)
    if added is None:
        assert post.current == pre.current
        return "not done"
    assert post.checkpoints[added].content == pre.active
    assert post.checkpoints[added].tpm == pre.tpm
    assert post.checkpoints[added].parent_id == pre.current
    assert post.current == added
    return "done"


def outcome_apply(pre: VmState, post: VmState, target: str, *, safety: bool) -> str:
    """'not done', 'safety checkpoint only' (checkpoint-first) or 'done'; asserts it is whole."""
    assert_kept(pre, post)
    added = new_checkpoint(pre, post)
    if added is not None:
        assert safety, "apply --discard-current made a checkpoint"
        assert post.checkpoints[added].content == pre.active
        assert post.checkpoints[added].tpm == pre.tpm
        assert post.checkpoints[added].parent_id == pre.current
    applied = post.current == target and post.active == pre.checkpoints[target].content \
        and post.tpm == pre.checkpoints[target].tpm
    unchanged = post.active == pre.active and post.current == (added or pre.current) \
        and post.tpm == pre.tpm
    assert applied != unchanged, f"half-applied: current {post.current}, target {target}"
    if applied:
        assert added is not None or not safety, "applied without the safety checkpoint"
        return "done"
    return "safety checkpoint only" if added else "not done"


def sweep(wm: Waymark, tmp_path: Path, command: list[str],
          outcome: Callable[[VmState, VmState], str], disks: int = 2
          ) -> tuple[list[int], list[str], list[str]]:
    """Kill ``command`` at each of its journal points in turn. Returns the points per intent,
    the outcome after each kill, and what the first command after a kill left unfinished."""
    sweeper = Sweep(wm, tmp_path)
    build_vm_with_history(wm, disks)
    sweeper.freeze()
    vm_id = vm_ids(wm.home)["v"]
    pre = read_state(wm.home, vm_id)
    # Now differs from every checkpoint, so "applied" and "unchanged" cannot be confused
    assert pre.active not in [c.content for c in pre.checkpoints.values()]
    points = sweeper.points(command)
    assert outcome(pre, recover_and_read(wm, vm_id)) == "done"
    seen, problems = [], []
    for n in range(sum(points)):
        killed = sweeper.kill_at(command, n)
        found: list[str] = []
        seen.append(outcome(pre, recover_and_read(killed, vm_id, found)))
        problems += [f"killed before point {n}: {p}" for p in found]
    sweeper.past_the_end(command, sum(points))
    return points, seen, problems


def assert_recovery_finished(problems: list[str]) -> None:
    """The first command after a kill finished the whole operation (compaction included)."""
    assert problems == [], "recovery left work undone:\n" + "\n".join(problems)


def test_kill_checkpoint_create_at_every_point(wm: Waymark, tmp_path: Path) -> None:
    points, seen, problems = sweep(wm, tmp_path, ["checkpoint", "create", "v", "--name", "C"],
                         outcome_create)
    assert points == [2 + 1 + 1]  # one overlay per disk, the description file, the commit
    # every point comes before the commit: an operation that did not commit did not happen, so
    # recovery rolls it back (its new files removed)
    assert seen == ["not done"] * sum(points)
    assert_recovery_finished(problems)


def target_a(pre: VmState) -> str:
    """Checkpoint A's id (commands name it ``A``, so every run is the same command)."""
    return next(i for i, c in pre.checkpoints.items() if c.name == "A")


def test_kill_apply_discard_current_at_every_point(wm: Waymark, tmp_path: Path) -> None:
    def outcome(pre: VmState, post: VmState) -> str:
        return outcome_apply(pre, post, target_a(pre), safety=False)

    command = ["checkpoint", "apply", "v", "A", "--discard-current"]
    points, seen, problems = sweep(wm, tmp_path, command, outcome)
    # the apply (an overlay per disk + commit), then compaction drops each replaced image
    assert points == [3, 2, 2]
    # killed before the apply commits: rolled back; after it: recovery finishes the compaction
    assert seen == ["not done"] * points[0] + ["done"] * sum(points[1:])
    assert_recovery_finished(problems)


def test_kill_apply_checkpoint_first_at_every_point(wm: Waymark, tmp_path: Path) -> None:
    def outcome(pre: VmState, post: VmState) -> str:
        return outcome_apply(pre, post, target_a(pre), safety=True)

    command = ["checkpoint", "apply", "v", "A", "--checkpoint-first"]
    points, seen, problems = sweep(wm, tmp_path, command, outcome, disks=1)
    assert points == [3, 2, 2]  # safety checkpoint, apply, the drop of the replaced image
    # Each journaled operation is all-or-nothing: killed while taking the safety checkpoint,
    # nothing happened; killed before the apply commits, the safety checkpoint exists and Now is
    # unchanged (safe); killed later, recovery finishes the apply's compaction.
    assert seen == (["not done"] * points[0] + ["safety checkpoint only"] * points[1]
                    + ["done"] * points[2])
    assert_recovery_finished(problems)


def test_kill_at_every_point_of_a_uefi_vm_with_a_tpm_loses_neither(
        wm: Waymark, tmp_path: Path) -> None:
    """Checkpoint create, apply and delete of a VM whose UEFI variable store and TPM state
    change between checkpoints: killed at each journal point, the next command leaves each
    whole, variables and TPM state of every checkpoint and of Now included."""
    def applied(pre: VmState, post: VmState) -> str:
        return outcome_apply(pre, post, target_a(pre), safety=False)

    points, seen, problems = sweep(wm, tmp_path, ["checkpoint", "create", "v", "--name", "C"],
                                   outcome_create, disks=0)
    assert seen == ["not done"] * sum(points)
    for command, outcome in ((["checkpoint", "apply", "v", "A", "--discard-current"], applied),
                             (["checkpoint", "delete", "v", "A"], outcome_delete)):
        shutil.rmtree(wm.home)
        shutil.rmtree(tmp_path / "template")
        points, seen, more = sweep(wm, tmp_path, command, outcome, disks=0)
        assert set(seen) <= {"not done", "done"} and seen[-1] == "done", seen
        problems += more
    assert_recovery_finished(problems)


def outcome_delete(pre: VmState, post: VmState) -> str:
    """Deleting A: every other checkpoint and Now exact, A there or gone."""
    target = target_a(pre)
    assert post.active == pre.active and post.tpm == pre.tpm
    for ckpt_id, ckpt in pre.checkpoints.items():
        if ckpt_id != target:
            assert post.checkpoints[ckpt_id].content == ckpt.content, ckpt.name
            assert post.checkpoints[ckpt_id].tpm == ckpt.tpm, ckpt.name
    return "not done" if target in post.checkpoints else "done"


def test_kill_vm_create_at_every_point(wm: Waymark, tmp_path: Path) -> None:
    sweeper = Sweep(wm, tmp_path)
    wm("vm", "create", "other", "--disk", "1M")
    other_id = vm_ids(wm.home)["other"]
    other = read_state(wm.home, other_id)
    sweeper.freeze()
    command = ["vm", "create", "new", "--disk", "4M"]
    points = sweeper.points(command)
    assert points == [3]  # the VM folder, the disk image, the commit
    outcomes = []
    for n in range(sum(points)):
        killed = sweeper.kill_at(command, n)
        (params,), = query(killed.home, "SELECT params FROM intents WHERE kind = 'vm_create' "
                                        "ORDER BY id DESC LIMIT 1")
        new_id = json.loads(params)["vm"]["id"]
        listing = killed.json("vm", "list")
        assert read_state(killed.home, other_id) == other
        assert_settled(killed.home)
        if "new" not in {v["name"] for v in listing}:
            for table in ("images", "disks"):
                assert query(killed.home, f"SELECT count(*) FROM {table} WHERE vm_id = ?",
                             new_id) == [(0,)]
            assert not (killed.home / "vms" / new_id).exists()
            outcomes.append("not done")
            continue
        shown = killed.json("vm", "show", "new")
        assert shown["id"] == new_id and len(shown["disks"]) == 1
        disk = shown["disks"][0]
        assert disk["virtual_size"] == 4 * MIB
        assert content_sha256(disk["active_image"]) == hashlib.sha256(bytes(4 * MIB)).hexdigest()
        outcomes.append("done")
    assert outcomes == ["not done"] * sum(points)  # every point comes before the commit
    sweeper.past_the_end(command, sum(points))


def test_kill_vm_delete_at_every_point(wm: Waymark, tmp_path: Path) -> None:
    """The catalog forgets the VM first; recovery then finishes removing its files."""
    sweeper = Sweep(wm, tmp_path)
    raw = tmp_path / "user.img"
    raw.write_bytes(b"\x42" * MIB)
    raw_sha = file_sha256(raw)
    wm("vm", "create", "other", "--disk", "1M")
    wm("vm", "create", "doomed", "--disk", str(raw))
    wm("checkpoint", "create", "doomed")
    ids = vm_ids(wm.home)
    other = read_state(wm.home, ids["other"])
    sweeper.freeze()
    command = ["vm", "delete", "doomed", "--yes"]
    points = sweeper.points(command)
    # 2 owned images (the frozen overlay on the raw file, Now's), 1 checkpoint description, the
    # saved state's 2 files and what the last run left (serial log, QEMU's log, why it stopped:
    # absent here, removing them is a no-op), the folder prune, the commit
    assert points == [2 + 1 + 2 + 3 + 1 + 1]
    for n in range(sum(points)):
        killed = sweeper.kill_at(command, n)
        names = {v["name"] for v in killed.json("vm", "list")}
        assert names == {"other"}
        for table in ("images", "disks", "checkpoints"):
            assert query(killed.home, f"SELECT count(*) FROM {table} WHERE vm_id = ?",
                         ids["doomed"]) == [(0,)]
        assert not (killed.home / "vms" / ids["doomed"]).exists()
        assert read_state(killed.home, ids["other"]) == other
        assert_settled(killed.home)
        assert file_sha256(raw) == raw_sha
    sweeper.past_the_end(command, sum(points))


def _break(path: Path) -> Callable[[], None]:
    """Move an image aside so qemu-img fails on it; returns the function that restores it."""
    aside = path.with_name(path.name + ".aside")
    path.rename(aside)
    return lambda: aside.rename(path)


def test_kill_recovery_itself(wm: Waymark, tmp_path: Path) -> None:
    """An apply killed inside its compaction; then its recovery is killed too, at each of the
    recovery's own journal points. The command after that still finishes the apply, once."""
    sweeper = Sweep(wm, tmp_path)
    build_vm_with_history(wm)
    sweeper.freeze()
    vm_id = vm_ids(wm.home)["v"]
    pre = read_state(wm.home, vm_id)
    command = ["checkpoint", "apply", "v", "A", "--discard-current"]
    sweeper.kill_at(command, 4)  # before the commit of the first drop (see the sweep above)
    crashed = tmp_path / "crashed"
    shutil.copytree(wm.home, crashed, symlinks=True)
    recovery_points = 0
    while True:  # kill the recovering command before its 0th, 1st, ... point
        shutil.rmtree(wm.home)
        shutil.copytree(crashed, wm.home, symlinks=True)
        run = wm.run("vm", "list", "--json", env=wm.env(WAYMARK_FAILPOINT=str(recovery_points)))
        if run.returncode == 0:
            break
        assert run.returncode == KILLED, run
        problems: list[str] = []
        post = recover_and_read(wm, vm_id, problems)
        assert problems == []
        assert outcome_apply(pre, post, target_a(pre), safety=False) == "done"
        recovery_points += 1
        assert recovery_points < 20
    # recovery: the first drop again (its delete is redone: the journal records a last step
    # only with the commit) and its commit, then the second drop's delete and commit
    assert recovery_points == 4
    assert_settled(wm.home)
    assert outcome_apply(pre, read_state(wm.home, vm_id), target_a(pre), safety=False) == "done"


def vm_files(home: Path) -> list[Path]:
    return sorted(p for p in (home / "vms").rglob("*") if p.is_file())


def _garble(path: Path) -> Callable[[], None]:
    """Put a file that is no image where an image was (the image aside); returns the function
    that restores it."""
    restore = _break(path)
    path.write_bytes(b"not an image\n" * 64)
    return restore


def test_failing_checkpoint_create_is_rolled_back(wm: Waymark) -> None:
    build_vm_with_history(wm)
    vm_id = vm_ids(wm.home)["v"]
    pre = read_state(wm.home, vm_id)
    files = vm_files(wm.home)
    # the second disk's active image is no image any more: its new overlay cannot take over its
    # change tracking (qemu-img reads its header), after the first disk's overlay already was made
    restore = _garble(active_paths(wm.home, "v")[1])
    before = intents(wm.home)
    result = wm.run("checkpoint", "create", "v", "--name", "C")
    assert result.returncode == 9, result  # ToolError: qemu-img failed
    assert "qemu-img failed" in result.stderr
    restore()
    assert [(k, st) for _, _, k, _, st in new_intents(wm.home, before)] == \
        [("checkpoint_create", "rolled_back")]
    assert vm_files(wm.home) == files
    assert recover_and_read(wm, vm_id) == pre
    # nothing is left half-done: the same command now succeeds
    wm("checkpoint", "create", "v", "--name", "C")
    assert outcome_create(pre, recover_and_read(wm, vm_id)) == "done"


@pytest.mark.parametrize("layer", ["active", "deepest"])
def test_a_checkpoint_of_a_chain_with_a_missing_file_is_refused_before_anything(
        wm: Waymark, layer: str) -> None:
    """The overlay's qemu-img does not open the chain below it (O(1) whatever its depth): the
    catalog's chain is checked for missing files first, as a start checks it."""
    build_vm_with_history(wm)
    vm_id = vm_ids(wm.home)["v"]
    pre = read_state(wm.home, vm_id)
    files = vm_files(wm.home)
    active = active_paths(wm.home, "v")[1]
    deepest = query(wm.home, "SELECT path FROM images WHERE vm_id = ? AND parent_id IS NULL "
                    "AND id IN (SELECT image_id FROM frozen_images)", vm_id)
    gone = active if layer == "active" else Path(sorted(p for (p,) in deepest)[0])
    restore = _break(gone)
    before = intents(wm.home)
    result = wm.run("checkpoint", "create", "v", "--name", "C")
    restore()
    assert result.returncode == 3, result  # NotFound
    assert f"disk image {gone} is missing." in result.stderr and "waymark check" in result.stderr
    assert new_intents(wm.home, before) == []
    assert vm_files(wm.home) == files
    assert recover_and_read(wm, vm_id) == pre


def test_failing_apply_is_rolled_back(wm: Waymark) -> None:
    a, b = build_vm_with_history(wm)
    wm("checkpoint", "apply", "v", a, "--discard-current")  # Now: a branch below A
    vm_id = vm_ids(wm.home)["v"]
    pre = read_state(wm.home, vm_id)
    files = vm_files(wm.home)
    # B's frozen image of the second disk is missing: an overlay on it cannot be made, while
    # Now's own chain (through A) is whole
    frozen = dict(query(wm.home, "SELECT f.disk_id, i.path FROM frozen_images f JOIN images i "
                                 "ON i.id = f.image_id WHERE f.checkpoint_id = ?", b))
    restore = _break(Path(frozen[list(pre.active)[1]]))
    before = intents(wm.home)
    result = wm.run("checkpoint", "apply", "v", b, "--discard-current")
    assert result.returncode == 9, result
    restore()
    assert [(k, st) for _, _, k, _, st in new_intents(wm.home, before)] == \
        [("checkpoint_apply", "rolled_back")]
    assert vm_files(wm.home) == files
    assert recover_and_read(wm, vm_id) == pre
    # --checkpoint-first: the safety checkpoint is a finished operation of its own and stays;
    # the failed apply is undone, so Now is still what it was
    restore = _break(Path(frozen[list(pre.active)[1]]))
    result = wm.run("checkpoint", "apply", "v", b, "--checkpoint-first")
    assert result.returncode == 9, result
    restore()
    post = recover_and_read(wm, vm_id)
    assert outcome_apply(pre, post, b, safety=True) == "safety checkpoint only"
    wm("checkpoint", "apply", "v", b, "--discard-current")
    assert outcome_apply(pre, recover_and_read(wm, vm_id), b, safety=True) == "done"


def test_failing_description_write_is_rolled_back(wm: Waymark, tmp_path: Path) -> None:
    """A file step that fails with an OS error (the checkpoint folder cannot be made: its parent
    is a regular file) is reported as an error and undone like a qemu-img failure, and the
    commands after it still work."""
    blocker = tmp_path / "not-a-folder"
    wm("vm", "create", "v", "--disk", "1M", "--disk", "1M",
       "--checkpoint-dir", str(blocker / "checkpoints"))
    # vm create refuses such a folder, so the file appears after it, where the folder should be
    blocker.write_text("a file where the checkpoint folder's parent should be\n")
    vm_id = vm_ids(wm.home)["v"]
    pre = read_state(wm.home, vm_id)
    files = vm_files(wm.home)
    before = intents(wm.home)
    result = wm.run("checkpoint", "create", "v", "--name", "C")
    problems = []
    if result.returncode == 0 or "Traceback" in result.stderr \
            or not result.stderr.startswith("error: "):
        problems.append(f"not reported as a Waymark error: exit {result.returncode}, stderr "
                        f"ends {result.stderr.strip().splitlines()[-1:]}")
    statuses = [(k, st) for _, _, k, _, st in new_intents(wm.home, before)]
    if statuses != [("checkpoint_create", "rolled_back")]:
        problems.append(f"intents after the failure: {statuses}")
    if vm_files(wm.home) != files:
        problems.append(f"stray files: {sorted(set(vm_files(wm.home)) - set(files))}")
    after = wm.run("vm", "list", "--json")
    if after.returncode != 0:
        problems.append(f"the next command (vm list) fails: exit {after.returncode}, "
                        f"{after.stderr.strip().splitlines()[-1:]}")
    assert problems == [], "\n".join(problems)
    assert read_state(wm.home, vm_id) == pre
    assert_settled(wm.home)
    blocker.unlink()  # once the folder can be made, the same command works
    wm("checkpoint", "create", "v", "--name", "C")
    assert outcome_create(pre, read_state(wm.home, vm_id)) == "done"
    assert (blocker / "checkpoints").is_dir()
