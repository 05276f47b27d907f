"""Fault injection for ``checkpoint delete`` and the compaction it starts.

``WAYMARK_FAILPOINT=N`` SIGKILLs waymark just before its N-th journal point (each step of each
intent, and each intent's commit). The sweep counts the points of one delete from the intents it
journals, then kills a fresh copy of the same starting state at every point and checks that the
next command finishes the work: the deleted checkpoints are gone, every other checkpoint and Now
keep their exact content, no intent stays pending, no file is stray or missing, and
``waymark check`` is clean. A second test kills waymark while ``qemu-img commit`` runs.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import (
    Waymark,
    active_image_of,
    content_sha256,
    qemu_io_write,
    query,
    vm_id_named,
)

KIB, MIB = 1 << 10, 1 << 20
VM = "faulty"


def frozen_paths(home: Path) -> dict[str, str]:
    rows = query(home, "SELECT f.checkpoint_id, i.path FROM frozen_images f "
                       "JOIN images i ON i.id = f.image_id")
    return {ckpt: path for ckpt, path in rows}


def write(wm: Waymark, offset: int, length: int, pattern: int) -> None:
    qemu_io_write(Path(active_image_of(wm.home, VM)), "qcow2", offset, length, pattern)


def checkpoint(wm: Waymark, name: str, expected: dict[str, str]) -> str:
    data = wm.json("checkpoint", "create", VM, "--name", name)
    expected[data["id"]] = content_sha256(data["disks"][0]["frozen_image"])
    return str(data["id"])


def assert_recovered(wm: Waymark, expected: dict[str, str], parents: dict[str, str | None],
                     current: str, now: str, label: str) -> None:
    """The state after the delete, once the next command (which recovers) has run."""
    listing = wm.json("checkpoint", "list", VM)
    assert {c["id"]: c["parent_id"] for c in listing["checkpoints"]} == parents, label
    assert listing["current_checkpoint_id"] == current, label
    frozen = frozen_paths(wm.home)
    assert set(frozen) == set(parents), label
    for ckpt, path in frozen.items():
        assert content_sha256(path) == expected[ckpt], f"{label}: checkpoint {ckpt} changed"
    assert content_sha256(active_image_of(wm.home, VM)) == now, f"{label}: Now's disk changed"
    assert query(wm.home, "SELECT kind, next_step FROM intents WHERE status = 'pending'") == [], \
        label
    home, vid = wm.home, vm_id_named(wm.home, VM)
    owned = {p for (p,) in query(home, "SELECT path FROM images WHERE vm_id = ? AND pinned = 0",
                                 vid)}
    files = {str(p) for p in (home / "vms" / vid / "disks").iterdir()}
    assert files == owned, f"{label}: stray {files - owned}, missing {owned - files}"
    configs = {p.name for p in (home / "vms" / vid / "checkpoints").iterdir()}
    assert configs == {f"{c}.json" for c in parents}, label
    check = wm.run("check", "--json")
    assert check.returncode == 0, f"{label}: waymark check found {check.stdout}"
    assert check.json()["findings"] == [], label


def test_delete_survives_a_kill_at_every_journal_point(wm: Waymark, tmp_path: Path) -> None:
    # A <- Exp1 <- Exp2 <- B <- B2, and Exp1 <- Exp3 <- Now: deleting 'Exp*' leaves a shared
    # image (Exp1's), a commit down with a rebase of a grandchild (Exp2's image takes B's
    # role, B2's image is relinked), a pull up (Now's big image swallows Exp3's) and drops.
    expected: dict[str, str] = {}
    wm("vm", "create", VM, "--disk", "4M")
    write(wm, 0, 64 * KIB, 0x01)
    a = checkpoint(wm, "A", expected)
    write(wm, 64 * KIB, 128 * KIB, 0x02)
    exp1 = checkpoint(wm, "Exp1", expected)
    write(wm, 256 * KIB, 128 * KIB, 0x03)
    exp2 = checkpoint(wm, "Exp2", expected)
    write(wm, 512 * KIB, 64 * KIB, 0x04)
    b = checkpoint(wm, "B", expected)
    write(wm, 768 * KIB, 64 * KIB, 0x05)
    b2 = checkpoint(wm, "B2", expected)
    wm("checkpoint", "apply", VM, "Exp1", "--discard-current")
    write(wm, MIB, 64 * KIB, 0x06)
    exp3 = checkpoint(wm, "Exp3", expected)
    write(wm, 2 * MIB, 192 * KIB, 0x07)
    write(wm, 64 * KIB, 64 * KIB, 0x08)
    now = content_sha256(active_image_of(wm.home, VM))
    doomed = {exp1, exp2, exp3}
    parents: dict[str, str | None] = {a: None, b: a, b2: b}
    rows = sweep(wm, tmp_path, ["checkpoint", "delete", VM, "Exp*", "--yes"], doomed,
                 Expected(expected, parents, a, now), least=10)
    kinds = [kind for kind, _ in rows]
    assert {"checkpoint_files_delete", "commit_down", "pull_up", "drop"} <= set(kinds), kinds


@dataclass(frozen=True)
class Expected:
    """What must hold once a delete (killed or not) is finished: every kept checkpoint's
    content, the tree (id -> parent), the current checkpoint and Now's content."""

    content: dict[str, str]
    parents: dict[str, str | None]
    current: str
    now: str

    def hold(self, wm: Waymark, label: str) -> None:
        assert_recovered(wm, self.content, self.parents, self.current, self.now, label)


def sweep(wm: Waymark, tmp_path: Path, argv: list[str], doomed: set[str], expected: Expected,
          least: int) -> list[tuple[str, str]]:
    """Run the delete ``argv`` once to count its journal points, then kill a fresh copy of the
    starting state at every one of them and check that the next command finishes the work;
    returns the (kind, steps) of the intents the reference run journaled (at least ``least``
    journal points)."""
    saved = tmp_path / "saved"
    shutil.copytree(wm.home, saved)

    def restore() -> None:
        shutil.rmtree(wm.home)
        shutil.copytree(saved, wm.home)  # the same path: image paths are absolute

    # the reference run: count the journal points the delete goes through
    ((last_intent,),) = query(wm.home, "SELECT max(id) FROM intents")
    done = wm.run(*argv, "--json", timeout=60).ok()
    assert {d["id"] for d in done.json()["deleted"]} == doomed
    rows = query(wm.home, "SELECT kind, steps FROM intents WHERE id > ?", last_intent)
    points = sum(len(sqlite_json(steps)) + 1 for kind, steps in rows if kind != "compact")
    assert points >= least, rows  # several merges, each a few points
    expected.hold(wm, "reference run")
    files_after = len(list((wm.home / "vms" / vm_id_named(wm.home, VM) / "disks").iterdir()))

    for n in itertools.count():
        restore()
        killed = wm.run(*argv, env=wm.env(WAYMARK_FAILPOINT=str(n)), timeout=60)
        if killed.returncode == 0:
            break
        label = f"killed at journal point {n}"
        assert killed.returncode == -signal.SIGKILL, f"{label}: {killed.stderr}"
        assert n < points, f"{label}: the delete has more journal points than it journals"
        # the tree changed in one transaction before any file step
        left = {c for (c,) in query(wm.home, "SELECT id FROM checkpoints")}
        assert left == set(expected.parents), label
        assert query(wm.home, "SELECT count(*) FROM intents WHERE status = 'pending' "
                              "AND kind = 'compact'") == [(1,)], label
        expected.hold(wm, label)
        disks = wm.home / "vms" / vm_id_named(wm.home, VM) / "disks"
        assert len(list(disks.iterdir())) == files_after
    assert n == points, f"the delete exited 0 after {n} kill points, its journal counts {points}"
    expected.hold(wm, f"failpoint {n} not reached")
    return [(str(kind), str(steps)) for kind, steps in rows]


def test_multi_layer_merges_survive_a_kill_at_every_journal_point(wm: Waymark,
                                                                  tmp_path: Path) -> None:
    """A <- x1 <- x2 <- x3 <- B <- x4 <- x5 <- x6 <- Now, x1's and x5's layers the large ones:
    deleting 'x*' commits B's layer with x3's and x2's into x1's in one ``qemu-img commit -b``
    (B's role moves there, x4's layer is relinked), pulls x4's layer up into x5's, then commits
    Now's layer with x6's into x5's (Now's role moves there, with its bitmaps); each emptied
    line of files goes in one drop."""
    expected: dict[str, str] = {}
    wm("vm", "create", VM, "--disk", "4M")
    write(wm, 0, 64 * KIB, 0x01)
    a = checkpoint(wm, "A", expected)
    layers: dict[str, str] = {}
    for number, (name, size) in enumerate([("x1", 512), ("x2", 64), ("x3", 64), ("B", 64),
                                           ("x4", 64), ("x5", 512), ("x6", 64)]):
        write(wm, number * 256 * KIB + 64 * KIB, size * KIB, 0x10 + number)
        layers[name] = checkpoint(wm, name, expected)
    write(wm, 3 * MIB + 64 * KIB, 64 * KIB, 0x20)
    write(wm, 128 * KIB, 64 * KIB, 0x21)  # over x1's data: Now's own clusters win
    now = content_sha256(active_image_of(wm.home, VM))
    b = layers["B"]
    doomed = {c for name, c in layers.items() if name != "B"}

    rows = sweep(wm, tmp_path, ["checkpoint", "delete", VM, "x*", "--yes"], doomed,
                 Expected(expected, {a: None, b: a}, b, now), least=12)
    merges = [(kind, sqlite_json(steps)) for kind, steps in rows
              if kind in ("commit_down", "pull_up", "drop")]
    assert sorted(kind for kind, _ in merges) == ["commit_down", "commit_down", "drop", "drop",
                                                  "drop", "pull_up"], merges
    commits = [step for _, steps in merges for step in steps if step["op"] == "commit"]
    assert len(commits) == 2, merges  # one qemu-img commit a run, not one a layer
    removed = [len(step.get("targets", [step.get("path")])) for _, steps in merges
               for step in steps if step["op"] in ("delete_file", "delete_files")]
    assert sorted(removed) == [1, 2, 3], merges  # x4's; Now's and x6's; B's, x3's and x2's


def sqlite_json(text: str) -> list[Any]:
    value = json.loads(text)
    assert isinstance(value, list)
    return value


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) != pid or fields[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        found.append((int(entry.name), cmdline))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_kill_during_a_long_qemu_img_commit(wm: Waymark, tmp_path: Path) -> None:
    """U (136 MiB, frozen by C) <- K (120 MiB elsewhere, active): deleting C commits K into U.

    waymark is killed while ``qemu-img commit`` is part-way (the commit is paused with SIGSTOP
    once U has grown, so the moment does not depend on disk speed); the qemu-img child must die
    with it, and the next command must finish the merge with no data lost.
    """
    try:
        expected: dict[str, str] = {}
        wm("vm", "create", VM, "--disk", "256M")
        write(wm, 0, 64 * KIB, 0x0A)
        a = checkpoint(wm, "A", expected)
        write(wm, 0, 136 * MIB, 0x0B)
        c = checkpoint(wm, "C", expected)
        u = frozen_paths(wm.home)[c]
        write(wm, 136 * MIB, 120 * MIB, 0x0C)
        k = active_image_of(wm.home, VM)
        now = content_sha256(k)
        u_size = Path(u).stat().st_size

        log = (tmp_path / "delete.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "waymark", "checkpoint", "delete", VM,
                                 "C"], env=wm.env(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log)
        try:
            qemu = _catch_commit(proc, Path(u), u_size)
        finally:
            proc.kill()
        assert proc.wait(timeout=10) == -signal.SIGKILL
        log.close()
        deadline = time.monotonic() + 2
        while _alive(qemu) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(qemu), "qemu-img outlived the waymark that started it"
        grown = Path(u).stat().st_size - u_size
        assert 0 < grown < 120 * MIB, f"the commit was not part-way ({grown} bytes)"
        assert query(wm.home, "SELECT kind FROM intents WHERE status = 'pending' "
                              "ORDER BY id") == [("compact",), ("commit_down",)]

        assert_recovered(wm, expected, {a: None}, a, now, "after the kill during a commit")
        assert active_image_of(wm.home, VM) == u  # the merged file took K's role
        assert not Path(k).exists()
    finally:
        shutil.rmtree(wm.home, ignore_errors=True)  # 256 MiB of data: not left in /tmp


def _catch_commit(proc: subprocess.Popen[bytes], u: Path, u_size: int) -> int:
    """Wait for waymark's ``qemu-img commit`` child, and pause it once it has written into U."""
    deadline = time.monotonic() + 60
    qemu = None
    while qemu is None:
        assert proc.poll() is None, "waymark ended before its qemu-img commit was seen"
        assert time.monotonic() < deadline, "no qemu-img commit started"
        qemu = next((p for p, cmd in _children(proc.pid) if "qemu-img" in cmd and
                     " commit " in cmd), None)
    os.kill(qemu, signal.SIGSTOP)
    while u.stat().st_size < u_size + 4 * MIB:
        assert _alive(qemu), "qemu-img commit finished before it could be paused"
        assert time.monotonic() < deadline, "qemu-img commit made no progress"
        os.kill(qemu, signal.SIGCONT)
        time.sleep(0.002)
        os.kill(qemu, signal.SIGSTOP)
    return qemu
