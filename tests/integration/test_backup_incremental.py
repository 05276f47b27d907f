"""Incremental backups of VMs that are off (docs/backups.md): real qemu-img, qemu-io and
qemu-storage-daemon, the real CLI.

Data is written into a VM's active image with qemu-io (through QEMU's block layer, so the
disk's persistent dirty bitmap records it). What is checked: a chain of points has the right
kinds, parents and backing files, each incremental holds just the clusters written since its
parent, and every point keeps (and restores to) the content of its backup time; change tracking
follows offline checkpoints and an active commit, is lost by an apply (the next point is full,
saying why); a run SIGKILLed after its jobs started leaves no point and no file, and the next
one is full; prune merges removed points into the kept ones (also when SIGKILLed mid-merge),
which keep their content.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Result, Waymark, content_sha256, own_bytes, qemu_io_write
from tests.integration.test_backups import (
    KIB,
    MIB,
    VM,
    active,
    assert_clean,
    backup,
    disk_files,
    init_repo,
    listed,
    make_vm,
    manifests,
    named_files,
    point_content,
    temporary_files,
    verify_ok,
)

CLUSTER = 64 * KIB
Write = tuple[int, int]  # (offset, length)


# --- helpers ----------------------------------------------------------------------------------

def write(wm: Waymark, offset: int, length: int, pattern: int, vm: str = VM) -> Write:
    qemu_io_write(active(wm, vm), "qcow2", offset, length, pattern)
    return offset, length


def clusters(*writes: Write) -> int:
    """The bytes of the 64 KiB clusters the writes touched (what a bitmap counts)."""
    touched: set[int] = set()
    for offset, length in writes:
        touched |= set(range(offset // CLUSTER, (offset + length - 1) // CLUSTER + 1))
    return len(touched) * CLUSTER


def info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    found: dict[str, Any] = json.loads(out)
    return found


def bitmaps_of(path: Path) -> list[str]:
    return [b["name"] for b in info(path)["format-specific"]["data"].get("bitmaps", [])]


def bitmap_name(repo: Path) -> str:
    return "wm-" + str(json.loads((repo / "waymark-repository.json").read_text())["id"])[:12]


def disk_of(repo: Path, point: dict[str, Any]) -> dict[str, Any]:
    (disk,) = manifests(repo)[point["id"]]["disks"]
    assert isinstance(disk, dict)
    return disk


def taken(wm: Waymark, repo: Path, contents: dict[str, str], vm: str = VM,
          full: bool = False) -> dict[str, Any]:
    """A backup of ``vm``; its content (the active image's now) goes into ``contents``."""
    now = content_sha256(active(wm, vm))
    (point,) = backup(wm, repo, vm, full=full)
    contents[point["id"]] = now
    return point


def assert_full(repo: Path, point: dict[str, Any], reason: str) -> None:
    assert point["kind"] == "full" and point["parent_id"] is None, point
    assert reason in point["reason"], point
    disk = disk_of(repo, point)
    assert "backing-filename" not in info(repo / disk["file"]), disk
    assert "dirty_bytes" not in disk, disk


def assert_incremental(repo: Path, point: dict[str, Any], parent: dict[str, Any], dirty: int,
                       expected: dict[str, int]) -> None:
    """``point`` is an incremental on ``parent`` holding just the ``dirty`` bytes (which go
    into ``expected``: :func:`assert_dirty_bytes` checks the manifests' count of them at the
    end, after everything else)."""
    assert point["kind"] == "incremental" and point["parent_id"] == parent["id"], point
    assert point["reason"] == f"the changes since point {parent['id']}", point
    disk = disk_of(repo, point)
    assert info(repo / disk["file"])["backing-filename"] == f"{parent['id']}.qcow2"
    assert dirty <= own_bytes(repo / disk["file"]) <= 1.1 * dirty, (disk, dirty)
    expected[point["id"]] = dirty


def assert_dirty_bytes(repo: Path, expected: dict[str, int]) -> None:
    """Each incremental's manifest says how many bytes its bitmap marked: the written ones,
    rounded to clusters."""
    found = {i: manifests(repo)[i]["disks"][0].get("dirty_bytes") for i in expected}
    assert found == expected, "the manifests' dirty_bytes (left) are not the written clusters"


def fresh(wm: Waymark, tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, int]]:
    """VM ``web`` (8 MiB, 1 MiB written), a new repository, and the empty records of the points'
    contents and dirty bytes."""
    make_vm(wm, VM, "8M", (0, MIB, 0x01))
    return init_repo(wm, tmp_path / "repo"), {}, {}


def assert_sound(wm: Waymark, repo: Path, contents: dict[str, str]) -> None:
    """Every point holds its content, verifies, and no stray file is left."""
    assert_contents(repo, contents)
    verify_ok(wm, repo)
    assert_tidy(repo)


def assert_contents(repo: Path, contents: dict[str, str]) -> None:
    """Every point listed in ``contents`` (and no other) holds its content."""
    assert set(manifests(repo)) == set(contents)
    for point_id, content in contents.items():
        assert point_content(repo, {"id": point_id}) == content, point_id


def restored(wm: Waymark, repo: Path, point_id: str, name: str, vm: str = VM) -> str:
    """The content of a new VM restored from the point."""
    made = wm.json("backup", "restore", vm, "--repo", str(repo), "--point", point_id,
                   "--as-new", name)
    shown = wm.json("vm", "show", made["restored_as"]["id"])
    return content_sha256(shown["disks"][0]["active_image"])


def assert_tidy(repo: Path) -> None:
    """No file but the manifests' disk files, no merge left half done."""
    assert temporary_files(repo) == []
    assert disk_files(repo) == named_files(repo), \
        f"files no manifest names: {disk_files(repo) - named_files(repo)}"
    assert list(repo.glob("vms/*/merging.json")) == []


def killed(wm: Waymark, label: str, *args: str) -> Result:
    """Run waymark with the failpoint ``label``: it must die there."""
    result = wm.run(*args, env=wm.env(WAYMARK_FAILPOINT=label))
    assert result.returncode == -signal.SIGKILL, f"not killed at {label}: {result}"
    return result


def chain_of_four(wm: Waymark, repo: Path, vm: str) -> tuple[list[dict[str, Any]],
                                                              dict[str, str]]:
    """Points A (full), B, C, D (incrementals) of ``vm``, 128 KiB written between each."""
    contents: dict[str, str] = {}
    points = [taken(wm, repo, contents, vm)]
    for n in range(3):
        write(wm, (2 + 2 * n) * MIB, 128 * KIB, 0x50 + n, vm)
        points.append(taken(wm, repo, contents, vm))
    assert [p["kind"] for p in points] == ["full"] + ["incremental"] * 3, points
    return points, contents


# --- 1. a chain -------------------------------------------------------------------------------

def test_a_chain_of_incrementals_holds_each_points_content(wm: Waymark, tmp_path: Path) -> None:
    repo, contents, dirty = fresh(wm, tmp_path)
    full = taken(wm, repo, contents)
    assert_full(repo, full, "the first backup of this VM in this repository")
    assert bitmap_name(repo) in bitmaps_of(active(wm))

    first = write(wm, 2 * MIB, 128 * KIB, 0x02)
    inc1 = taken(wm, repo, contents)
    assert_incremental(repo, inc1, full, clusters(first), dirty)
    assert clusters(first) == 128 * KIB
    second = write(wm, 5 * MIB + 32 * KIB, 256 * KIB, 0x03)  # not cluster-aligned: 5 clusters
    inc2 = taken(wm, repo, contents)
    assert_incremental(repo, inc2, inc1, clusters(second), dirty)
    assert clusters(second) == 320 * KIB

    assert len(set(contents.values())) == 3
    assert_contents(repo, contents)
    assert listed(wm, repo, VM) == set(contents)
    rows = {r["id"]: r for r in wm.json("backup", "list", "--repo", str(repo))}
    assert [(rows[p["id"]]["kind"], rows[p["id"]]["parent_id"]) for p in (full, inc1, inc2)] == \
        [("full", None), ("incremental", full["id"]), ("incremental", inc1["id"])]
    verify_ok(wm, repo)
    assert_tidy(repo)
    for n, point_id in enumerate(contents):
        assert restored(wm, repo, point_id, f"copy{n}") == contents[point_id], point_id
    assert_clean(wm)
    assert_dirty_bytes(repo, dirty)


# --- 2. checkpoints between backups -----------------------------------------------------------

def test_change_tracking_follows_checkpoint_create_and_an_active_commit(
        wm: Waymark, tmp_path: Path) -> None:
    repo, contents, dirty = fresh(wm, tmp_path)
    full = taken(wm, repo, contents)

    # a checkpoint between two writes: the bitmap goes onto the new overlay
    before = write(wm, 2 * MIB, 128 * KIB, 0x02)
    wm("checkpoint", "create", VM, "--name", "A")
    after = write(wm, 3 * MIB, 64 * KIB, 0x03)
    assert bitmap_name(repo) in bitmaps_of(active(wm))
    inc1 = taken(wm, repo, contents)
    assert_incremental(repo, inc1, full, clusters(before, after), dirty)

    # B's frozen image holds 1 MiB more than Now: deleting B commits Now down into it
    big = write(wm, 4 * MIB, MIB, 0x04)
    b = wm.json("checkpoint", "create", VM, "--name", "B")
    frozen = Path(b["disks"][0]["frozen_image"])
    tiny = write(wm, 6 * MIB, 64 * KIB, 0x05)
    now_before = content_sha256(active(wm))
    wm("checkpoint", "delete", VM, "B")
    assert active(wm) == frozen, "the delete did not commit Now into B's image (no active commit)"
    assert content_sha256(active(wm)) == now_before
    assert bitmaps_of(active(wm)) == [bitmap_name(repo)]
    last = write(wm, 7 * MIB, 64 * KIB, 0x06)
    inc2 = taken(wm, repo, contents)
    assert_incremental(repo, inc2, inc1, clusters(big, tiny, last), dirty)

    assert_sound(wm, repo, contents)
    assert restored(wm, repo, inc2["id"], "copy") == contents[inc2["id"]]
    assert [c["name"] for c in wm.json("checkpoint", "list", VM)["checkpoints"]] == ["A"]
    assert_clean(wm)
    assert_dirty_bytes(repo, dirty)


# --- 3. full points, and incrementals again after them ----------------------------------------

def test_an_apply_or_full_makes_a_full_point_and_the_next_is_incremental(
        wm: Waymark, tmp_path: Path) -> None:
    repo, contents, dirty = fresh(wm, tmp_path)
    taken(wm, repo, contents)
    wm("checkpoint", "create", VM, "--name", "A")
    write(wm, 2 * MIB, 128 * KIB, 0x02)
    inc = taken(wm, repo, contents)
    assert inc["kind"] == "incremental", inc

    wm("checkpoint", "apply", VM, "A", "--discard-current")
    assert bitmap_name(repo) not in bitmaps_of(active(wm))
    after_apply = taken(wm, repo, contents)
    assert_full(repo, after_apply, "no change tracking")
    assert after_apply["reason"].startswith("disk "), after_apply
    assert contents[after_apply["id"]] != contents[inc["id"]]

    change = write(wm, 3 * MIB, 64 * KIB, 0x03)
    again = taken(wm, repo, contents)
    assert_incremental(repo, again, after_apply, clusters(change), dirty)

    write(wm, 4 * MIB, 64 * KIB, 0x04)
    asked = taken(wm, repo, contents, full=True)
    assert_full(repo, asked, "--full was asked")
    assert asked["reason"] == "--full was asked", asked
    change = write(wm, 5 * MIB, 192 * KIB, 0x05)  # only this: the full point reset the bitmap
    after_full = taken(wm, repo, contents)
    assert_incremental(repo, after_full, asked, clusters(change), dirty)

    assert_sound(wm, repo, contents)
    assert_clean(wm)
    assert_dirty_bytes(repo, dirty)


# --- 4. a run killed after its jobs started ---------------------------------------------------

def test_a_run_killed_after_its_jobs_started_makes_the_next_one_full(wm: Waymark,
                                                                      tmp_path: Path) -> None:
    repo, contents, dirty = fresh(wm, tmp_path)
    first = taken(wm, repo, contents)
    write(wm, 2 * MIB, 256 * KIB, 0x02)
    files = disk_files(repo)

    killed(wm, "backup-started", "backup", "run", VM, "--repo", str(repo), "--json")
    assert listed(wm, repo) == {first["id"]}
    assert temporary_files(repo), "the killed run left no file: nothing was being written"
    assert disk_files(repo) > files
    verify_ok(wm, repo)

    after = taken(wm, repo, contents)
    assert_full(repo, after, "the previous backup run did not finish")
    assert after["reason"] == "the previous backup run did not finish", after
    assert listed(wm, repo) == {first["id"], after["id"]}
    assert_tidy(repo)
    assert_contents(repo, contents)

    # and change tracking works again from there
    change = write(wm, 4 * MIB, 64 * KIB, 0x03)
    then = taken(wm, repo, contents)
    assert_incremental(repo, then, after, clusters(change), dirty)
    assert_sound(wm, repo, contents)
    assert_clean(wm)
    assert_dirty_bytes(repo, dirty)


# --- 5. prune merges ---------------------------------------------------------------------------

def test_prune_merges_the_removed_points_into_the_kept_ones(wm: Waymark, tmp_path: Path) -> None:
    make_vm(wm, VM, "8M", (0, MIB, 0x01))
    repo = init_repo(wm, tmp_path / "repo")
    (a, b, c, d), contents = chain_of_four(wm, repo, VM)
    dirty: dict[str, int] = {}

    before = manifests(repo)
    done = wm.json("backup", "prune", "--repo", str(repo), "--keep-last", "2")
    assert [r["id"] for r in done["removed"]] == [a["id"], b["id"]], done
    assert done["dry_run"] is False
    del contents[a["id"]], contents[b["id"]]
    assert listed(wm, repo) == {c["id"], d["id"]}

    kept = manifests(repo)
    assert kept[c["id"]]["kind"] == "full" and kept[c["id"]]["parent"] is None, kept[c["id"]]
    assert b["id"] in kept[c["id"]]["merged"], kept[c["id"]]
    assert "made full by retention" in kept[c["id"]]["reason"], kept[c["id"]]
    assert "backing-filename" not in info(repo / disk_of(repo, c)["file"])
    assert kept[d["id"]]["kind"] == "incremental" and kept[d["id"]]["parent"] == c["id"]
    assert kept[d["id"]] == before[d["id"]], "D (on C, which keeps its id) was changed"
    assert info(repo / disk_of(repo, d)["file"])["backing-filename"] == f"{c['id']}.qcow2"
    assert_sound(wm, repo, contents)

    change = write(wm, 7 * MIB, 64 * KIB, 0x0E)
    e = taken(wm, repo, contents)
    assert_incremental(repo, e, d, clusters(change), dirty)
    assert_contents(repo, contents)
    assert restored(wm, repo, c["id"], "copy") == contents[c["id"]]
    verify_ok(wm, repo)
    assert_tidy(repo)
    assert_dirty_bytes(repo, dirty)


@pytest.mark.parametrize("finisher", ["prune", "run"])
@pytest.mark.parametrize("label", ["merge-intent", "merge-committed", "merge-renamed"])
def test_a_prune_killed_mid_merge_is_finished_by_the_next_command(
        wm: Waymark, tmp_path: Path, label: str, finisher: str) -> None:
    """Killed while merging A into B (A, B, C kept as the last 2): the next ``backup prune``
    or ``backup run`` (both under the repository's lock) finishes the merge."""
    repo, contents, dirty = fresh(wm, tmp_path)
    a = taken(wm, repo, contents)
    write(wm, 2 * MIB, 128 * KIB, 0x02)
    b = taken(wm, repo, contents)
    write(wm, 4 * MIB, 128 * KIB, 0x03)
    c = taken(wm, repo, contents)
    assert (b["parent_id"], c["parent_id"]) == (a["id"], b["id"])

    killed(wm, label, "backup", "prune", "--repo", str(repo), "--keep-last", "2")
    if finisher == "prune":
        wm("backup", "prune", "--repo", str(repo), "--keep-last", "2")
    else:
        change = write(wm, 6 * MIB, 64 * KIB, 0x04)
        d = taken(wm, repo, contents)
        assert_incremental(repo, d, c, clusters(change), dirty)
    assert list(repo.glob("vms/*/merging.json")) == [], \
        f"the next {finisher} did not finish the merge interrupted at {label}"
    del contents[a["id"]]
    kept = manifests(repo)
    assert set(kept) == set(contents), f"{a['id']} is still a point, or a kept one is lost"
    assert kept[b["id"]]["kind"] == "full" and kept[b["id"]]["parent"] is None, kept[b["id"]]
    assert kept[b["id"]]["merged"] == [a["id"]], kept[b["id"]]
    assert "backing-filename" not in info(repo / disk_of(repo, b)["file"])
    assert kept[c["id"]]["parent"] == b["id"], kept[c["id"]]
    assert_sound(wm, repo, contents)
    assert_dirty_bytes(repo, dirty)
