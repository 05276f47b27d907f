"""``waymark check`` finds what the catalog and the files disagree on; ``--repair`` fixes only
what is safe (stray files) and never invents data (missing files, broken backing links)."""

from __future__ import annotations

import sqlite3
import subprocess
import uuid
from pathlib import Path
from typing import Any

from tests.helpers import Waymark, content_sha256, file_sha256, qemu_io_write

KIB = 1 << 10
VM = "checked"


def active_image(wm: Waymark) -> str:
    """Now's active image, read from the catalog."""
    con = sqlite3.connect(wm.home / "catalog.db")
    try:
        ((path,),) = con.execute("SELECT i.path FROM disks d JOIN images i "
                                 "ON i.id = d.active_image_id").fetchall()
    finally:
        con.close()
    return str(path)


def build(wm: Waymark) -> dict[str, Any]:
    """A VM with checkpoints A <- B <- C and Now below C, each with its own data."""
    vm_id = wm.json("vm", "create", VM, "--disk", "2M")["id"]
    frozen = {}
    for number, name in enumerate("ABC"):
        qemu_io_write(Path(active_image(wm)), "qcow2", number * 64 * KIB, 64 * KIB, 0x40 + number)
        frozen[name] = wm.json("checkpoint", "create", VM, "--name", name)["disks"][0][
            "frozen_image"]
    active = wm.json("vm", "show", VM)["disks"][0]["active_image"]
    assert active == active_image(wm)
    return {"id": vm_id, "frozen": frozen, "active": active,
            "disks": wm.home / "vms" / vm_id / "disks"}


def check(wm: Waymark, *args: str) -> tuple[int, list[dict[str, Any]]]:
    result = wm.run("check", *args, "--json")
    data = result.json()
    assert data["clean"] == (result.returncode == 0), result.stdout
    return result.returncode, data["findings"]


def kinds(findings: list[dict[str, Any]]) -> dict[str, str]:
    return {f["path"]: f["kind"] for f in findings}


def new_qcow2(path: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "2M"], check=True)


def test_clean_then_repair_removes_stray_files(wm: Waymark) -> None:
    vm = build(wm)
    assert check(wm) == (0, [])
    assert check(wm, VM) == (0, [])
    human = wm.run("check")
    assert human.returncode == 0 and "All clean." in human.stdout
    contents = {name: content_sha256(path) for name, path in vm["frozen"].items()}
    ours = vm["disks"] / f"{uuid.uuid4().hex}.qcow2"  # named like a file Waymark makes
    foreign = vm["disks"] / "dropped-here.qcow2"
    new_qcow2(ours)
    new_qcow2(foreign)
    foreign_sha = file_sha256(foreign)

    code, findings = check(wm)
    assert code != 0
    assert kinds(findings) == {str(ours): "stray-file", str(foreign): "stray-file"}
    assert all(f["repaired"] is None for f in findings)
    assert ours.exists() and foreign.exists(), "check without --repair changed files"

    code, findings = check(wm, "--repair")
    assert code == 0, findings
    assert kinds(findings) == {str(ours): "stray-file", str(foreign): "stray-file"}
    assert all(f["repaired"] for f in findings)
    assert not ours.exists()
    assert not foreign.exists()
    lost = list((wm.home / "lost+found").iterdir())
    assert len(lost) == 1 and file_sha256(lost[0]) == foreign_sha, "the foreign file was lost"
    assert check(wm) == (0, [])
    assert {n: content_sha256(p) for n, p in vm["frozen"].items()} == contents


def test_repair_never_invents_missing_or_relinked_images(wm: Waymark, tmp_path: Path) -> None:
    vm = build(wm)
    # a missing file: Now's active image is deleted by hand
    Path(vm["active"]).unlink()
    # a broken backing link: B's frozen image is relinked, by hand, to an unrelated file
    other = tmp_path / "other.qcow2"
    new_qcow2(other)
    qemu_io_write(other, "qcow2", 0, 64 * KIB, 0x99)
    broken = vm["frozen"]["B"]
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(other),
                    broken], check=True)
    broken_sha, other_sha = file_sha256(broken), file_sha256(other)
    stray = vm["disks"] / f"{uuid.uuid4().hex}.qcow2"
    new_qcow2(stray)
    expected = {vm["active"]: "missing-file", broken: "broken-backing", str(stray): "stray-file"}

    code, findings = check(wm)
    assert code != 0
    assert kinds(findings) == expected

    code, findings = check(wm, "--repair")
    assert code != 0, "check --repair claims a clean state with data still missing"
    assert kinds(findings) == expected
    repaired = {f["path"]: f["repaired"] for f in findings}
    assert repaired[str(stray)] and not stray.exists()
    assert repaired[vm["active"]] is None and repaired[broken] is None
    assert not Path(vm["active"]).exists(), "repair invented a missing image"
    assert file_sha256(broken) == broken_sha, "repair rewrote an image it cannot fix"
    assert file_sha256(other) == other_sha

    code, findings = check(wm)
    assert code != 0
    assert kinds(findings) == {vm["active"]: "missing-file", broken: "broken-backing"}
    for finding in findings:
        assert finding["fix"], finding
