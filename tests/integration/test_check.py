"""``waymark check`` finds what the catalog and the files disagree on; ``--repair`` fixes only
what is safe (stray files) and never invents data (missing files, broken backing links)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Waymark, content_sha256, file_sha256, qemu_io_write
from waymark import process, wiring
from waymark.catalog.db import Catalog
from waymark.engine import journal, steps
from waymark.usecases.vms import definitions

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


def test_every_image_above_a_broken_layer_is_reported_once_each(wm: Waymark,
                                                                tmp_path: Path) -> None:
    """B's frozen image gone, then instead no image at all: the images above it (C's, Now's)
    cannot be opened whole, each an image-error naming where its chain breaks, as every
    layer's chain is read once (not once per image above it); A's, below, is clean."""
    vm = build(wm)
    b, above = Path(vm["frozen"]["B"]), [vm["frozen"]["C"], vm["active"]]
    aside = tmp_path / "aside.qcow2"
    shutil.move(b, aside)
    code, findings = check(wm)
    assert code == 1
    assert kinds(findings) == {str(b): "missing-file", **{p: "image-error" for p in above}}
    for finding in findings:
        if finding["path"] in above:
            assert str(b) in finding["detail"] and "backing chain" in finding["detail"], finding

    b.write_bytes(b"no image\n" * 100)
    code, findings = check(wm)
    assert code == 1
    assert kinds(findings) == {p: "image-error" for p in (str(b), *above)}
    shutil.move(aside, b)
    assert check(wm) == (0, [])


def test_check_reads_each_layer_once_whatever_the_depth(wm: Waymark,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A VM with 8 checkpoints: one ``qemu-img info --backing-chain`` (of Now's image, which
    reads every layer below it) and one ``qemu-img check`` per image, of that image alone
    (its backing chain not opened): linear in the images, never one chain per image."""
    build(wm)
    for number in range(5):
        wm("checkpoint", "create", VM, "--name", f"more {number}")
    ran: list[list[str]] = []
    real = process.run

    def recording(argv: list[str], **kwargs: Any) -> process.Completed:
        ran.append(list(argv))
        return real(argv, **kwargs)

    monkeypatch.setattr(process, "run", recording)
    assert check(wm, VM) == (0, [])
    images = len(wm.json("checkpoint", "list", VM)["checkpoints"]) + 1
    infos = [argv for argv in ran if argv[1] == "info"]
    checks = [argv for argv in ran if argv[1] == "check"]
    assert len(infos) == 1 and "--backing-chain" in infos[0], infos
    assert len(checks) == images == 9, checks
    assert all('"backing": null' in argv[-1] for argv in checks), checks


# --- a stray file an image still names as its backing file (fail closed) ---------------------

def overlay(path: Path, backing: str) -> None:
    """A qcow2 image on ``backing`` (not opened: it may be gone)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing,
                    "-u", str(path), "2M"], check=True)


def test_repair_keeps_a_stray_file_a_broken_chain_uses_as_backing(wm: Waymark,
                                                                   tmp_path: Path) -> None:
    """Two files named like Waymark's own, that no catalog row references, are still the
    backing files of images whose chains are broken further down (their own backing file is
    gone): one is named by checkpoint B's frozen image (relinked by hand), the other, by a
    relative name, by a stray image. ``check --repair`` keeps both, unchanged, says which image
    needs each, and exits non-zero; the stray image nothing needs is removed."""
    vm = build(wm)
    gone = str(tmp_path / "gone.qcow2")
    under_b = vm["disks"] / f"{uuid.uuid4().hex}.qcow2"
    overlay(under_b, gone)
    broken = vm["frozen"]["B"]
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(under_b), broken], check=True)
    under_stray = vm["disks"] / f"{uuid.uuid4().hex}.qcow2"
    overlay(under_stray, gone)
    stray = vm["disks"] / f"{uuid.uuid4().hex}.qcow2"
    overlay(stray, under_stray.name)  # a relative backing name, as qemu-img keeps it
    kept = {str(under_b): broken, str(under_stray): str(stray)}
    shas = {path: file_sha256(path) for path in kept}

    code, findings = check(wm, "--repair")
    assert code != 0, "check --repair claims a clean state with a chain still broken"
    by_path = {f["path"]: f for f in findings}
    assert by_path[str(stray)]["repaired"] and not stray.exists()
    for path, user in kept.items():
        assert Path(path).exists() and file_sha256(path) == shas[path], f"repair lost {path}"
        finding = by_path[path]
        assert finding["kind"] == "stray-file" and finding["repaired"] is None, finding
        assert user in finding["detail"] and user in finding["fix"], finding
    assert by_path[broken]["kind"] in ("image-error", "broken-backing")


# --- leaked clusters are a notice repair fixes; corruption stays an error --------------------

def leak_a_cluster(path: Path) -> None:
    """Give a qcow2 image one leaked cluster, as QEMU killed mid-allocation leaves: a cluster
    past the image's end, counted as used (refcount 1) by refcount block 0, used by nothing."""
    with path.open("r+b") as image:
        header = image.read(64)
        cluster_size = 1 << int.from_bytes(header[20:24], "big")
        image.seek(int.from_bytes(header[48:56], "big"))  # the refcount table
        refcount_block = int.from_bytes(image.read(8), "big")
        cluster = -(-path.stat().st_size // cluster_size)
        image.truncate((cluster + 1) * cluster_size)
        image.seek(refcount_block + 2 * cluster)  # 16-bit refcounts (the default)
        image.write((1).to_bytes(2, "big"))
    assert qemu_img_check(path) == (3, 1, 0)


def corrupt_like_a_crash(path: Path) -> None:
    """Corrupt a qcow2 image as a crash does when refcounts were not yet written: lazy
    refcounts on, a write to new clusters, then the writer is SIGKILLed."""
    subprocess.run(["qemu-img", "amend", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path)],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x77 {1024 * KIB} {64 * KIB}",
                    "-c", "sigraise 9", str(path)], capture_output=True, check=False)
    code, _, corruptions = qemu_img_check(path)
    assert code == 2 and corruptions, "the image did not come out corrupted"


def qemu_img_check(path: Path) -> tuple[int, int, int]:
    """``qemu-img check``'s exit code, leaks and corruptions."""
    done = subprocess.run(["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)],
                          capture_output=True, text=True, check=False)
    data = json.loads(done.stdout)
    return done.returncode, data.get("leaks", 0), data.get("corruptions", 0)


def test_leaked_clusters_are_a_notice_repair_frees_and_corruption_stays_an_error(
        wm: Waymark) -> None:
    """Now's image with a leaked cluster: ``check`` reports it as a notice and stays clean
    (exit 0); then checkpoint A's image is corrupted by a crash: that is an error (exit 1).
    ``check --repair`` frees the leak (content unchanged, qemu-img check clean) and leaves the
    corrupted image as it is, still an error."""
    vm = build(wm)
    active, corrupted = Path(vm["active"]), Path(vm["frozen"]["A"])
    leak_a_cluster(active)

    code, findings = check(wm)
    assert code == 0, findings
    assert [(f["path"], f["kind"], f["severity"]) for f in findings] == [
        (str(active), "leaked-clusters", "notice")]
    human = wm.run("check")
    assert human.returncode == 0 and "All clean." in human.stdout and "notice" in human.stdout

    corrupt_like_a_crash(corrupted)
    corrupted_sha, content = file_sha256(corrupted), content_sha256(active)
    code, findings = check(wm)
    assert code == 1
    assert {f["path"]: (f["kind"], f["severity"]) for f in findings} == {
        str(active): ("leaked-clusters", "notice"), str(corrupted): ("image-error", "error")}

    code, findings = check(wm, "--repair")
    assert code == 1, "check --repair claims a corrupted image is clean"
    repaired = {f["path"]: f["repaired"] for f in findings}
    assert repaired == {str(active): repaired[str(active)], str(corrupted): None}
    assert repaired[str(active)], findings
    assert qemu_img_check(active) == (0, 0, 0)
    assert content_sha256(active) == content
    assert file_sha256(corrupted) == corrupted_sha, "repair touched a corrupted image"
    code, findings = check(wm)
    assert code == 1 and kinds(findings) == {str(corrupted): "image-error"}


def test_repair_never_frees_leaks_in_an_image_a_running_qemu_holds(wm: Waymark) -> None:
    """A leak in checkpoint C's image while the VM's QEMU runs (a stand-in process whose
    command line names the VM's run folder, as ``vm start`` leaves it): ``check --repair``
    reports it and leaves the file alone; once QEMU is gone, it frees it."""
    vm = build(wm)
    image = Path(vm["frozen"]["C"])
    leak_a_cluster(image)
    run = wm.home / "vms" / vm["id"] / "run"
    run.mkdir(parents=True, exist_ok=True)
    stand_in = subprocess.Popen(["sh", "-c", "sleep 600", str(run / "qmp.sock")])
    try:
        (run / "qemu.pid").write_text(str(stand_in.pid))
        set_vm_state(wm, "running")
        before = file_sha256(image)
        code, findings = check(wm, "--repair")
        assert code == 0, findings
        (finding,) = findings
        assert finding["kind"] == "leaked-clusters" and finding["repaired"] is None, finding
        assert file_sha256(image) == before, "repair changed an image a running QEMU holds"
    finally:
        stand_in.kill()
        stand_in.wait()
    code, findings = check(wm, "--repair")
    assert code == 0 and [f["repaired"] for f in findings] != [None], findings
    assert qemu_img_check(image) == (0, 0, 0)


def set_vm_state(wm: Waymark, state: str) -> None:
    con = sqlite3.connect(wm.home / "catalog.db")
    try:
        with con:
            con.execute("UPDATE vms SET state = ?", (state,))
    finally:
        con.close()


# --- a file only an unfinished intent names ---------------------------------------------------

def test_a_file_an_unfinished_intent_names_only_as_a_backing_file_is_no_stray(
        wm: Waymark, tmp_path: Path) -> None:
    """An unfinished intent whose step names a file only as its ``backing`` (a relink that
    cannot run yet: its image is missing): ``check`` reports the intent, not the backing file
    as stray, and ``check --repair`` keeps it (every path of a step counts,
    :meth:`waymark.engine.steps.StepBase.paths`)."""
    vm = build(wm)
    backing = vm["disks"] / f"{uuid.uuid4().hex}.qcow2"  # named like ours, in no catalog row
    new_qcow2(backing)
    sha = file_sha256(backing)
    missing = tmp_path / "not-there.qcow2"
    wiring.wire()
    catalog = Catalog.open(wm.home)
    try:
        with catalog.session() as session:
            journal.add(session, vm["id"], definitions.VmDelete(),
                        [steps.Rebase(path=str(missing), backing=str(backing),
                                      backing_fmt="qcow2", unsafe=True)])
    finally:
        catalog.engine.dispose()

    for args in ((), ("--repair",)):
        code, findings = check(wm, *args)
        assert code != 0
        assert [f["kind"] for f in findings] == ["unfinished-intent"], findings
        assert backing.exists() and file_sha256(backing) == sha
