"""``waymark vm``: create, list, show, set, delete, ``vm disk add|remove``, via the real CLI."""

from __future__ import annotations

import fcntl
import json
import os
import re
import sqlite3
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import Waymark, content_sha256, file_sha256, qemu_io_write, query, served

MIB = 1 << 20
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def make_image(path: Path, fmt: str, size: str = "2M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
    return path


def image_info(path: str | Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def assert_pinned_base(disk: dict[str, Any], user: Path, fmt: str, size: int,
                       disk_folder: Path) -> None:
    """``disk`` is a Waymark qcow2 overlay whose backing file is the user's ``user``."""
    assert disk["passthrough"] is False
    assert disk["base_image"] == str(user)
    assert disk["base_pinned"] is True
    assert disk["virtual_size"] == size
    assert disk["chain_depth"] == 2
    assert Path(disk["active_image"]).parent == disk_folder
    overlay = image_info(disk["active_image"])
    assert overlay["format"] == "qcow2"
    assert overlay["backing-filename"] == str(user)
    assert overlay["backing-filename-format"] == fmt


def test_create_with_each_kind_of_disk(wm: Waymark, tmp_path: Path) -> None:
    user_qcow2 = make_image(tmp_path / "user.qcow2", "qcow2", "2M")
    qemu_io_write(user_qcow2, "qcow2", 0, 64 * 1024, 0x5A)
    user_raw = make_image(tmp_path / "user.raw", "raw", "3M")
    device = make_image(tmp_path / "device.raw", "raw", "1M")
    originals = {p: file_sha256(p) for p in (user_qcow2, user_raw, device)}

    created = wm("vm", "create", "web", "--memory", "1G", "--cpus", "2", "--disk", "4M",
                 "--disk", str(user_qcow2), "--disk", str(user_raw),
                 "--disk", f"{device},passthrough=on")
    assert re.fullmatch(r"Created VM web \([0-9a-f]{12}\) with 4 disk\(s\)\.\n", created.stdout)

    vm = wm.json("vm", "show", "web")
    assert vm["name"] == "web"
    assert vm["state"] == "off"
    assert (vm["memory_mib"], vm["cpus"]) == (1024, 2)
    assert vm["checkpoint_type"] == "production"
    assert vm["max_checkpoints"] == 50
    assert vm["checkpoint_count"] == 0
    assert vm["current_checkpoint_id"] is None
    assert vm["detached_disks"] == []
    assert RFC3339_UTC.match(vm["created_at"])
    disk_folder = wm.home / "vms" / vm["id"] / "disks"
    assert vm["checkpoint_dir"] == str(wm.home / "vms" / vm["id"] / "checkpoints")

    new, on_qcow2, on_raw, passthrough = vm["disks"]
    assert len({d["id"] for d in vm["disks"]}) == 4
    assert all(d["attached"] for d in vm["disks"])

    # --disk SIZE: a new qcow2 that Waymark owns, inside the home
    assert new["passthrough"] is False
    assert Path(new["active_image"]).parent == disk_folder
    assert new["base_image"] == new["active_image"]
    assert new["base_pinned"] is False
    assert new["virtual_size"] == 4 * MIB
    assert new["chain_depth"] == 1
    info = image_info(new["active_image"])
    assert (info["format"], info["virtual-size"]) == ("qcow2", 4 * MIB)
    assert "backing-filename" not in info

    # --disk PATH: the user's file is the read-only (pinned) base of a Waymark overlay
    assert_pinned_base(on_qcow2, user_qcow2, "qcow2", 2 * MIB, disk_folder)
    assert_pinned_base(on_raw, user_raw, "raw", 3 * MIB, disk_folder)
    assert content_sha256(on_qcow2["active_image"]) == content_sha256(user_qcow2)

    # --disk PATH,passthrough=on: attached as is, no image of Waymark's
    assert passthrough["passthrough"] is True
    assert passthrough["active_image"] is None
    assert passthrough["path"] == str(device)

    # writing through the overlay leaves the user's file alone
    qemu_io_write(Path(on_qcow2["active_image"]), "qcow2", 0, 64 * 1024, 0x77)
    assert content_sha256(on_qcow2["active_image"]) != content_sha256(user_qcow2)
    assert {p: file_sha256(p) for p in originals} == originals

    text = wm("vm", "show", "web").stdout
    assert f"VM web  ({vm['id']})" in text
    assert "memory: 1024 MiB   cpus: 2" in text
    assert f"base {user_qcow2} (pinned)" in text
    assert f"pass-through  {device}" in text


def test_list_and_refer_to_a_vm_by_name_or_id_prefix(wm: Waymark) -> None:
    beta = wm.json("vm", "create", "beta", "--memory", "256", "--cpus", "3")
    alpha = wm.json("vm", "create", "alpha", "--checkpoint-type", "standard")

    listed = wm.json("vm", "list")
    assert [row["name"] for row in listed] == ["alpha", "beta"]
    assert listed[0] == {"id": alpha["id"], "name": "alpha", "state": "off", "memory_mib": 512,
                         "cpus": 1, "checkpoint_type": "standard", "checkpoint_count": 0}
    assert listed[1]["id"] == beta["id"]
    assert (listed[1]["memory_mib"], listed[1]["cpus"]) == (256, 3)

    text = wm("vm", "list").stdout.splitlines()
    assert text[0].split() == ["NAME", "STATE", "MEMORY", "CPUS", "CHECKPOINTS", "ID"]
    assert text[1].split() == ["alpha", "off", "512M", "1", "0", alpha["id"][:12]]
    assert text[2].split() == ["beta", "off", "256M", "3", "0", beta["id"][:12]]

    assert wm.json("vm", "show", beta["id"][:8])["name"] == "beta"


def test_home_flag_and_environment_variable(wm: Waymark, tmp_path: Path) -> None:
    other = tmp_path / "other-home"

    # --home wins over WAYMARK_HOME (which the fixture points at wm.home)
    wm.run("--home", str(other), "vm", "create", "elsewhere").ok()
    assert (other / "catalog.db").is_file()
    assert wm.json("vm", "list") == []

    via_env = wm.run("vm", "list", "--json", env=wm.env(WAYMARK_HOME=str(other))).ok().json()
    assert [row["name"] for row in via_env] == ["elsewhere"]


def test_set_changes_settings_and_checkpoint_dir_only_without_checkpoints(
        wm: Waymark, tmp_path: Path) -> None:
    wm("vm", "create", "web", "--disk", "1M")
    folder, other = tmp_path / "checkpoints", tmp_path / "elsewhere"

    vm = wm.json("vm", "set", "web", "--memory", "2G", "--cpus", "4", "--checkpoint-type",
                 "standard", "--max-checkpoints", "7", "--checkpoint-dir", str(folder))
    assert (vm["memory_mib"], vm["cpus"]) == (2048, 4)
    assert vm["checkpoint_type"] == "standard"
    assert vm["max_checkpoints"] == 7
    assert vm["checkpoint_dir"] == str(folder)

    ckpt = wm.json("checkpoint", "create", "web")
    assert (folder / f"{ckpt['id']}.json").is_file()

    refused = wm.run("vm", "set", "web", "--memory", "1G", "--checkpoint-dir", str(other))
    assert refused.returncode == 5, refused
    assert "has checkpoints" in refused.stderr
    after = wm.json("vm", "show", "web")
    assert after["checkpoint_dir"] == str(folder)
    assert after["memory_mib"] == 2048, "a refused vm set must not apply its other options"
    assert not other.exists()


def test_disk_add_and_remove(wm: Waymark, tmp_path: Path) -> None:
    user = make_image(tmp_path / "user.qcow2", "qcow2", "1M")
    device = make_image(tmp_path / "device.raw", "raw", "1M")
    first = wm.json("vm", "create", "web", "--disk", "1M")["disks"][0]

    new = wm.json("vm", "disk", "add", "web", "2M")
    assert new["passthrough"] is False
    assert new["virtual_size"] == 2 * MIB
    assert new["base_pinned"] is False
    assert Path(new["active_image"]).is_file()

    pinned = wm.json("vm", "disk", "add", "web", str(user))
    assert pinned["base_image"] == str(user)
    assert pinned["base_pinned"] is True
    assert image_info(pinned["active_image"])["backing-filename"] == str(user)

    passthrough = wm.json("vm", "disk", "add", "web", f"{device},passthrough=on")
    assert passthrough["passthrough"] is True
    assert passthrough["path"] == str(device)

    # a disk is named by an id prefix
    removed = wm.json("vm", "disk", "remove", "web", new["id"][:8])  # the disk, as disk add

    vm = wm.json("vm", "show", "web")
    assert [d["id"] for d in vm["disks"]] == [first["id"], pinned["id"], passthrough["id"]]
    [detached] = vm["detached_disks"]
    assert removed == detached
    assert detached["id"] == new["id"]
    assert detached["attached"] is False
    assert detached["active_image"] == new["active_image"]
    assert Path(new["active_image"]).is_file(), "a detached disk keeps its files"


def test_delete_removes_only_waymark_files(wm: Waymark, tmp_path: Path) -> None:
    user = make_image(tmp_path / "user.qcow2", "qcow2", "2M")
    qemu_io_write(user, "qcow2", 0, 64 * 1024, 0x42)
    device = make_image(tmp_path / "device.raw", "raw", "1M")
    folder = tmp_path / "checkpoints"
    originals = {p: file_sha256(p) for p in (user, device)}
    vm_id = wm.json("vm", "create", "web", "--disk", "1M", "--disk", str(user),
                    "--disk", f"{device},passthrough=on", "--checkpoint-dir", str(folder))["id"]
    ckpt = wm.json("checkpoint", "create", "web")
    wm("vm", "disk", "remove", "web", ckpt["disks"][0]["disk_id"][:8])

    vm = wm.json("vm", "show", "web")
    made = [Path(d["active_image"]) for d in vm["disks"] + vm["detached_disks"]
            if d["active_image"]]
    made += [Path(d["frozen_image"]) for d in ckpt["disks"]]
    made.append(folder / f"{ckpt['id']}.json")
    assert all(p.is_file() for p in made)

    refused = wm.run("vm", "delete", "web")
    assert refused.returncode == 2, refused
    assert "--yes" in refused.stderr
    assert all(p.is_file() for p in made)

    assert wm.json("vm", "delete", "web", "--yes") == \
        {"deleted": [{"kind": "vm", "id": vm_id, "name": "web"}]}
    assert wm.json("vm", "list") == []
    assert not (wm.home / "vms" / vm_id).exists()
    assert not any(p.exists() for p in made)
    assert {p: file_sha256(p) for p in originals} == originals


def test_delete_needs_yes_only_for_checkpoints_or_waymark_images(
        wm: Waymark, tmp_path: Path) -> None:
    device = make_image(tmp_path / "device.raw", "raw", "1M")
    wm("vm", "create", "bare", "--disk", f"{device},passthrough=on")
    owner = wm.json("vm", "create", "owner", "--disk", "1M")

    # nothing of Waymark's to lose: no confirmation needed
    assert wm("vm", "delete", "bare").stdout == "Deleted VM bare.\n"
    assert device.is_file()

    # a disk image Waymark made counts, even without checkpoints
    refused = wm.run("vm", "delete", "owner")
    assert refused.returncode == 2, refused
    assert "1 disk image(s)" in refused.stderr
    assert Path(owner["disks"][0]["active_image"]).is_file()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_views_show_a_dead_qemu_as_off_and_change_nothing(wm: Waymark) -> None:
    """The catalog says running, but the QEMU of its run files is gone (a dead pid whose
    command line named the run folder). ``vm list``/``vm show`` (and ``GET /api/vms``) show the
    VM off and write nothing, and so does ``vm status`` while a command holds the VM's lock:
    the catalog still says running, the run files are as they were.
    The next command that takes the VM's lock (``checkpoint create``) reconciles: the catalog
    says off, the run files are gone, and why the VM stopped is recorded."""
    vm_id = wm.json("vm", "create", "dead")["id"]
    run = wm.home / "vms" / vm_id / "run"
    run.mkdir(parents=True)
    gone = subprocess.Popen(["sh", "-c", "true", str(run / "qmp.sock")])
    gone.wait()
    (run / "qemu.pid").write_text(f"{gone.pid}\n")
    (run / "qmp.sock").write_text("")
    (run / "runtime.json").write_text(json.dumps({"accelerator": "tcg"}))
    (run / "serial.log").write_text("booting\nkernel panic\n")
    with sqlite3.connect(wm.home / "catalog.db") as con:
        con.execute("UPDATE vms SET state = 'running' WHERE id = ?", (vm_id,))
    con.close()
    files = _files(run)

    assert [row["state"] for row in wm.json("vm", "list")] == ["off"]
    assert wm.json("vm", "show", "dead")["state"] == "off"
    assert wm("vm", "list").stdout.splitlines()[1].split()[:2] == ["dead", "off"]
    with served(wm) as (url, token):
        request = urllib.request.Request(f"{url}/api/vms",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert [row["state"] for row in json.loads(answer.read())] == ["off"]
    lock = os.open(wm.home / "locks" / f"{vm_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:  # a command holds the VM's lock: vm status shows what it sees and leaves it to it
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert wm.json("vm", "status", "dead")["state"] == "off"
    finally:
        os.close(lock)
    assert query(wm.home, "SELECT state FROM vms") == [("running",)], "a view wrote the state"
    assert _files(run) == files, "a view changed the run files"

    wm("checkpoint", "create", "dead", "--name", "after")
    assert query(wm.home, "SELECT state FROM vms") == [("off",)]
    assert not (run / "qemu.pid").exists() and not (run / "qmp.sock").exists()
    assert json.loads((run / "last_exit.json").read_text())["reason"] == "crashed or killed"
