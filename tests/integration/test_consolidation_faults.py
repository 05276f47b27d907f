"""Fault injection for consolidation (:mod:`waymark.engine.consolidation`): SIGKILL waymark
before each journal point (``WAYMARK_FAILPOINT=N``: each step of each intent, each commit) of a
consolidation built from scratch, one advanced in place by a layer, one rebuilt after an apply
(the old file dropped), and of a checkpoint create that first unlinks Now. After each kill the
next command recovers: every checkpoint and Now keep their exact content, nothing is pending,
the disk folder holds the catalog's files and nothing else, ``waymark check`` is clean, and a
new ``vm consolidate`` reaches two hops."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
from pathlib import Path

from tests.helpers import (
    Waymark,
    active_image_of,
    content_sha256,
    qemu_io_write,
    query,
    vm_id_named,
)

KIB = 1 << 10
VM = "faulty"


def contents(home: Path) -> dict[str, str]:
    """Each checkpoint's and Now's content (checkpoint id or "now" -> sha256)."""
    rows = query(home, "SELECT f.checkpoint_id, i.path FROM frozen_images f "
                       "JOIN images i ON i.id = f.image_id")
    found = {ckpt: content_sha256(path) for ckpt, path in rows}
    found["now"] = content_sha256(active_image_of(home, VM))
    return found


def chain_length(path: str) -> int:
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
                         check=True, capture_output=True, text=True).stdout
    return len(json.loads(out))


def assert_recovered(wm: Waymark, expected: dict[str, str], label: str) -> None:
    wm("checkpoint", "list", VM)  # any command settles what the killed one left
    assert contents(wm.home) == expected, label
    assert query(wm.home, "SELECT kind FROM intents WHERE status = 'pending'") == [], label
    vid = vm_id_named(wm.home, VM)
    owned = {p for (p,) in query(wm.home, "SELECT path FROM images WHERE vm_id = ? AND "
                                          "pinned = 0", vid)}
    owned |= {p for (p,) in query(wm.home, "SELECT path FROM consolidations")}
    files = {str(p) for p in (wm.home / "vms" / vid / "disks").iterdir()}
    assert files == owned, f"{label}: stray {files - owned}, missing {owned - files}"
    check = wm.run("check", "--json")
    assert check.returncode == 0 and check.json()["findings"] == [], f"{label}: {check.stdout}"


def sweep(wm: Waymark, tmp_path: Path, args: tuple[str, ...], kinds: set[str],
          rolled_back: bool = False) -> None:
    """Kill ``waymark ARGS`` at each of its journal points, from the same saved state: the
    content is what it was (a consolidation changes no view), also after a command that
    changes it (``rolled_back``: killed before its commit, it did not happen)."""
    want = contents(wm.home)
    saved = tmp_path / f"saved-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(wm.home, saved)

    def restore() -> None:
        shutil.rmtree(wm.home)
        shutil.copytree(saved, wm.home)  # the same path: image paths are absolute

    ((last,),) = query(wm.home, "SELECT coalesce(max(id), 0) FROM intents")
    wm(*args)
    rows = query(wm.home, "SELECT kind, steps FROM intents WHERE id > ?", last)
    assert kinds <= {kind for kind, _ in rows}, rows
    points = sum(len(json.loads(steps)) + 1 for _, steps in rows)
    assert_recovered(wm, contents(wm.home) if rolled_back else want, "reference run")
    for n in itertools.count():
        restore()
        killed = wm.run(*args, env=wm.env(WAYMARK_FAILPOINT=str(n)), timeout=120)
        if killed.returncode == 0:
            break
        label = f"{' '.join(args)} killed at journal point {n}"
        assert killed.returncode == -signal.SIGKILL, f"{label}: {killed.stderr}"
        assert n < points, f"{label}: more journal points than it journals ({points})"
        assert_recovered(wm, want, label)
        wm("vm", "consolidate", VM)
        assert chain_length(active_image_of(wm.home, VM)) == 2, label
        assert_recovered(wm, want, f"{label}, consolidated again")
    assert n == points, f"{' '.join(args)} exited 0 after {n} kill points, journals {points}"
    restore()


def test_consolidation_survives_a_kill_at_every_journal_point(wm: Waymark,
                                                              tmp_path: Path) -> None:
    wm("vm", "create", VM, "--disk", "4M")
    for i in range(6):
        qemu_io_write(Path(active_image_of(wm.home, VM)), "qcow2", i * 64 * KIB, 64 * KIB, 0x20 + i)
        wm("checkpoint", "create", VM, "--name", f"c{i}")
    qemu_io_write(Path(active_image_of(wm.home, VM)), "qcow2", 1 << 20, 64 * KIB, 0x30)

    # built from scratch, then linked
    sweep(wm, tmp_path, ("vm", "consolidate", VM), {"consolidation_build",
                                                    "consolidation_advance"})
    wm("vm", "consolidate", VM)

    # a checkpoint of a linked Now: unlinked first, then frozen (the create is rolled back
    # when killed: the content stays as it was)
    sweep(wm, tmp_path, ("checkpoint", "create", VM, "--name", "next"),
          {"consolidation_unlink", "checkpoint_create"}, rolled_back=True)
    wm("checkpoint", "create", VM, "--name", "next")
    qemu_io_write(Path(active_image_of(wm.home, VM)), "qcow2", 2 << 20, 64 * KIB, 0x31)

    # advanced in place by one layer
    sweep(wm, tmp_path, ("vm", "consolidate", VM), {"consolidation_advance"})
    wm("vm", "consolidate", VM)

    # an apply elsewhere (unlinked first), then rebuilt: the new file made, the old dropped
    ((c4,),) = query(wm.home, "SELECT id FROM checkpoints WHERE name = 'c4'")
    wm("checkpoint", "apply", VM, c4, "--discard-current")
    sweep(wm, tmp_path, ("vm", "consolidate", VM), {"consolidation_build",
                                                    "consolidation_drop"})
