"""Property: random sequences of write / create / apply / delete / delete-subtree /
delete-by-pattern / rename / consolidate on one VM keep every invariant of the engine, after
every step.

The ops layer runs in-process (real catalog, real journal, real qemu-img); the test keeps a model
of the checkpoint tree and of the guest-visible bytes of Now and of each checkpoint, and checks:

(a) every remaining checkpoint's flattened content is what the disk held when it was taken;
(b) the active disk holds exactly what was written since the last apply;
(c) every image file is active, frozen, pinned or shared by two or more children; files on disk
    and catalog rows match one to one (and each file's backing file is its catalog parent);
(e) after a consolidation (waymark.engine.consolidation, its threshold at 0 layers here so
    that every one does something), Now reads through at most two files: itself and its
    parent or the consolidation holding that parent's view; consolidation files are the
    catalog's (``consolidations``) and nothing else's backing file;
(d) each merge copied the smaller side: for ``commit_down`` the child's own data is at most the
    parent's (+10% and one cluster of slack, as Waymark sizes files by st_blocks), for
    ``pull_up`` the other way round. Sizes are measured with ``qemu-img map`` just before each
    compaction step runs (through the compaction progress reporter, for deletes).

A failing case prints as a list of operations; an operation that picks a checkpoint (``pick`` is
an index, modulo their number, into the live checkpoints, oldest first) is skipped while there is
none. Each example is a fresh Waymark home, so shrinking a failure can take a few minutes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.helpers import content_sha256, qemu_io_write, query
from waymark.config import Settings
from waymark.engine import consolidation
from waymark.errors import Ambiguous, NotFound
from waymark.usecases import views
from waymark.usecases.checkpoints import deletion
from waymark.usecases.checkpoints import lifecycle as checkpoints
from waymark.usecases.checkpoints.lifecycle import ApplyMode
from waymark.usecases.vms import chains
from waymark.usecases.vms import definitions as vms
from waymark.wiring import open_context

MIB = 1 << 20
CLUSTER = 64 * 1024  # qcow2's default cluster size: every write is cluster-aligned
VM = "prop"
NAMES = ("Exp-1", "Exp-2", "keep-3", "Exp*")  # a name like a pattern: the exact name wins
PATTERNS = ("Exp*", "*-2", "keep-?")
MERGES = ("commit_down", "pull_up")
COMPACTION = ("drop", *MERGES)
SLACK = CLUSTER  # Waymark measures st_blocks (metadata included): allow one cluster
MIN_STEPS, MAX_STEPS = 6, 12

settings.register_profile(
    "ci", deadline=None, derandomize=True, max_examples=60, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# -- the operations (their reprs are what Hypothesis prints for a failing sequence) ----------

@dataclass(frozen=True)
class Write:
    cluster: int  # first cluster (modulo the disk's cluster count)
    clusters: int  # 1 to 16 clusters: 64 KiB to 1 MiB, cut at the end of the disk
    pattern: int


@dataclass(frozen=True)
class Create:
    name: str


@dataclass(frozen=True)
class Apply:
    pick: int
    checkpoint_first: bool


@dataclass(frozen=True)
class Delete:
    pick: int


@dataclass(frozen=True)
class DeleteSubtree:
    pick: int


@dataclass(frozen=True)
class DeleteMatching:
    pattern: str


@dataclass(frozen=True)
class Rename:
    pick: int
    name: str


@dataclass(frozen=True)
class Consolidate:
    pass


Op = Write | Create | Apply | Delete | DeleteSubtree | DeleteMatching | Rename | Consolidate

_pick = st.integers(0, 15)
_names = st.sampled_from(NAMES)
BUILD: dict[str, st.SearchStrategy[Op]] = {
    "write": st.builds(Write, st.integers(0, 63), st.integers(1, 16), st.integers(1, 255)),
    "create": st.builds(Create, _names),
    "apply": st.builds(Apply, _pick, st.booleans()),
    "delete": st.builds(Delete, _pick),
    "subtree": st.builds(DeleteSubtree, _pick),
    "matching": st.builds(DeleteMatching, st.sampled_from(PATTERNS)),
    "rename": st.builds(Rename, _pick, _names),
    "consolidate": st.builds(Consolidate),
}
# the kind first, weighted by repetition: 4 writes : 3 creates : 2 applies : 2 consolidations :
# 1 of each other
KINDS = ["write"] * 4 + ["create"] * 3 + ["apply"] * 2 + ["consolidate"] * 2 + [
    "delete", "subtree", "matching", "rename"]
OPS = st.sampled_from(KINDS).flatmap(BUILD.__getitem__)


# -- reading the real state ------------------------------------------------------------------

def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


def data_bytes(path: Path) -> int:
    """Bytes of data the qcow2 file itself holds (its backing chain excluded)."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"] and e["depth"] == 0)


def backing_of(path: str) -> str | None:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", path],
                         check=True, capture_output=True, text=True).stdout
    info = json.loads(out)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    return str(backing) if backing else None


class Model:
    """One VM with one disk, driven through ``waymark.usecases``, next to a model of it."""

    def __init__(self, home: Path, mib: int) -> None:
        self.home = home
        self.ctx = open_context(Settings(home=home))
        self.vm_id = vms.create(self.ctx, VM, memory=256 * MIB, cpus=1,
                                disks=[vms.DiskSpec(size=mib * MIB)], max_checkpoints=1000)
        self.disks_dir = home / "vms" / self.vm_id / "disks"
        self.now = bytearray(mib * MIB)
        self.content: dict[str, bytes] = {}  # checkpoint id -> bytes when taken (oldest first)
        self.parents: dict[str, str | None] = {}
        self.names: dict[str, str] = {}
        self.current: str | None = None
        self.last_intent = 0
        self.new_intents()

    def close(self) -> None:
        self.ctx.catalog.engine.dispose()

    # -- model helpers ------------------------------------------------------------------------

    def active_path(self) -> Path:
        return Path(views.vm_show(self.ctx, self.vm_id)["disks"][0]["active_image"])

    def pick(self, index: int) -> str:
        ids = list(self.content)
        return ids[index % len(ids)]

    def record(self, ckpt_id: str, name: str) -> None:
        assert ckpt_id not in self.content
        self.content[ckpt_id] = bytes(self.now)
        self.parents[ckpt_id] = self.current
        self.names[ckpt_id] = name
        self.current = ckpt_id

    def forget(self, doomed: set[str]) -> None:
        """The model of deleting ``doomed``: survivors and Now move to the nearest survivor."""

        def survivor(ckpt: str | None) -> str | None:
            while ckpt is not None and ckpt in doomed:
                ckpt = self.parents[ckpt]
            return ckpt

        for ckpt in list(self.content):
            if ckpt not in doomed:
                self.parents[ckpt] = survivor(self.parents[ckpt])
        self.current = survivor(self.current)
        for ckpt in doomed:
            del self.content[ckpt], self.parents[ckpt], self.names[ckpt]

    def subtree(self, root: str) -> set[str]:
        found, todo = set(), [root]
        while todo:
            ckpt = todo.pop()
            found.add(ckpt)
            todo += [c for c, p in self.parents.items() if p == ckpt]
        return found

    def sizes(self) -> dict[str, int]:
        """image id -> its own data bytes, for every image file of the VM."""
        return {p.stem: data_bytes(p) for p in self.disks_dir.glob("*.qcow2")}

    def new_intents(self) -> list[tuple[str, dict[str, Any]]]:
        rows = query(self.home, "SELECT id, kind, params FROM intents WHERE vm_id = ? AND id > ? "
                                "ORDER BY id", self.vm_id, self.last_intent)
        if rows:
            self.last_intent = rows[-1][0]
        return [(kind, json.loads(params)) for _, kind, params in rows]

    def check_merges(self, before: dict[int, dict[str, int]], fallback: dict[str, int]) -> None:
        """(d): each merge copied the side with fewer data bytes.

        ``before[k]``: sizes measured just before compaction step k ran. Without it, sizes
        measured before the whole operation (``fallback``) are used for the images no earlier
        merge of the same operation rewrote.
        """
        steps = [(kind, params) for kind, params in self.new_intents() if kind in COMPACTION]
        rewritten: set[str] = set()
        for number, (kind, params) in enumerate(steps, start=1):
            if kind not in MERGES:
                continue
            image, child = params["image"], params["child"]
            sizes = before.get(number)
            if sizes is None:
                if {image, child} & rewritten or not {image, child} <= set(fallback):
                    rewritten |= {image, child}
                    continue
                sizes = fallback
            rewritten |= {image, child}
            parent_bytes, child_bytes = sizes[image], sizes[child]
            copied, other = ((child_bytes, parent_bytes) if kind == "commit_down"
                             else (parent_bytes, child_bytes))
            event(f"merge checked: {kind} ({'per step' if before else 'before the apply'})")
            assert copied <= other * 1.1 + SLACK, (
                f"{kind} of {image} (parent, {parent_bytes} data bytes) and {child} (child, "
                f"{child_bytes} data bytes) copied {copied} bytes where the other side holds "
                f"{other}")

    # -- operations ---------------------------------------------------------------------------

    def run(self, op: Op) -> None:
        if isinstance(op, Write):
            self.write(op)
        elif isinstance(op, Create):
            self.record(checkpoints.create(self.ctx, self.vm_id, op.name), op.name)
            self.new_intents()
        elif isinstance(op, DeleteMatching):
            self.delete_matching(op.pattern)
        elif isinstance(op, Consolidate):
            self.consolidate()
        elif not self.content:
            event("skipped: no checkpoint to pick")
        elif isinstance(op, Apply):
            self.apply(self.pick(op.pick), op.checkpoint_first)
        elif isinstance(op, Delete):
            target = self.pick(op.pick)
            assert self.delete(target, subtree=False) == {target}
            self.forget({target})
        elif isinstance(op, DeleteSubtree):
            doomed = self.subtree(self.pick(op.pick))
            assert self.delete(self.pick(op.pick), subtree=True) == doomed
            self.forget(doomed)
        else:
            target = self.pick(op.pick)
            assert checkpoints.rename(self.ctx, self.vm_id, target, op.name).id == target
            self.names[target] = op.name

    def write(self, op: Write) -> None:
        total = len(self.now) // CLUSTER
        offset = (op.cluster % total) * CLUSTER
        length = min(op.clusters * CLUSTER, len(self.now) - offset)
        qemu_io_write(self.active_path(), "qcow2", offset, length, op.pattern)
        self.now[offset:offset + length] = bytes([op.pattern]) * length

    def apply(self, target: str, checkpoint_first: bool) -> None:
        before = self.sizes()
        mode = ApplyMode.CHECKPOINT_FIRST if checkpoint_first else ApplyMode.DISCARD_CURRENT
        result = checkpoints.apply(self.ctx, self.vm_id, target, mode)
        assert result.checkpoint_id == target
        if checkpoint_first:
            safety = result.safety_checkpoint_id
            assert safety is not None
            self.record(safety, views.checkpoint_show(self.ctx, self.vm_id, safety)["name"])
        else:
            assert result.safety_checkpoint_id is None
        self.now = bytearray(self.content[target])
        self.current = target
        self.check_merges({}, before)

    def consolidate(self) -> None:
        done = chains.consolidate(self.ctx, self.vm_id)
        event(f"consolidation: {done[0]['action'] if done else 'no disk'}")
        chain = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json",
                                str(self.active_path())], check=True, capture_output=True,
                               text=True).stdout
        layers = len(json.loads(chain))
        assert layers <= 2 or done[0]["action"] == "skipped", f"{done}: {layers} layers"  # (e)

    def delete(self, ref: str, *, subtree: bool) -> set[str]:
        measured: dict[int, dict[str, int]] = {}

        def report(number: int, _total: int, _what: str, _fraction: float,
                   size: int | None = None) -> None:
            if number not in measured:  # first called (0.0) before step ``number`` is journaled
                measured[number] = self.sizes()

        done = deletion.delete_checkpoints(self.ctx, self.vm_id, ref, subtree=subtree, yes=True,
                                           user="tests", report=report)
        self.check_merges(measured, {})
        return {m.id for m in done.checkpoints}

    def delete_matching(self, pattern: str) -> None:
        exact = {c for c, name in self.names.items() if name == pattern}  # wins over the glob
        if len(exact) > 1:
            with pytest.raises(Ambiguous):
                deletion.delete_checkpoints(self.ctx, self.vm_id, pattern, subtree=False, yes=True,
                                           user="tests")
            return
        doomed = exact or {c for c, name in self.names.items()
                           if fnmatch.fnmatchcase(name, pattern)}
        if not doomed:
            with pytest.raises(NotFound):
                deletion.delete_checkpoints(self.ctx, self.vm_id, pattern, subtree=False, yes=True,
                                           user="tests")
            return
        assert self.delete(pattern, subtree=False) == doomed
        self.forget(doomed)

    # -- invariants ---------------------------------------------------------------------------

    def check(self) -> None:
        self.check_tree()
        self.check_contents()
        self.check_images()

    def check_tree(self) -> None:
        listing = views.checkpoint_list(self.ctx, self.vm_id)
        assert {c["id"]: c["parent_id"] for c in listing["checkpoints"]} == self.parents
        assert {c["id"]: c["name"] for c in listing["checkpoints"]} == self.names
        assert listing["current_checkpoint_id"] == self.current
        pending = query(self.home, "SELECT id, kind FROM intents WHERE status = 'pending'")
        assert pending == [], f"intents left pending: {pending}"

    def check_contents(self) -> None:
        hashes: dict[str, str] = {}  # path -> content sha256 (checkpoints may share a file)
        for ckpt, expected in self.content.items():
            disks = views.checkpoint_show(self.ctx, self.vm_id, ckpt)["disks"]
            assert len(disks) == 1
            path = disks[0]["frozen_image"]
            if path not in hashes:
                hashes[path] = content_sha256(path)
            assert hashes[path] == sha(expected), \
                f"checkpoint {ckpt} ({self.names[ckpt]}) changed content"  # (a)
        assert content_sha256(self.active_path()) == sha(self.now), "Now changed content"  # (b)

    def check_images(self) -> None:  # (c)
        rows = query(self.home, "SELECT id, path, parent_id, pinned FROM images WHERE vm_id = ?",
                     self.vm_id)
        paths = {image_id: path for image_id, path, _, _ in rows}
        owned = {path for _, path, _, pinned in rows if not pinned}
        linked = dict(query(self.home, "SELECT i.id, c.path FROM consolidations c JOIN disks d "
                                       "ON d.id = c.disk_id JOIN images i ON i.id = "
                                       "d.active_image_id WHERE c.linked AND c.vm_id = ?",
                            self.vm_id))
        owned |= {p for (p,) in query(self.home, "SELECT path FROM consolidations")}  # (e)
        on_disk = {str(p) for p in self.disks_dir.iterdir()}
        assert on_disk == owned, \
            f"stray files {on_disk - owned}, catalog files missing {owned - on_disk}"
        active = {i for (i,) in query(self.home, "SELECT active_image_id FROM disks "
                                                 "WHERE vm_id = ?", self.vm_id)}
        frozen = {i for (i,) in query(self.home, "SELECT image_id FROM frozen_images")}
        children: dict[str, int] = {}
        for _, _, parent, _ in rows:
            if parent is not None:
                children[parent] = children.get(parent, 0) + 1
        for image_id, path, parent, pinned in rows:
            needed = pinned or image_id in active | frozen or children.get(image_id, 0) >= 2
            assert needed, f"image {path} is neither active, frozen, pinned nor shared"
            expected = linked.get(image_id) or (paths[parent] if parent is not None else None)
            assert backing_of(path) == expected, f"{path}: backing file is not its catalog parent"


@settings(parent=settings.get_profile("ci"))
@given(mib=st.integers(1, 4), ops=st.lists(OPS, min_size=MIN_STEPS, max_size=MAX_STEPS))
def test_random_operations_keep_every_invariant(tmp_path: Path, mib: int, ops: list[Op]) -> None:
    depth, consolidation.DEPTH = consolidation.DEPTH, 0  # (e): every one does something
    home = Path(tempfile.mkdtemp(prefix="home-", dir=tmp_path))
    model = Model(home, mib)
    try:
        model.check()
        for op in ops:
            model.run(op)
            model.check()
        event(f"checkpoints left: {len(model.content)}")
    finally:
        consolidation.DEPTH = depth
        model.close()
        shutil.rmtree(home, ignore_errors=True)


# -- lines of layers: deletes that leave multi-layer runs ------------------------------------

@dataclass(frozen=True)
class Layer:
    """One checkpoint of a line: what is written before it, and whether the delete takes it."""

    write: Write
    doomed: bool


LINES = st.lists(st.builds(Layer, BUILD["write"], st.booleans()),
                 min_size=3, max_size=10)


def runs_of(layers: list[Layer]) -> int:
    """The runs of consecutive doomed checkpoints on the line (each a run of loose layers)."""
    return sum(1 for i, layer in enumerate(layers)
               if layer.doomed and (i == 0 or not layers[i - 1].doomed))


@settings(parent=settings.get_profile("ci"), max_examples=15)
@given(mib=st.integers(1, 2), layers=LINES, last=BUILD["write"], subtree=_pick)
def test_deletes_of_runs_of_layers_keep_every_checkpoint_exact(
        tmp_path: Path, mib: int, layers: list[Layer], last: Op, subtree: int) -> None:
    """A line of checkpoints c0 <- c1 <- ... <- Now, each layer with its own random write (so
    the largest file of a run, into which the run merges, falls anywhere in it); one delete by
    pattern takes every doomed one, leaving runs of several loose layers, each merged by at
    most two merges (a pull-up into its largest file, a commit into it) and two drops, whatever
    its length; then a subtree delete. Every invariant of the model holds after each."""
    home = Path(tempfile.mkdtemp(prefix="home-", dir=tmp_path))
    model = Model(home, mib)
    try:
        for number, layer in enumerate(layers):
            model.run(layer.write)
            model.run(Create(f"{'x' if layer.doomed else 'keep'}-{number}"))
        model.run(last)
        model.check()
        model.run(DeleteMatching("x-*"))
        model.check()
        merges = [kind for kind, _ in query(home, "SELECT kind, params FROM intents WHERE "
                                                  "kind IN ('commit_down', 'pull_up', 'drop')")]
        runs = runs_of(layers)
        assert len([k for k in merges if k != "drop"]) <= 2 * runs, (runs, merges)
        assert len([k for k in merges if k == "drop"]) <= 2 * runs, (runs, merges)
        event(f"runs: {runs}, merges: {len(merges)}")
        model.run(DeleteSubtree(subtree))
        model.check()
    finally:
        model.close()
        shutil.rmtree(home, ignore_errors=True)
