"""Backups of VMs that are off (docs/backups.md): real qemu-img, real qcow2 files, the real CLI.

Data is written into a VM's active image with qemu-io while the VM is off; "content" is the
disk as the guest would see it (:func:`content_sha256` of the whole chain). What is checked:
repositories are made only where they should be; a point's manifest matches its files and its
disk holds the content of backup time, restorable with Waymark (as a new VM, or into the VM with
its checkpoint tree kept) and without it (stock ``qemu-img convert``), from wherever the
repository folder was moved; damage is found and refused; one failing VM does not stop a run; a
SIGKILLed run or a full backup file system leaves the earlier points intact and no stray file.

Restoring into a running VM needs a running VM: tests/guest/test_backup_live.py covers it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    Result,
    Waymark,
    content_sha256,
    file_sha256,
    own_bytes,
    qemu_io_write,
    query,
    serve_process,
    tmpfs,
)
from waymark.errors import ImageError
from waymark.external.repository import Repository

KIB, MIB = 1 << 10, 1 << 20
EXIT_INVALID, EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_IMAGE, EXIT_STORAGE = 2, 3, 5, 8, 73
VM = "web"
PROGRESS = re.compile(r"^\[\d+/\d+\] ")


# --- helpers ----------------------------------------------------------------------------------

def active(wm: Waymark, vm: str = VM) -> Path:
    """The VM's (one) active image, read from the catalog (quicker than ``vm show``)."""
    ((path,),) = query(wm.home, "SELECT i.path FROM disks d JOIN images i "
                                "ON i.id = d.active_image_id JOIN vms v ON v.id = d.vm_id "
                                "WHERE v.name = ?", vm)
    return Path(path)


def make_vm(wm: Waymark, name: str, size: str, *writes: tuple[int, int, int]) -> str:
    """A VM that is off with one disk of ``size``, ``writes`` (offset, length, pattern) in it;
    returns its id."""
    vm_id: str = wm.json("vm", "create", name, "--disk", size)["id"]
    for offset, length, pattern in writes:
        qemu_io_write(active(wm, name), "qcow2", offset, length, pattern)
    return vm_id


def init_repo(wm: Waymark, path: Path) -> Path:
    wm("backup", "repo", "init", str(path))
    return path


def backup(wm: Waymark, repo: Path, *vms: str, full: bool = False) -> list[dict[str, Any]]:
    """``backup run`` that must succeed: one summary per VM."""
    rows = wm.json("backup", "run", *vms, "--repo", str(repo), *(["--full"] if full else []))
    assert [r["vm"] for r in rows] == list(vms) and all(r["ok"] for r in rows), rows
    return [r["point"] for r in rows]


def manifests(repo: Path) -> dict[str, dict[str, Any]]:
    """Every point's manifest, read from the repository's files, by point id."""
    found = {}
    for path in repo.glob("vms/*/points/*.json"):
        manifest = json.loads(path.read_text())
        assert path.name == f"{manifest['id']}.json"
        found[manifest["id"]] = manifest
    return found


def disk_files(repo: Path) -> set[str]:
    """Every file under the repository's disk folders (temporary ones included)."""
    return {str(p.relative_to(repo)) for p in repo.glob("vms/*/disks/**/*") if p.is_file()}


def named_files(repo: Path) -> set[str]:
    return {d["file"] for m in manifests(repo).values() for d in m["disks"]}


def temporary_files(repo: Path) -> list[Path]:
    return [p for p in (repo / "vms").rglob(".*.tmp") if p.is_file()]


def tree_files(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its sha256 (the catalog's files by name only: the CLI
    shows what they hold)."""
    return {str(p.relative_to(folder)): "" if p.name.startswith("catalog.db") else file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def point_content(repo: Path, point: dict[str, Any]) -> str:
    (disk,) = manifests(repo)[point["id"]]["disks"]
    return content_sha256(repo / disk["file"])


def listed(wm: Waymark, repo: Path, *vm: str) -> set[str]:
    """The ids ``backup list`` shows (a set: points taken within one second do not list in the
    order they were taken, see test_points_list_in_the_order_they_were_taken)."""
    return {r["id"] for r in wm.json("backup", "list", *vm, "--repo", str(repo))}


def json_documents(text: str) -> list[Any]:
    """The JSON documents printed on stdout, one after the other (``backup run --json`` prints
    its per-VM rows and then, when one failed, the error's JSON too)."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)
    return docs


def error_text(result: Result) -> str:
    """stderr without the progress lines (``[1/1] disk 0a1b2c3d4e5f``) printed before it."""
    return "".join(line for line in result.stderr.splitlines(keepends=True)
                   if not PROGRESS.match(line))


def assert_error(result: Result, code: int | None, *fragments: str) -> None:
    """Failed (with ``code``, or any non-zero one) with an ``error:`` line naming each fragment
    on stderr, and no traceback."""
    if code is None:
        assert result.returncode != 0, result
    else:
        assert result.returncode == code, result
    assert error_text(result).startswith("error: "), result
    assert "Traceback" not in result.stdout + result.stderr, result
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in: {result.stderr}"


def assert_clean(wm: Waymark) -> None:
    checked = wm.run("check", "--json")
    assert checked.returncode == 0 and checked.json()["clean"], checked.stdout + checked.stderr


def verify_ok(wm: Waymark, repo: Path, *args: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = wm.json("backup", "verify", *args, "--repo", str(repo))
    assert rows and all(r["problems"] == [] for r in rows), rows
    return rows


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# --- 1. repositories --------------------------------------------------------------------------

def test_repo_init_only_where_nothing_is(wm: Waymark, tmp_path: Path) -> None:
    new = tmp_path / "usb" / "backups"  # its parent does not exist either
    made = wm.json("backup", "repo", "init", str(new))
    assert made == {"repository": str(new)}
    marker = json.loads((new / "waymark-repository.json").read_text())
    assert marker["format"] == "waymark-backup-repository" and marker["version"] == 1, marker
    assert wm.json("backup", "list", "--repo", str(new)) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert wm.json("backup", "repo", "init", str(empty)) == {"repository": str(empty)}

    before = tree_files(new)
    again = wm.run("backup", "repo", "init", str(new))
    assert_error(again, EXIT_CONFLICT, str(new), "already a Waymark backup repository")
    assert tree_files(new) == before

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    refused = wm.run("backup", "repo", "init", str(busy))
    assert_error(refused, EXIT_CONFLICT, str(busy), "not an empty folder")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert (busy / "keep.txt").read_text() == "mine"

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert_error(wm.run("backup", "repo", "init", str(a_file)), EXIT_CONFLICT, str(a_file))
    assert a_file.read_text() == "x"


def test_commands_on_a_folder_that_is_not_a_repository(wm: Waymark, tmp_path: Path) -> None:
    make_vm(wm, VM, "1M", (0, 64 * KIB, 0x01))
    home = tree_files(wm.home)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a repository")
    missing = tmp_path / "not-mounted"
    for folder, commands in (
            (plain, (("run", VM), ("list",), ("verify",), ("restore", VM, "--as-new", "copy"))),
            (missing, (("run", VM), ("list",)))):
        for args in commands:
            result = wm.run("backup", *args, "--repo", str(folder))
            assert_error(result, EXIT_NOT_FOUND, str(folder), "not a Waymark backup repository",
                         f"waymark backup repo init {folder}")
            assert result.stdout == "", result
    assert [p.name for p in plain.iterdir()] == ["notes.txt"], "a failed command made files"
    assert not missing.exists(), "a failed command made the folder"
    assert tree_files(wm.home) == home
    assert [v["name"] for v in wm.json("vm", "list")] == [VM]


# --- 2. a point, and restoring it -------------------------------------------------------------

@pytest.fixture
def backed_up(wm: Waymark, tmp_path: Path) -> dict[str, Any]:
    """VM ``web`` with checkpoints A <- B and more data in Now, backed up into a repository
    (point P), then changed (Now differs from P)."""
    vm_id = make_vm(wm, VM, "8M", (0, MIB, 0x01))
    a = wm.json("checkpoint", "create", VM, "--name", "A")
    qemu_io_write(active(wm), "qcow2", 2 * MIB, 512 * KIB, 0x02)
    b = wm.json("checkpoint", "create", VM, "--name", "B")
    qemu_io_write(active(wm), "qcow2", 4 * MIB, 256 * KIB, 0x03)
    at_backup = content_sha256(active(wm))
    repo = init_repo(wm, tmp_path / "repo")
    (point,) = backup(wm, repo, VM)
    qemu_io_write(active(wm), "qcow2", MIB, 128 * KIB, 0x04)  # Now moves on
    changed = content_sha256(active(wm))
    assert changed != at_backup
    return {"vm_id": vm_id, "repo": repo, "point": point, "at_backup": at_backup,
            "changed": changed,
            "checkpoints": {c["id"]: content_sha256(c["disks"][0]["frozen_image"])
                            for c in (a, b)}}


def test_a_point_is_listed_and_its_manifest_matches_its_files(wm: Waymark,
                                                              backed_up: dict[str, Any]) -> None:
    repo, point = backed_up["repo"], backed_up["point"]
    rows = wm.json("backup", "list", "--repo", str(repo))
    assert [r["id"] for r in rows] == [point["id"]]
    (row,) = rows
    assert row["kind"] == "full" and row["parent_id"] is None, row
    assert row["reason"] == "the first backup of this VM in this repository", row
    assert row["consistency"].startswith("consistent"), row
    assert (row["vm_name"], row["vm_id"]) == (VM, backed_up["vm_id"]), row
    assert row["virtual_bytes"] == 8 * MIB and 0 < row["bytes"] < 8 * MIB, row
    assert row["repository"] == str(repo)
    assert listed(wm, repo, VM) == {point["id"]}
    assert listed(wm, repo, backed_up["vm_id"][:8]) == {point["id"]}  # a VM by id prefix

    manifest = manifests(repo)[point["id"]]
    assert manifest["format"] == "waymark-backup-point" and manifest["vm_state"] == "off"
    assert manifest["vm"]["config"] == json.loads(json.dumps(manifest["vm"]["config"]))
    shown = wm.json("vm", "show", VM)
    (disk,) = manifest["disks"]
    assert disk["disk_id"] == shown["disks"][0]["id"]
    assert disk["file"] == f"vms/{backed_up['vm_id']}/disks/{disk['disk_id']}/{point['id']}.qcow2"
    assert file_sha256(repo / disk["file"]) == disk["sha256"]
    assert (repo / disk["file"]).stat().st_size == disk["bytes"] == row["bytes"]
    assert disk["virtual_size"] == 8 * MIB
    assert manifest["vm"]["config"]["nics"][0]["mac"] == shown["nics"][0]["mac"]
    assert content_sha256(repo / disk["file"]) == backed_up["at_backup"]
    assert disk_files(repo) == named_files(repo) == {disk["file"]}
    # a backup creates no checkpoint and changes nothing of the VM
    assert wm.json("vm", "show", VM)["checkpoint_count"] == 2
    verify_ok(wm, repo)

    # the next point is incremental: only the 128 KiB written since, on the first point's file
    second = backup(wm, repo, VM)[0]
    assert second["kind"] == "incremental" and second["parent_id"] == point["id"], second
    assert second["reason"] == f"the changes since point {point['id']}", second
    assert listed(wm, repo) == {point["id"], second["id"]}
    assert point_content(repo, second) == backed_up["changed"]
    (small,) = manifests(repo)[second["id"]]["disks"]
    assert small["dirty_bytes"] == 128 * KIB, small
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(repo / small["file"])],
        check=True, capture_output=True, text=True).stdout)
    assert info["backing-filename"] == f"{point['id']}.qcow2", info
    assert own_bytes(repo / small["file"]) <= 1.1 * small["dirty_bytes"]
    verify_ok(wm, repo)


def test_restore_as_new_vm_has_the_points_content(wm: Waymark, backed_up: dict[str, Any]
                                                  ) -> None:
    repo = backed_up["repo"]
    repo_before = tree_files(repo)
    made = wm.json("backup", "restore", VM, "--repo", str(repo), "--as-new", "web-copy")
    copy = wm.json("vm", "show", "web-copy")
    assert made == {"restored_as": copy} and copy["id"] != backed_up["vm_id"], made
    original = wm.json("vm", "show", VM)
    assert copy["state"] == "off" and copy["checkpoint_count"] == 0, copy
    assert copy["disks"][0]["id"] != original["disks"][0]["id"]
    assert copy["nics"][0]["mac"] != original["nics"][0]["mac"], "a restored copy kept the MAC"
    assert (copy["memory_mib"], copy["cpus"]) == (original["memory_mib"], original["cpus"])
    assert content_sha256(copy["disks"][0]["active_image"]) == backed_up["at_backup"]
    # the original is untouched, and the copy does not need the repository
    assert content_sha256(active(wm)) == backed_up["changed"]
    assert tree_files(repo) == repo_before
    shutil.rmtree(repo)
    assert content_sha256(copy["disks"][0]["active_image"]) == backed_up["at_backup"]
    taken = wm.run("backup", "restore", VM, "--repo", str(repo), "--as-new", "web-copy")
    assert_error(taken, EXIT_NOT_FOUND)
    assert_clean(wm)


def test_restore_into_the_vm_keeps_its_checkpoints(wm: Waymark, backed_up: dict[str, Any]
                                                   ) -> None:
    repo, point = backed_up["repo"], backed_up["point"]
    before = wm.json("checkpoint", "list", VM)["checkpoints"]
    done = wm.json("backup", "restore", VM, "--repo", str(repo), "--discard-current")
    assert done["point_id"] == point["id"] and done["safety_checkpoint_id"] is None, done

    assert content_sha256(active(wm)) == backed_up["at_backup"]
    tree = wm.json("checkpoint", "list", VM)
    by_id = {c["id"]: c for c in tree["checkpoints"]}
    assert set(by_id) == {c["id"] for c in before} | {done["checkpoint_id"]}
    restored = by_id[done["checkpoint_id"]]
    assert restored["name"] == f"Restored from {point['id']}", restored
    assert restored["parent_id"] is None and tree["current_checkpoint_id"] == restored["id"], tree
    for ckpt_id, content in backed_up["checkpoints"].items():
        shown = wm.json("checkpoint", "show", VM, ckpt_id)
        assert content_sha256(shown["disks"][0]["frozen_image"]) == content, shown["name"]
        assert {k: v for k, v in by_id[ckpt_id].items() if k != "allocated_bytes"} == \
            {k: v for k, v in next(c for c in before if c["id"] == ckpt_id).items()
             if k != "allocated_bytes"}
    frozen = wm.json("checkpoint", "show", VM, restored["id"])["disks"][0]["frozen_image"]
    assert content_sha256(frozen) == backed_up["at_backup"]
    assert wm.json("vm", "show", VM)["checkpoint_count"] == len(before) + 1
    assert_clean(wm)

    # the restored disks do not need the repository; a write goes to Now, not the checkpoint
    shutil.rmtree(repo)
    qemu_io_write(active(wm), "qcow2", 6 * MIB, 64 * KIB, 0x05)
    assert content_sha256(frozen) == backed_up["at_backup"]
    assert_clean(wm)


def test_restore_with_checkpoint_first_keeps_now(wm: Waymark, backed_up: dict[str, Any]) -> None:
    repo, point = backed_up["repo"], backed_up["point"]
    count = wm.json("vm", "show", VM)["checkpoint_count"]
    done = wm.json("backup", "restore", VM, "--repo", str(repo), "--point", point["id"][:18],
                   "--checkpoint-first")
    assert done["point_id"] == point["id"] and done["safety_checkpoint_id"], done
    safety = wm.json("checkpoint", "show", VM, done["safety_checkpoint_id"])
    assert content_sha256(safety["disks"][0]["frozen_image"]) == backed_up["changed"]
    assert content_sha256(active(wm)) == backed_up["at_backup"]
    tree = wm.json("checkpoint", "list", VM)
    assert tree["current_checkpoint_id"] == done["checkpoint_id"]
    assert wm.json("vm", "show", VM)["checkpoint_count"] == count + 2
    for ckpt_id, content in backed_up["checkpoints"].items():
        shown = wm.json("checkpoint", "show", VM, ckpt_id)
        assert content_sha256(shown["disks"][0]["frozen_image"]) == content
    assert_clean(wm)

    # and back to the safety checkpoint: the pre-restore content
    wm("checkpoint", "apply", VM, done["safety_checkpoint_id"], "--discard-current")
    assert content_sha256(active(wm)) == backed_up["changed"]
    assert_clean(wm)


def test_restore_into_the_vm_needs_a_choice(wm: Waymark, backed_up: dict[str, Any]) -> None:
    repo = backed_up["repo"]
    home, tree = tree_files(wm.home), wm.json("checkpoint", "list", VM)
    for extra in ((), ("--checkpoint-first", "--discard-current")):
        refused = wm.run("backup", "restore", VM, "--repo", str(repo), *extra)
        assert_error(refused, EXIT_INVALID, "--checkpoint-first", "--discard-current",
                     "--as-new")
    refused = wm.run("backup", "restore", VM, "--repo", str(repo), "--as-new", "x",
                     "--discard-current")
    assert_error(refused, EXIT_INVALID, "--as-new")
    refused = wm.run("backup", "restore", VM, "--repo", str(repo), "--point", "1999",
                     "--discard-current")
    assert_error(refused, EXIT_NOT_FOUND, "'1999'")
    refused = wm.run("backup", "restore", "nobody", "--repo", str(repo), "--as-new", "x")
    assert_error(refused, EXIT_NOT_FOUND, "'nobody'")
    taken = wm.run("backup", "restore", VM, "--repo", str(repo), "--as-new", VM)
    assert_error(taken, EXIT_CONFLICT, f"a VM named {VM!r} already exists")
    assert tree_files(wm.home) == home
    assert wm.json("checkpoint", "list", VM) == tree
    assert [v["name"] for v in wm.json("vm", "list")] == [VM]
    assert content_sha256(active(wm)) == backed_up["changed"]


def test_points_list_in_the_order_they_were_taken(wm: Waymark, tmp_path: Path) -> None:
    make_vm(wm, "quick", "1M", (0, 64 * KIB, 0x06))
    repo = init_repo(wm, tmp_path / "repo")
    taken = [p["id"] for p in backup(wm, repo, *["quick"] * 10)]  # about 25 ms each
    assert [r["id"] for r in wm.json("backup", "list", "--repo", str(repo))] == taken
    assert wm.json("backup", "verify", "quick", "--point", taken[-1], "--repo", str(repo))


def at_the_limit(wm: Waymark, tmp_path: Path, checkpoints: int) -> dict[str, Any]:
    """VM ``lim`` (at most 2 checkpoints) backed up, then with ``checkpoints`` checkpoints."""
    make_vm(wm, "lim", "1M", (0, 64 * KIB, 0x07))
    wm("vm", "set", "lim", "--max-checkpoints", "2")
    repo = init_repo(wm, tmp_path / "repo")
    backup(wm, repo, "lim")
    qemu_io_write(active(wm, "lim"), "qcow2", 0, 64 * KIB, 0x08)
    for n in range(checkpoints):
        wm("checkpoint", "create", "lim", "--name", f"c{n}")
    return {"repo": repo, "tree": wm.json("checkpoint", "list", "lim"),
            "files": tree_files(wm.home), "now": content_sha256(active(wm, "lim"))}


def assert_limit_refused(wm: Waymark, before: dict[str, Any], *how: str) -> None:
    refused = wm.run("backup", "restore", "lim", "--repo", str(before["repo"]), *how)
    assert_error(refused, 6, "limit")
    assert wm.json("checkpoint", "list", "lim") == before["tree"], f"{how} changed the tree"
    assert tree_files(wm.home) == before["files"], f"{how} changed files"
    assert content_sha256(active(wm, "lim")) == before["now"]


def test_a_restore_past_the_checkpoint_limit_is_refused(wm: Waymark, tmp_path: Path) -> None:
    """The restored disks become a checkpoint: a VM at its limit cannot take it."""
    before = at_the_limit(wm, tmp_path, 2)
    assert_limit_refused(wm, before, "--discard-current")
    assert_limit_refused(wm, before, "--checkpoint-first")
    assert_clean(wm)


def test_a_restore_refused_for_the_limit_leaves_no_safety_checkpoint(wm: Waymark,
                                                                     tmp_path: Path) -> None:
    before = at_the_limit(wm, tmp_path, 1)  # room for the safety checkpoint, not for both
    assert_limit_refused(wm, before, "--checkpoint-first")


# --- 3. without Waymark; a moved repository ---------------------------------------------------

def test_stock_qemu_img_restores_a_point(backed_up: dict[str, Any], tmp_path: Path) -> None:
    repo, point = backed_up["repo"], backed_up["point"]
    (disk,) = manifests(repo)[point["id"]]["disks"]
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(repo / disk["file"])], check=True,
        capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info, info
    out = tmp_path / "out.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(repo / disk["file"]), str(out)],
                   check=True, capture_output=True)
    assert content_sha256(out) == backed_up["at_backup"]


def test_a_moved_repository_still_lists_verifies_and_restores(
        wm: Waymark, backed_up: dict[str, Any], tmp_path: Path) -> None:
    repo, point = backed_up["repo"], backed_up["point"]
    files = tree_files(repo)
    moved = tmp_path / "elsewhere" / "mounted-here"
    moved.parent.mkdir()
    shutil.move(repo, moved)
    assert not repo.exists() and tree_files(moved) == files

    rows = wm.json("backup", "list", "--repo", str(moved))
    assert [r["id"] for r in rows] == [point["id"]]
    assert rows[0]["repository"] == str(moved)
    verify_ok(wm, moved)
    made = wm.json("backup", "restore", VM, "--repo", str(moved), "--as-new", "from-moved")
    shown = wm.json("vm", "show", made["restored_as"]["id"])
    assert content_sha256(shown["disks"][0]["active_image"]) == backed_up["at_backup"]
    # and backing up into it again works from there
    (again,) = backup(wm, moved, VM)
    assert listed(wm, moved) == {point["id"], again["id"]}
    assert point_content(moved, again) == backed_up["changed"]
    assert disk_files(moved) == named_files(moved)
    assert_clean(wm)


# --- 4. damage --------------------------------------------------------------------------------

def test_a_damaged_point_is_named_by_verify_and_refused_by_restore(
        wm: Waymark, backed_up: dict[str, Any]) -> None:
    repo, point = backed_up["repo"], backed_up["point"]
    (needs_it,) = backup(wm, repo, VM)  # an incremental on the point about to be damaged
    (good,) = backup(wm, repo, VM, full=True)  # a second, sound and self-sufficient point
    assert good["kind"] == "full" and good["reason"] == "--full was asked", good
    (disk,) = manifests(repo)[point["id"]]["disks"]
    flip_middle_byte(repo / disk["file"])

    checked = wm.run("backup", "verify", "--repo", str(repo))
    assert_error(checked, None, point["id"])
    assert good["id"] not in checked.stderr, checked
    lines = checked.stdout.splitlines()
    (bad_line,) = [line for line in lines if line.startswith(point["id"])]
    assert "DAMAGED" in bad_line and disk["file"] in bad_line, bad_line
    (good_line,) = [line for line in lines if line.startswith(good["id"])]
    assert good_line.endswith(": ok"), good_line
    as_json = json_documents(wm.run("backup", "verify", "--repo", str(repo), "--json").stdout)[0]
    problems = {r["id"]: r["problems"] for r in as_json}
    assert problems[good["id"]] == []
    assert len(problems[point["id"]]) == 1 and disk["file"] in problems[point["id"]][0]
    only = wm.run("backup", "verify", VM, "--point", point["id"], "--repo", str(repo))
    assert_error(only, None, point["id"])
    verify_ok(wm, repo, "--point", good["id"])
    # a point's verify covers the points it needs: the incremental is damaged through its parent
    through = wm.run("backup", "verify", "--repo", str(repo), "--point", needs_it["id"], "--json")
    rows = {r["id"]: r["problems"] for r in json_documents(through.stdout)[0]}
    assert through.returncode != 0 and set(rows) == {point["id"], needs_it["id"]}, through
    assert rows[needs_it["id"]] == [] and disk["file"] in rows[point["id"]][0], rows

    home, repo_files = tree_files(wm.home), tree_files(repo)
    vms, tree = wm.json("vm", "list"), wm.json("checkpoint", "list", VM)
    for ref, how in ((point["id"], ("--as-new", "from-damaged")),
                     (point["id"], ("--discard-current",)),
                     (needs_it["id"], ("--checkpoint-first",))):  # damaged through its parent
        refused = wm.run("backup", "restore", VM, "--repo", str(repo), "--point", ref, *how)
        assert_error(refused, EXIT_IMAGE, point["id"], disk["file"], "damaged")
        assert tree_files(wm.home) == home, f"{how}: the refused restore changed the home"
        assert tree_files(repo) == repo_files
        assert wm.json("vm", "list") == vms
        assert wm.json("checkpoint", "list", VM) == tree
    assert content_sha256(active(wm)) == backed_up["changed"]
    # the sound point still restores
    made = wm.json("backup", "restore", VM, "--repo", str(repo), "--point", good["id"],
                   "--as-new", "from-good")
    shown = wm.json("vm", "show", made["restored_as"]["id"])
    assert content_sha256(shown["disks"][0]["active_image"]) == backed_up["changed"]
    assert_clean(wm)


def test_a_carried_kernel_is_stored_once_and_a_damaged_copy_is_replaced(
        wm: Waymark, tmp_path: Path) -> None:
    """Each point carries the VM's kernel and initrd: a second point finds the copies already
    there (by content) and leaves them as they are, not written again; a copy damaged on the
    storage is not taken for the file, the next point stores a good one in its place."""
    host = tmp_path / "host"
    host.mkdir()
    for name in ("kernel", "initrd"):
        (host / name).write_bytes(f"a {name}\n".encode() * 1000)
    wm("vm", "create", VM, "--disk", "1M", "--kernel", str(host / "kernel"), "--initrd",
       str(host / "initrd"))
    repo = init_repo(wm, tmp_path / "repo")
    first = backup(wm, repo, VM)[0]
    carried = manifests(repo)[first["id"]]["vm_files"]
    kernel = repo / carried["kernel"]["file"]
    before = kernel.stat()

    second = backup(wm, repo, VM)[0]
    assert manifests(repo)[second["id"]]["vm_files"] == carried
    after = kernel.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    os.chmod(kernel, 0o600)
    flip_middle_byte(kernel)
    third = backup(wm, repo, VM)[0]
    assert manifests(repo)[third["id"]]["vm_files"] == carried
    assert file_sha256(kernel) == carried["kernel"]["sha256"]
    verify_ok(wm, repo)


def test_a_link_planted_at_a_carried_kernels_name_is_refused_never_followed(
        wm: Waymark, tmp_path: Path) -> None:
    """A repository is untrusted: a symbolic link where the kernel's copy is (to a host file
    of the same content) is neither taken for the copy nor written through: the next run is
    refused, naming the file, and changes nothing; the host file is untouched."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "kernel").write_bytes(b"a kernel\n" * 1000)
    wm("vm", "create", VM, "--disk", "1M", "--kernel", str(host / "kernel"))
    repo = init_repo(wm, tmp_path / "repo")
    first = backup(wm, repo, VM)[0]
    kernel = repo / manifests(repo)[first["id"]]["vm_files"]["kernel"]["file"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"a kernel\n" * 1000)
    before = elsewhere.stat()
    kernel.unlink()
    kernel.symlink_to(elsewhere)

    refused = wm.run("backup", "run", VM, "--repo", str(repo), "--json")
    assert refused.returncode == 8 and "a symbolic link" in refused.stderr, refused
    assert list(manifests(repo)) == [first["id"]] and kernel.is_symlink()
    after = elsewhere.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_mode) == \
        (before.st_ino, before.st_mtime_ns, before.st_mode)


def test_a_link_planted_as_a_disks_folder_is_refused_nothing_written_through_it(
        wm: Waymark, tmp_path: Path) -> None:
    """The folder a disk's point files go to, planted as a symbolic link to a host folder: the
    run is refused naming it (exit 8), writes nothing there and records no point; the next run,
    the link gone, is a full point as if none was tried."""
    vm_id = make_vm(wm, VM, "2M", (0, 256 * KIB, 0x5A))
    disk_id = wm.json("vm", "show", VM)["disks"][0]["id"]
    repo = init_repo(wm, tmp_path / "repo")
    host = tmp_path / "host"
    host.mkdir()
    folder = repo / "vms" / vm_id / "disks" / disk_id
    folder.parent.mkdir(parents=True)
    folder.symlink_to(host)

    refused = wm.run("backup", "run", VM, "--repo", str(repo), "--json")
    assert refused.returncode == EXIT_IMAGE and "a symbolic link" in refused.stderr, refused
    assert list(host.iterdir()) == [] and manifests(repo) == {}
    # planted after the run's checks of its folders, the link is caught as the file is made
    with pytest.raises(ImageError, match="leads outside"):
        Repository.open(repo).new_file(folder / "point.qcow2.tmp")
    assert list(host.iterdir()) == []
    folder.unlink()
    point = backup(wm, repo, VM)[0]
    assert point["kind"] == "full" and list(host.iterdir()) == []


def test_a_run_failing_in_its_storage_daemon_leaves_the_change_tracking_saved(
        wm: Waymark, tmp_path: Path) -> None:
    """A run of a VM that is off failing once its copy began (an unexpected error there) stops
    its storage daemon with SIGTERM, not SIGKILL: the daemon saves the disk's bitmap (not left
    in use, as a kill leaves it), its temporary file is gone and no point is recorded."""
    make_vm(wm, VM, "2M", (0, 256 * KIB, 0x3C))
    repo = init_repo(wm, tmp_path / "repo")
    first = backup(wm, repo, VM)[0]

    failed = wm.run("backup", "run", VM, "--repo", str(repo), "--json",
                    env=wm.env(WAYMARK_FAILPOINT_RAISE="backup-started"))
    assert failed.returncode != 0 and "RuntimeError" in failed.stderr, failed
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(active(wm))], check=True,
        capture_output=True, text=True).stdout)
    (bitmap,) = info["format-specific"]["data"]["bitmaps"]
    assert "in-use" not in bitmap["flags"], bitmap
    assert list(manifests(repo)) == [first["id"]]
    assert not list(repo.rglob("*.tmp")), list(repo.rglob("*"))


# --- 5. several VMs in one run ----------------------------------------------------------------

def test_one_failing_vm_does_not_stop_the_others(wm: Waymark, tmp_path: Path) -> None:
    contents = {}
    for name, pattern in (("alpha", 0x0A), ("broken", 0x0B), ("gamma", 0x0C)):
        make_vm(wm, name, "2M", (0, 256 * KIB, pattern))
        contents[name] = content_sha256(active(wm, name))
    lost = active(wm, "broken")
    lost.unlink()
    repo = init_repo(wm, tmp_path / "repo")

    result = wm.run("backup", "run", "alpha", "broken", "nope", "gamma", "--repo", str(repo),
                    "--json")
    assert result.returncode != 0, result
    assert "Traceback" not in result.stdout + result.stderr, result
    assert_error(result, None, "broken", "nope")
    rows = json_documents(result.stdout)[0]
    assert [(r["vm"], r["ok"]) for r in rows] == \
        [("alpha", True), ("broken", False), ("nope", False), ("gamma", True)], rows
    by_vm = {r["vm"]: r for r in rows}
    assert str(lost) in by_vm["broken"]["error"] and by_vm["broken"]["point"] is None
    assert "'nope'" in by_vm["nope"]["error"] and by_vm["nope"]["point"] is None
    points = {r["vm_name"]: r for r in wm.json("backup", "list", "--repo", str(repo))}
    assert set(points) == {"alpha", "gamma"}
    for name in ("alpha", "gamma"):
        assert points[name]["id"] == by_vm[name]["point"]["id"]
        assert point_content(repo, points[name]) == contents[name]
    verify_ok(wm, repo)
    assert temporary_files(repo) == [] and disk_files(repo) == named_files(repo)
    assert_error(wm.run("backup", "list", "broken", "--repo", str(repo)), EXIT_NOT_FOUND)

    # the text output names each VM's outcome too
    text = wm.run("backup", "run", "gamma", "broken", "--repo", str(repo))
    assert text.returncode != 0
    assert text.stdout.startswith("gamma: point "), text.stdout
    assert "broken: FAILED: " in text.stdout, text.stdout
    assert len(listed(wm, repo, "gamma")) == 2


def schedule_due(wm: Waymark, name: str, keep: str | None = None) -> None:
    """Make the schedule ``name`` due now (its ``keep`` column replaced when given)."""
    with sqlite3.connect(wm.home / "catalog.db") as db:
        db.execute("UPDATE schedules SET next_due_at = '2000-01-01 00:00:00.000000', "
                   "keep = coalesce(?, keep) WHERE name = ?", (keep, name))


def last_run(wm: Waymark, name: str, timeout: float = 60) -> dict[str, Any]:
    """The schedule ``name`` as ``backup schedule list`` shows it once a run of it finished
    (the catalog is polled: quicker than the CLI)."""
    deadline = time.monotonic() + timeout
    while query(wm.home, "SELECT 1 FROM schedules WHERE name = ? AND last_run_at IS NOT NULL "
                         "AND claimed_pid IS NULL", name) == []:
        assert time.monotonic() < deadline, f"schedule {name} did not run within {timeout} s"
        time.sleep(0.2)
    [row] = [r for r in wm.json("backup", "schedule", "list") if r["name"] == name]
    assert not row["running"], row
    return row


def test_a_schedule_run_that_raises_is_recorded_and_the_server_carries_on(
        wm: Waymark, tmp_path: Path) -> None:
    for vm in ("first", "second"):
        make_vm(wm, vm, "1M", (0, 64 * KIB, 0x31))
    repo = init_repo(wm, tmp_path / "repo")
    for vm in ("first", "second"):
        wm("backup", "schedule", "add", vm, "--vm", vm, "--repo", str(repo), "--daily", "03:00")
    # a retention rule this version does not know (as a newer Waymark would write it): the run
    # raises a TypeError, no Waymark error
    schedule_due(wm, "first", keep='{"last": 2, "hourly": 3}')

    with serve_process(wm, options=("--schedule-every", "1"), schedules=True):
        failed = last_run(wm, "first")
        assert "unexpected error (TypeError" in failed["last_result"]["error"], failed
        assert failed["next_due_at"] > failed["last_run_at"]
        listed_text = wm("backup", "schedule", "list").stdout
        assert re.search(r"^first .* FAILED: unexpected error \(TypeError", listed_text, re.M), \
            listed_text
        schedule_due(wm, "second")  # the same server's scheduler still runs what is due
        ran = last_run(wm, "second")
    [outcome] = ran["last_result"]["vms"]
    assert outcome["vm_name"] == "second" and outcome["error"] is None and outcome["point_id"]
    assert [p["id"] for p in wm.json("backup", "list", "--repo", str(repo))] == \
        [outcome["point_id"]]
    log = (wm.home.parent / "serve.log").read_text()
    assert "backup schedule first failed" in log and "TypeError" in log, log


def test_a_run_recorded_by_an_older_waymark_is_shown_in_todays_names(wm: Waymark,
                                                                      tmp_path: Path) -> None:
    """``run-due`` answers in the vocabulary (docs/api.md); a schedule's last run recorded
    before it (``schedule``, ``vm``, ``point``) is shown in the same names, here and as text."""
    vm_id = make_vm(wm, "old", "1M", (0, 64 * KIB, 0x32))
    repo = init_repo(wm, tmp_path / "repo")
    wm("backup", "schedule", "add", "nightly", "--vm", "old", "--repo", str(repo), "--daily",
       "03:00")
    schedule_due(wm, "nightly")
    [run] = wm.json("backup", "run-due")
    [outcome] = run["vms"]
    assert set(run) == {"schedule_name", "due_at", "vms"} and run["schedule_name"] == "nightly"
    assert (outcome["vm_name"], outcome["vm_id"], outcome["error"]) == ("old", vm_id, None)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", run["due_at"]), run
    [row] = wm.json("backup", "schedule", "list")
    assert row["last_result"] == run and row["repository"] == str(repo), row
    older = {"schedule": "nightly", "due_at": run["due_at"],
             "vms": [{"vm": "old", "vm_id": vm_id, "point": None, "error": "disk full"}]}
    with sqlite3.connect(wm.home / "catalog.db") as db:
        db.execute("UPDATE schedules SET last_result = ?", (json.dumps(older),))
    [row] = wm.json("backup", "schedule", "list")
    assert row["last_result"] == {"schedule_name": "nightly", "due_at": run["due_at"], "vms": [
        {"vm_name": "old", "vm_id": vm_id, "point_id": None, "error": "disk full"}]}, row
    assert "FAILED: old: disk full" in wm("backup", "schedule", "list").stdout


# --- 6. a SIGKILLed run -----------------------------------------------------------------------

def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(") ")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(") ")[2][:1] != "Z"


def images_equal(a: Path, b: Path) -> bool:
    """The two images' content is the same (``qemu-img compare``: quicker than hashing 1 GiB)."""
    done = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b)],
                          capture_output=True, text=True, check=False)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


def test_a_sigkilled_run_leaves_the_earlier_points_and_the_next_run_cleans_up(
        wm: Waymark, tmp_path: Path) -> None:
    make_vm(wm, "small", "1M", (0, 64 * KIB, 0x21))
    make_vm(wm, "big", "1G", (0, 8 * MIB, 0x22))
    repo = init_repo(wm, tmp_path / "repo")
    earlier = backup(wm, repo, "small", "big")
    qemu_io_write(active(wm, "big"), "qcow2", 16 * MIB, 600 * MIB, 0x23)
    files = tree_files(repo / "vms")

    argv = [sys.executable, "-m", "waymark", "backup", "run", "small", "big", "--repo", str(repo)]
    proc = subprocess.Popen(argv, env=wm.env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    helpers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not _copying_big(repo, earlier):
            assert proc.poll() is None, "the run finished before a temporary file was seen"
            assert time.monotonic() < deadline, "no temporary file within 60 s"
            time.sleep(0.005)
        helpers = children_of(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        _after_the_kill(wm, repo, earlier, files, helpers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in helpers:  # the killed run's qemu-img, if it still runs: wait, then end it
            deadline = time.monotonic() + 30
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _after_the_kill(wm: Waymark, repo: Path, earlier: list[dict[str, Any]],
                    files: dict[str, str], helpers: list[int]) -> None:
    killed_at = [str(p.relative_to(repo)) for p in temporary_files(repo)]
    print(f"killed while writing {killed_at}; orphaned helpers {helpers}")
    assert killed_at, "the temporary file is gone"

    # before any cleanup: the earlier points are intact; the killed run's point of small (done
    # before big's began) is whole, its point of big does not exist
    rows = {r["id"]: r["vm_name"] for r in wm.json("backup", "list", "--repo", str(repo))}
    killed_run = set(rows) - {p["id"] for p in earlier}
    assert set(rows) >= {p["id"] for p in earlier}, rows
    assert [rows[i] for i in killed_run] == ["small"], rows
    verify_ok(wm, repo)
    assert {k: v for k, v in tree_files(repo / "vms").items() if k in files} == files

    # the next run removes what the killed one left, and succeeds (the orphaned qemu-img may
    # still be writing its unlinked file)
    after = backup(wm, repo, "small", "big")
    assert listed(wm, repo) == set(rows) | {p["id"] for p in after}
    verify_ok(wm, repo)
    assert temporary_files(repo) == []
    assert disk_files(repo) == named_files(repo), \
        f"files no manifest names: {disk_files(repo) - named_files(repo)}"
    (big_disk,) = manifests(repo)[after[1]["id"]]["disks"]
    assert images_equal(repo / big_disk["file"], active(wm, "big"))
    assert point_content(repo, after[0]) == point_content(repo, earlier[0])
    assert_clean(wm)


def _copying_big(repo: Path, earlier: list[dict[str, Any]]) -> bool:
    """A temporary file of the big VM's disk exists (the small VM's copy is too quick)."""
    big = earlier[1]["vm_id"]
    return any(p.relative_to(repo).parts[1] == big for p in temporary_files(repo))


# --- 7. a full backup file system -------------------------------------------------------------

@pytest.fixture
def small_repo(tmp_path: Path) -> Iterator[Path]:
    """A folder on a 20 MiB tmpfs (unmounted at the end)."""
    with tmpfs(tmp_path / "usb", "20m") as mount:
        yield mount / "repo"


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill_past_the_repository(wm: Waymark, repo: Path) -> tuple[dict[str, Any], Result]:
    """A first point of 4 MiB fits; then the disk holds 34 MiB and the next run fails."""
    init_repo(wm, repo)
    make_vm(wm, "tight", "64M", (0, 4 * MIB, 0x31))
    (first,) = backup(wm, repo, "tight")
    qemu_io_write(active(wm, "tight"), "qcow2", 4 * MIB, 30 * MIB, 0x32)
    free = free_bytes(repo)
    failed = wm.run("backup", "run", "tight", "--repo", str(repo))
    assert free_bytes(repo) >= free - 64 * KIB, "the failed run left files taking space"
    return first, failed


def test_a_full_backup_file_system_fails_cleanly(wm: Waymark, small_repo: Path) -> None:
    repo = small_repo
    first, failed = fill_past_the_repository(wm, repo)
    assert failed.returncode != 0, failed
    assert "Traceback" not in failed.stdout + failed.stderr, failed
    assert error_text(failed).startswith("error: "), failed
    assert "no space left" in (failed.stdout + failed.stderr).lower(), failed
    assert listed(wm, repo) == {first["id"]}
    verify_ok(wm, repo)
    assert temporary_files(repo) == []
    assert disk_files(repo) == named_files(repo)
    assert_clean(wm)


def test_a_full_backup_file_system_exits_with_the_storage_code(wm: Waymark, small_repo: Path
                                                               ) -> None:
    _, failed = fill_past_the_repository(wm, small_repo)
    assert failed.returncode == EXIT_STORAGE, failed
    assert "space" in failed.stderr.lower(), failed.stderr
