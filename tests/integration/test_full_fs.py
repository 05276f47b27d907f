"""A full file system under the Waymark home: clear errors, nothing half-done, no data lost.

The home is a small tmpfs mounted by the test. A filler file takes all but a little of its
space; ``checkpoint create`` must then fail cleanly and leave nothing behind (not even later, once
space is back), and a delete whose merge cannot be written must keep every byte, and be finished
by the next command once the filler is gone.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Waymark, content_sha256, file_sha256, qemu_io_write, query, tmpfs

KIB, MIB = 1 << 10, 1 << 20
VM = "tight"


@pytest.fixture
def small_home(tmp_path: Path) -> Iterator[Waymark]:
    with tmpfs(tmp_path / "home", "24m") as home:
        yield Waymark(home)


def active_path(home: Path) -> str:
    ((path,),) = query(home, "SELECT i.path FROM disks d JOIN images i "
                             "ON i.id = d.active_image_id")
    return str(path)


def fill(home: Path, leave: int) -> Path:
    """Take all the free space of ``home``'s file system but ``leave`` bytes."""
    filler = home / "filler"
    stat = os.statvfs(home)
    size = stat.f_bavail * stat.f_frsize - leave
    assert size > 0
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    free = os.statvfs(home).f_bavail * os.statvfs(home).f_frsize
    assert free <= leave + 8 * KIB, free
    return filler


def vm_files(home: Path) -> dict[str, str]:
    """Every file of every VM, with its sha256."""
    return {str(p): file_sha256(p) for p in (home / "vms").rglob("*") if p.is_file()}


def assert_consistent(wm: Waymark) -> None:
    """No pending intent, files and catalog agree, and ``waymark check`` is clean."""
    assert query(wm.home, "SELECT kind FROM intents WHERE status = 'pending'") == []
    ((vm_id,),) = query(wm.home, "SELECT id FROM vms")
    owned = {p for (p,) in query(wm.home, "SELECT path FROM images WHERE pinned = 0")}
    files = {str(p) for p in (wm.home / "vms" / vm_id / "disks").iterdir()}
    assert files == owned, f"stray {files - owned}, missing {owned - files}"
    check = wm.run("check", "--json")
    assert check.returncode == 0, check.stdout + check.stderr


def _vm_with_checkpoint(wm: Waymark) -> dict[str, Any]:
    wm("vm", "create", VM, "--disk", "4M")
    qemu_io_write(Path(active_path(wm.home)), "qcow2", 0, MIB, 0x11)
    a = wm.json("checkpoint", "create", VM, "--name", "A")
    qemu_io_write(Path(active_path(wm.home)), "qcow2", MIB, 64 * KIB, 0x22)
    return {"a": a["id"], "a_sha": content_sha256(a["disks"][0]["frozen_image"]),
            "now": content_sha256(active_path(wm.home))}


def test_checkpoint_create_on_a_full_home_changes_nothing(small_home: Waymark) -> None:
    """Rounds with less and less space left: wherever the create fails (opening the catalog,
    making the overlay, writing the configuration, committing), it fails cleanly."""
    wm = small_home
    state = _vm_with_checkpoint(wm)
    problems = []
    for leave_kib in (256, 160, 64, 0):
        tree, files = wm.json("checkpoint", "list", VM), vm_files(wm.home)
        filler = fill(wm.home, leave_kib * KIB)
        failed = wm.run("checkpoint", "create", VM, "--name", f"left {leave_kib} KiB")
        filler.unlink()
        where = f"{leave_kib} KiB left"
        if failed.returncode == 0:
            problems.append(f"{where}: the create succeeded (the test needs less space)")
            continue
        if "Traceback" in failed.stderr:
            problems.append(f"{where}: a traceback instead of an error: "
                            f"{failed.stderr.strip().splitlines()[-1]}")
        elif "space" not in failed.stderr.lower():
            problems.append(f"{where}: the error does not say space is short: "
                            f"{failed.stderr.strip()}")
        if vm_files(wm.home) != files:
            problems.append(f"{where}: the failed create left files behind")
        # once space is back, the failed create must not come back to life
        if wm.json("checkpoint", "list", VM) != tree:
            problems.append(f"{where}: the failed checkpoint appeared once space was back")
    assert not problems, "\n".join(problems)
    assert content_sha256(active_path(wm.home)) == state["now"]
    assert_consistent(wm)


def test_checkpoint_create_with_a_full_checkpoint_folder(small_home: Waymark,
                                                         tmp_path: Path) -> None:
    """The configuration file cannot be written: the new overlay is undone, nothing changes."""
    wm = small_home
    folder = tmp_path / "configs"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], check=True)
    try:
        wm("vm", "create", VM, "--disk", "4M", "--checkpoint-dir", str(folder))
        qemu_io_write(Path(active_path(wm.home)), "qcow2", 0, 64 * KIB, 0x33)
        a = wm.json("checkpoint", "create", VM, "--name", "A")["id"]
        now = content_sha256(active_path(wm.home))
        tree, files = wm.json("checkpoint", "list", VM), vm_files(wm.home)
        configs = sorted(p.name for p in folder.iterdir())
        assert configs == [f"{a}.json"]
        filler = fill(folder, 0)

        failed = wm.run("checkpoint", "create", VM, "--name", "B")

        assert failed.returncode == 73, failed.stderr
        assert "Traceback" not in failed.stderr, failed.stderr
        assert "space" in failed.stderr.lower(), failed.stderr
        assert vm_files(wm.home) == files, "the failed create left its overlay behind"
        filler.unlink()
        assert wm.json("checkpoint", "list", VM) == tree, "the failed checkpoint appeared later"
        assert sorted(p.name for p in folder.iterdir()) == configs
        assert vm_files(wm.home) == files
        assert content_sha256(active_path(wm.home)) == now
        assert_consistent(wm)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_compaction_on_a_full_fs_loses_nothing_and_resumes(small_home: Waymark) -> None:
    wm = small_home
    # base (frozen by A) <- U (2 MiB, frozen by C) <- K (1 MiB elsewhere, active): deleting C
    # commits K into U, which needs about 1 MiB more
    wm("vm", "create", VM, "--disk", "4M")
    qemu_io_write(Path(active_path(wm.home)), "qcow2", 0, 64 * KIB, 0x01)
    a = wm.json("checkpoint", "create", VM, "--name", "A")
    a_path = a["disks"][0]["frozen_image"]
    qemu_io_write(Path(active_path(wm.home)), "qcow2", 0, 2 * MIB, 0x02)
    c = wm.json("checkpoint", "create", VM, "--name", "C")
    k = active_path(wm.home)
    qemu_io_write(Path(k), "qcow2", 2 * MIB, MIB, 0x03)
    a_sha, now = content_sha256(a_path), content_sha256(k)
    filler = fill(wm.home, 400 * KIB)

    failed = wm.run("checkpoint", "delete", VM, "C")

    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr, failed.stderr
    assert "space" in failed.stderr.lower(), failed.stderr
    # no data lost while the disk is full
    assert content_sha256(a_path) == a_sha
    assert content_sha256(k) == now

    filler.unlink()
    listing = wm.json("checkpoint", "list", VM)  # finishes the compaction
    assert [x["id"] for x in listing["checkpoints"]] == [a["id"]]
    assert listing["current_checkpoint_id"] == a["id"]
    assert c["id"] not in {x["id"] for x in listing["checkpoints"]}
    shown = wm.json("checkpoint", "show", VM, "A")
    assert content_sha256(shown["disks"][0]["frozen_image"]) == a_sha
    active = wm.json("vm", "show", VM)["disks"][0]["active_image"]
    assert content_sha256(active) == now
    assert_consistent(wm)
    assert len(list((wm.home / "vms").glob("*/disks/*"))) == 2
