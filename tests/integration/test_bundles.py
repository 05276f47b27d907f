"""``checkpoint export`` and ``vm import``: a bundle holds one checkpoint's disks and
configuration; an import makes a new VM with new ids and files, after verifying every checksum,
and a damaged or incomplete bundle changes nothing."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from tests.helpers import Result, Waymark, content_sha256, qemu_io_write

KIB, MIB = 1 << 10, 1 << 20
VM = "exporter"


def active(wm: Waymark, vm: str = VM) -> str:
    """The VM's active image, read from the catalog."""
    con = sqlite3.connect(wm.home / "catalog.db")
    try:
        ((path,),) = con.execute("SELECT i.path FROM disks d JOIN images i "
                                 "ON i.id = d.active_image_id JOIN vms v ON v.id = d.vm_id "
                                 "WHERE v.name = ?", (vm,)).fetchall()
    finally:
        con.close()
    return str(path)


def home_files(wm: Waymark) -> set[str]:
    """Every file under the home but SQLite's transient ones."""
    return {str(p) for p in wm.home.rglob("*")
            if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def exported(wm: Waymark, tmp_path: Path) -> dict[str, Any]:
    """VM with checkpoints A <- X and more data in Now; X exported into ``tmp_path/bundle``."""
    vm_id = wm.json("vm", "create", VM, "--disk", "3M", "--memory", "256M", "--cpus", "2")["id"]
    qemu_io_write(Path(active(wm)), "qcow2", 0, 64 * KIB, 0x01)
    wm("checkpoint", "create", VM, "--name", "A")
    qemu_io_write(Path(active(wm)), "qcow2", MIB, 128 * KIB, 0x02)
    x = wm.json("checkpoint", "create", VM, "--name", "X")
    qemu_io_write(Path(active(wm)), "qcow2", 2 * MIB, 64 * KIB, 0x03)  # not in X
    bundle = tmp_path / "bundle"
    out = wm.json("checkpoint", "export", VM, "X", str(bundle))
    return {"vm_id": vm_id, "x": x, "bundle": bundle, "manifest": out["manifest"],
            "x_sha": content_sha256(x["disks"][0]["frozen_image"])}


def assert_refused(wm: Waymark, result: Result, code: int | None, before: dict[str, Any]
                   ) -> None:
    if code is None:
        assert result.returncode != 0, result.stdout
    else:
        assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert wm.json("vm", "list") == before["vms"]
    assert home_files(wm) == before["files"], "a refused import left files in the home"


def test_export_then_import_makes_a_new_vm_with_the_checkpoints_content(
        wm: Waymark, tmp_path: Path) -> None:
    src = exported(wm, tmp_path)
    bundle = src["bundle"]
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert files == ["configuration.json", "disks/disk0.qcow2", "manifest.json"]
    assert src["manifest"]["source"]["checkpoint_id"] == src["x"]["id"]
    assert content_sha256(bundle / "disks/disk0.qcow2") == src["x_sha"]
    info = subprocess.run(["qemu-img", "info", "--output=json", str(bundle / "disks/disk0.qcow2")],
                          check=True, capture_output=True, text=True).stdout
    assert "backing-filename" not in json.loads(info), "a bundle disk must stand alone"
    old_files = home_files(wm)

    new = wm.json("vm", "import", str(bundle), "--name", "copy")

    assert new["name"] == "copy" and new["id"] != src["vm_id"]
    assert (new["memory_mib"], new["cpus"]) == (256, 2)
    assert new["checkpoint_count"] == 0 and new["current_checkpoint_id"] is None
    disk = new["disks"][0]
    assert Path(disk["active_image"]).parent == wm.home / "vms" / new["id"] / "disks"
    names_before = {Path(p).name for p in old_files}
    assert Path(disk["active_image"]).name not in names_before, "an imported file name is reused"
    assert disk["id"] not in {d["id"] for d in wm.json("vm", "show", VM)["disks"]}
    assert content_sha256(disk["active_image"]) == src["x_sha"]
    # the source VM is untouched, and the copy lives on its own
    assert {c["id"] for c in wm.json("checkpoint", "list", VM)["checkpoints"]} == \
        {src["x"]["id"], wm.json("checkpoint", "show", VM, "A")["id"]}
    shutil.rmtree(bundle)
    assert active(wm, "copy") == disk["active_image"]
    assert content_sha256(disk["active_image"]) == src["x_sha"]
    assert wm.run("check").returncode == 0


def test_damaged_or_incomplete_bundles_are_refused(wm: Waymark, tmp_path: Path) -> None:
    src = exported(wm, tmp_path)
    before = {"vms": wm.json("vm", "list"), "files": home_files(wm)}

    disk_flip = tmp_path / "disk-flip"
    shutil.copytree(src["bundle"], disk_flip)
    image = disk_flip / "disks" / "disk0.qcow2"
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))
    result = wm.run("vm", "import", str(disk_flip), "--name", "flipped")
    assert_refused(wm, result, 8, before)
    assert "checksum" in result.stderr

    config_flip = tmp_path / "config-flip"
    shutil.copytree(src["bundle"], config_flip)
    config = config_flip / "configuration.json"
    text = bytearray(config.read_bytes())
    text[text.index(b"256")] = ord("9")  # still valid JSON: only the checksum can tell
    config.write_bytes(bytes(text))
    result = wm.run("vm", "import", str(config_flip), "--name", "flipped")
    assert_refused(wm, result, 8, before)
    assert "configuration.json" in result.stderr

    unfinished = tmp_path / "unfinished"
    shutil.copytree(src["bundle"], unfinished)
    (unfinished / "manifest.json").unlink()
    result = wm.run("vm", "import", str(unfinished), "--name", "unfinished")
    assert_refused(wm, result, None, before)
    assert "manifest.json" in result.stderr

    # the same name as an existing VM, without --name
    result = wm.run("vm", "import", str(src["bundle"]))
    assert_refused(wm, result, 5, before)
    assert "--name" in result.stderr

    # exporting into a folder that holds something is refused, and the folder kept as it was
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    result = wm.run("checkpoint", "export", VM, "X", str(busy))
    assert_refused(wm, result, 5, before)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert (busy / "keep.txt").read_text() == "mine"
