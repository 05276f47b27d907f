"""Incremental backups of a running guest under real QEMU (TCG here), driven only through the CLI.

One VM of the test guest, ``g`` (with its agent), boots once for the module and is carried
through the tests in file order; each test first puts it in the state it needs (running, its
agent answering, an empty ``/data/t``), so any single test also runs alone.

The guest writes files only when a test tells it to, through its agent: ``dd`` of random 64 KiB
blocks into ``/data/t/<name>`` (a new file, or blocks of an existing one overwritten in place),
``sync``, and ``sha256sum`` of the file. Right before each backup the guest hashes every file of
``/data/t`` again, and those hashes (which must match the test's own record) are what the point
must hold. A point is read back with stock tools: its disk file flattened with ``qemu-img
convert`` (which follows an incremental's backing files inside the repository), ``e2fsck`` of
the copy, then ``debugfs`` lists and reads ``/t``. The guest's own ``/data/log.txt`` changes all
the time and is not compared.

What an incremental point must be (:mod:`waymark.usecases.backups.points`): ``kind`` incremental,
``parent``
the repository's previous point of the VM, its disk file backed by the parent's
(``<parent id>.qcow2``), holding no more than the dirty bitmap said QEMU would copy
(``dirty_bytes``), which covers at least what the test wrote since the parent.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest

from tests.guest.guests import Guest, agent_exec, create, flatten, gone, wait_for
from tests.helpers import Waymark, own_bytes

BLOCK = 64 << 10  # dd's block: one cluster of the disk and of the bitmap
DATA = "/data/t"  # the test's files in the guest; ``/t`` on the data disk itself
Files = dict[str, str]  # file name in DATA -> sha256


@pytest.fixture(scope="module")
def vm(home: Waymark, image: dict[str, str]) -> Guest:
    """The guest with its agent (256 MiB; automatic checkpoints off, the default)."""
    return create(home, "g", image)


@pytest.fixture(scope="module")
def repo(home: Waymark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return new_repo(home, tmp_path_factory.mktemp("backups") / "repo")


def new_repo(wm: Waymark, path: Path) -> Path:
    wm("backup", "repo", "init", str(path))
    return path


# --- the guest's files, through its agent ------------------------------------------------------

def sh(vm: Guest, script: str) -> str:
    """A shell script in the guest; its output."""
    return agent_exec(vm, "/bin/sh", "-c", script, timeout=60.0)


def ready(vm: Guest) -> Files:
    """Running, its agent answering, DATA empty; the (no) files the test wrote."""
    vm.ensure_running()
    sh(vm, f"rm -rf {DATA} && mkdir {DATA} && sync")
    assert guest_files(vm) == {}
    return {}


def write(vm: Guest, files: Files, name: str, blocks: int, at: int | None = None) -> int:
    """``blocks`` random blocks into ``name`` (a new file; or, with ``at``, over the file's
    blocks from block ``at`` on), synced; ``files`` updated with its new hash. The bytes."""
    place = "" if at is None else f" seek={at} conv=notrunc"
    path = f"{DATA}/{name}"
    out = sh(vm, f"dd if=/dev/urandom of={path} bs={BLOCK} count={blocks}{place} 2>/dev/null"
                 f" && sync && sha256sum {path}")
    digest, _, named = out.strip().partition("  ")
    assert named == path and len(digest) == 64, out
    files[name] = digest
    return blocks * BLOCK


def guest_files(vm: Guest) -> Files:
    """Every file in DATA as the running guest reads it."""
    out = sh(vm, f'cd {DATA} && for f in *; do [ -f "$f" ] && sha256sum "$f"; done; true')
    found = {}
    for line in out.splitlines():
        digest, _, name = line.partition("  ")
        found[name] = digest
    return found


# --- a point, read back offline ----------------------------------------------------------------

def disk_files(raw: Path) -> Files:
    """Every file in ``/t`` of a flattened copy of the data disk (its journal replayed first:
    e2fsck changes the copy only)."""
    fsck = subprocess.run(["e2fsck", "-fy", str(raw)], capture_output=True, text=True,
                          check=False)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr
    listing = subprocess.run(["debugfs", "-R", "ls -p /t", str(raw)], capture_output=True,
                             text=True, check=True).stdout
    found = {}
    for line in listing.splitlines():  # /inode/mode/uid/gid/name/size/
        fields = line.strip().strip("/").split("/")
        if len(fields) >= 5 and fields[1].startswith("10"):  # a regular file
            data = subprocess.run(["debugfs", "-R", f"cat /t/{fields[4]}", str(raw)],
                                  capture_output=True, check=True).stdout
            found[fields[4]] = sha256(data).hexdigest()
    return found


def qemu_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)], check=True,
                         capture_output=True, text=True).stdout
    info: dict[str, Any] = json.loads(out)
    return info


@dataclass
class Chain:
    """The points a test takes into one repository, each with the files the guest held when it
    was taken; ``written`` counts the bytes the test wrote since the newest one, ``miscounted``
    the incrementals whose ``dirty_bytes`` was wrong."""

    repo: Path
    points: list[tuple[dict[str, Any], Files]] = field(default_factory=list)
    written: int = 0
    miscounted: list[str] = field(default_factory=list)

    def write(self, vm: Guest, files: Files, name: str, blocks: int, at: int | None = None
              ) -> None:
        self.written += write(vm, files, name, blocks, at)

    def backup(self, vm: Guest, files: Files, kind: str | None, reason: str = "") -> dict[str, Any]:
        """``backup run``, which must succeed with a point of ``kind`` (None: either, for a
        test's first point, which follows what came before it) whose reason names ``reason``
        (a full point's); the point's manifest. An incremental point is checked against the
        test's previous point (see the module's docstring)."""
        held = guest_files(vm)
        assert held == files, "the guest's files are not what the test wrote"
        (row,) = vm.wm.json("backup", "run", vm.name, "--repo", str(self.repo))
        assert row["ok"] and row["vm"] == vm.name and row["error"] is None, row
        point = row["point"]
        manifest: dict[str, Any] = json.loads(
            (self.repo / "vms" / vm.id / "points" / f"{point['id']}.json").read_text())
        assert [manifest[k] for k in ("id", "kind", "parent", "reason")] == \
            [point[k] for k in ("id", "kind", "parent_id", "reason")], (point, manifest)
        (disk,) = manifest["disks"]
        previous = self.points[-1][0] if self.points else None
        if kind is not None:
            assert point["kind"] == kind, point
        if point["kind"] == "full":
            assert point["parent_id"] is None and "dirty_bytes" not in disk, manifest
            assert reason in point["reason"], point
            assert qemu_info(self.repo / disk["file"]).get("backing-filename") is None
            print(f"full point {point['id']}: {point['reason']}")
        else:
            assert point["reason"] == f"the changes since point {point['parent_id']}", point
            if previous is not None:
                self._check_incremental(manifest, previous)
        self.points.append((manifest, dict(files)))
        self.written = 0
        return manifest

    def _check_incremental(self, manifest: dict[str, Any], previous: dict[str, Any]) -> None:
        assert manifest["parent"] == previous["id"], (manifest["parent"], previous["id"])
        (disk,), (below,) = manifest["disks"], previous["disks"]
        path = self.repo / disk["file"]
        backing = qemu_info(path).get("backing-filename")
        assert backing == f"{previous['id']}.qcow2" == Path(below["file"]).name, backing
        assert path.parent == (self.repo / below["file"]).parent
        own, dirty = own_bytes(path), disk["dirty_bytes"]
        print(f"incremental point {manifest['id']}: the test wrote {self.written >> 10} KiB, "
              f"the bitmap marked {dirty >> 10} KiB, the file holds {own >> 10} KiB")
        assert own < disk["virtual_size"] // 4, "an incremental copied most of the disk"
        if not own <= 1.1 * dirty or not dirty >= self.written:  # asserted by finish()
            self.miscounted.append(f"point {manifest['id']}: the file holds {own} bytes, the "
                                   f"test wrote {self.written}, dirty_bytes says {dirty}")

    def finish(self, tmp: Path) -> None:
        """Every point, flattened with stock qemu-img, holds exactly the files recorded for it
        (and none written later); then every incremental's ``dirty_bytes`` covered both what
        the test wrote and what its file holds (checked last, so that a miscount does not hide
        what the points hold)."""
        for manifest, files in self.points:
            (disk,) = manifest["disks"]
            raw = flatten(str(self.repo / disk["file"]), tmp / f"{manifest['id']}.raw")
            try:
                assert disk_files(raw) == files, f"point {manifest['id']} ({manifest['kind']})"
            finally:
                raw.unlink()
        assert self.miscounted == [], "\n".join(self.miscounted)


def assert_clean(wm: Waymark, repo: Path) -> None:
    checked = wm.run("check", "--json")
    assert checked.returncode == 0 and checked.json()["clean"], checked.stdout + checked.stderr
    rows = wm.json("backup", "verify", "--repo", str(repo))
    assert rows and all(r["problems"] == [] for r in rows), rows


def checkpoint(vm: Guest, name: str, kind: str = "production") -> str:
    """A live checkpoint: production (the bitmaps follow in QEMU's snapshot transaction) or
    standard (after the migration into its memory state, copied by qemu-img)."""
    made = vm.wm.json("checkpoint", "create", vm.name, "--name", name, "--type", kind)
    return str(made["id"])


def delete_checkpoint(vm: Guest, ckpt: str) -> None:
    vm.wm.run("checkpoint", "delete", vm.name, ckpt, "--json", timeout=300).ok()


# --- the tests, in order ------------------------------------------------------------------------

def test_incremental_points_chain_and_each_restores_exactly(vm: Guest, repo: Path,
                                                            tmp_path: Path) -> None:
    """A full point, then two incrementals each after guest writes (the second one also
    overwrites blocks of a file of the first): each incremental is backed by the previous
    point's file and holds no more than its bitmap marked; every point restores (qemu-img)
    exactly the files as they were when it was taken; the newest also through ``backup restore
    --as-new``."""
    files = ready(vm)
    chain = Chain(repo)
    chain.backup(vm, files, "full", "the first backup of this VM in this repository")

    chain.write(vm, files, "f1", 16)
    chain.write(vm, files, "f2", 4)
    chain.backup(vm, files, "incremental")

    chain.write(vm, files, "f3", 8)
    chain.write(vm, files, "f1", 2, at=3)
    newest = chain.backup(vm, files, "incremental")

    made = vm.wm.json("backup", "restore", vm.name, "--repo", str(repo), "--point",
                      newest["id"], "--as-new", "copy")
    copy = Guest(vm.wm, "copy")
    assert copy.id == made["restored_as"]["id"] != vm.id
    raw = flatten(copy.active_image(), tmp_path / "copy.raw")
    assert disk_files(raw) == files
    raw.unlink()
    vm.wm("vm", "delete", copy.name, "--yes")
    assert_clean(vm.wm, repo)
    chain.finish(tmp_path)


def test_live_checkpoint_and_its_active_commit_keep_backups_incremental(
        vm: Guest, repo: Path, tmp_path: Path) -> None:
    """A live checkpoint between two backups (the bitmap follows onto the new overlay): the next
    point is incremental. Then the checkpoint deleted live with an active commit (the overlay
    holds less than the image below it, so it is committed into it and that image becomes
    active again, its bitmap replaced by the overlay's): the next point is incremental too, and
    every point restores exactly."""
    files = ready(vm)
    chain = Chain(repo)
    chain.backup(vm, files, None)

    chain.write(vm, files, "a1", 32)  # 2 MiB into the active image: it stays the larger one
    base = vm.active_image()
    ckpt = checkpoint(vm, "incremental-1")
    overlay = vm.active_image()
    assert overlay != base
    chain.write(vm, files, "a2", 2)
    chain.backup(vm, files, "incremental")

    chain.write(vm, files, "a3", 2)
    assert own_bytes(Path(overlay)) < own_bytes(Path(base))
    delete_checkpoint(vm, ckpt)
    assert vm.active_image() == base, "the delete did not commit the active image into its base"
    assert not Path(overlay).exists()
    chain.write(vm, files, "a4", 1)
    chain.write(vm, files, "a1", 1, at=20)
    chain.backup(vm, files, "incremental")
    assert_clean(vm.wm, repo)
    chain.finish(tmp_path)


def test_memory_checkpoints_of_a_paused_vm_keep_backups_incremental(
        vm: Guest, repo: Path, tmp_path: Path) -> None:
    """Standard checkpoints of a paused VM between backups. The first migrates the memory, which
    leaves QEMU's nodes inactive (their bitmaps only in the files, copied by qemu-img); the next
    ones reuse that memory, with an inactive top (copied from its file before QEMU opens the
    overlay) and then an active one (QEMU opened it since: copied in the transaction). After
    the resume the next point is incremental and every point restores exactly."""
    files = ready(vm)
    chain = Chain(repo)
    chain.backup(vm, files, None)
    chain.write(vm, files, "p1", 4)
    vm.wm("vm", "pause", vm.name)
    for number in range(3):
        checkpoint(vm, f"paused-{number}", "standard")
    vm.wm("vm", "resume", vm.name)
    chain.write(vm, files, "p2", 4)
    chain.backup(vm, files, "incremental")
    assert_clean(vm.wm, repo)
    chain.finish(tmp_path)


def kill_and_start(vm: Guest) -> None:
    """kill -9 of the VM's QEMU, then ``vm start`` (to READY)."""
    (pid,) = vm.qemus()
    os.kill(pid, signal.SIGKILL)
    wait_for("QEMU to die", lambda: gone(pid), 10.0)
    assert vm.state() == "off"
    vm.boot()


def tracking(vm: Guest, repo: Path) -> list[dict[str, Any]]:
    """The repository's bitmaps on the node of the disk's active image, as the running QEMU
    has them."""
    bitmap = "wm-" + json.loads((repo / "waymark-repository.json").read_text())["id"][:12]
    active, path = vm.active_image(), vm.qemu_file()
    return [b for n in vm.qmp_command("query-named-block-nodes", flat=True)
            if n["drv"] == "qcow2" and path(n["file"]) == active
            for b in n.get("dirty-bitmaps", []) if b["name"] == bitmap]


def test_after_qemu_is_killed_the_next_point_is_full_then_incremental_again(
        vm: Guest, repo: Path, tmp_path: Path) -> None:
    """kill -9 of QEMU between backups, then ``vm start``, twice; each time the next point is
    full and its reason says QEMU was killed, the one after is incremental again, and files
    synced before the kill are in the full point.

    First with the bitmap saved in the image (a clean shutdown since the backup that added it;
    after it the next point is still incremental): QEMU opens it as inconsistent. Then right
    after the full point that re-added it, so it exists only in the killed QEMU's memory (QEMU
    writes a new persistent bitmap into the image when it closes it)."""
    files = ready(vm)
    chain = Chain(repo)
    chain.backup(vm, files, None)
    out = vm.wm.json("vm", "stop", vm.name)
    assert out["state"] == "off" and "shut down" in out["how"], out
    vm.boot()
    chain.write(vm, files, "k1", 4)
    chain.backup(vm, files, "incremental")
    chain.write(vm, files, "k2", 4)

    kill_and_start(vm)
    found = tracking(vm, repo)
    assert [b.get("inconsistent") for b in found] == [True], found
    chain.backup(vm, files, "full", "inconsistent")
    chain.write(vm, files, "k3", 4)
    chain.backup(vm, files, "incremental")
    chain.write(vm, files, "k4", 4)

    kill_and_start(vm)
    print(f"after the second kill, QEMU has {tracking(vm, repo)}")
    full = chain.backup(vm, files, "full")
    chain.write(vm, files, "k5", 4)
    chain.backup(vm, files, "incremental")
    assert_clean(vm.wm, repo)
    chain.finish(tmp_path)
    assert "killed" in full["reason"], f"the reason of a full point after kill -9: {full['reason']}"


# --- random sequences ----------------------------------------------------------------------------

OPS = ("write", "write", "overwrite", "backup", "backup", "checkpoint", "delete", "apply")
STEPS = 12
SEEDS = (70, 227, 255)  # each: every kind of operation, three backups or more, writes between


def plan(seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(OPS) for _ in range(STEPS)]


def possible(op: str, taken: dict[str, Files], files: Files) -> str:
    """``op``, or what stands for it when there is nothing to do it to: a checkpoint for a
    delete or an apply with no checkpoint, a new file for an overwrite with none."""
    if op in ("delete", "apply") and not taken:
        return "checkpoint"
    if op == "overwrite" and not files:
        return "write"
    return op


@pytest.mark.parametrize("seed", SEEDS)
def test_random_sequences_of_writes_checkpoints_and_backups_restore_exactly(
        vm: Guest, seed: int, tmp_path: Path) -> None:
    """``STEPS`` operations drawn with ``random.Random(seed)`` from guest writes (new files,
    blocks overwritten), live checkpoint create, live delete of one of this sequence's
    checkpoints, apply of one (the VM goes off; it is started again, its files back to what
    they were at that checkpoint) and backups into a new repository, then a last backup.
    Every point is full exactly when it must be (the first; the first after an apply, which
    leaves the disk without change tracking), every incremental is checked against its parent,
    and every point restores exactly the files the guest held when it was taken."""
    rng = random.Random(seed * 1000)
    files = ready(vm)
    chain = Chain(new_repo(vm.wm, tmp_path / "repo"))
    chain.backup(vm, files, "full", "the first backup")
    taken: dict[str, Files] = {}  # this sequence's checkpoints: the files each holds
    full: str | None = None  # why the next point must be full
    done: list[str] = []
    for step, drawn in enumerate(plan(seed)):
        op = possible(drawn, taken, files)
        if op == "write":
            chain.write(vm, files, f"r{step}", rng.randint(1, 12))
        elif op == "overwrite":
            name = rng.choice(sorted(files))
            chain.write(vm, files, name, rng.randint(1, 3), at=rng.randint(0, 4))
        elif op == "checkpoint":
            kind = rng.choice(["production", "standard"])
            taken[checkpoint(vm, f"seed {seed} step {step}", kind)] = dict(files)
        elif op == "delete":
            ckpt, active = rng.choice(sorted(taken)), vm.active_image()
            delete_checkpoint(vm, ckpt)
            del taken[ckpt]
            if vm.active_image() != active:
                op = "delete(active commit)"
        elif op == "apply":
            ckpt = rng.choice(sorted(taken))
            vm.wm.json("checkpoint", "apply", vm.name, ckpt, "--discard-current")
            assert vm.state() in ("off", "saved")
            vm.ensure_running()
            files = dict(taken[ckpt])
            chain.written = 0
            full = "change tracking"
        else:
            chain.backup(vm, files, "full" if full else "incremental", full or "")
            full = None
        done.append(op)
    chain.backup(vm, files, "full" if full else "incremental", full or "")
    print(f"seed {seed}: {' '.join(done)}; points: "
          f"{' '.join(m['kind'] for m, _ in chain.points)}")
    assert_clean(vm.wm, chain.repo)
    for ckpt in taken:
        delete_checkpoint(vm, ckpt)
    chain.finish(tmp_path)
