"""The files a VM needs beyond its disks (its kernel and initrd) travel with its backup points
and export bundles (:mod:`waymark.external.vm_files`): a VM restored as new or imported boots
from copies in its own folder, so the host's files may be gone. (That it then really boots:
tests/guest/test_edges.py. What a hostile repository or bundle may not do with them:
tests/integration/test_untrusted_storage.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.helpers import Waymark, file_sha256

BOOT = {"kernel": b"a kernel\n" * 1000, "initrd": b"an initrd\n" * 500}


def vm_with_boot_files(wm: Waymark, folder: Path, name: str = "web") -> dict[str, Path]:
    folder.mkdir()
    files = {key: folder / key for key in BOOT}
    for key, path in files.items():
        path.write_bytes(BOOT[key])
    wm("vm", "create", name, "--disk", "1M", "--memory", "128M", "--kernel",
       str(files["kernel"]), "--initrd", str(files["initrd"]), "--append", "console=ttyS0")
    return files


def gone(files: dict[str, Path]) -> None:
    """The host's boot files renamed away, as on a host that never had them."""
    for path in files.values():
        path.rename(path.with_name(path.name + ".gone"))


def boots_own_copies(wm: Waymark, name: str) -> dict[str, Any]:
    shown: dict[str, Any] = wm.json("vm", "show", name)
    folder = wm.home / "vms" / shown["id"] / "boot"
    for key, content in BOOT.items():
        assert shown[key] == str(folder / key), shown
        assert Path(shown[key]).read_bytes() == content
    assert shown["append"] == "console=ttyS0"
    return shown


def test_a_backup_point_carries_the_boot_files_and_a_restore_as_new_uses_its_copies(
        wm: Waymark, tmp_path: Path) -> None:
    files = vm_with_boot_files(wm, tmp_path / "host")
    repo = tmp_path / "repo"
    wm("backup", "repo", "init", str(repo))
    first = wm.json("backup", "run", "web", "--repo", str(repo), "--full")[0]["point"]
    second = wm.json("backup", "run", "web", "--repo", str(repo))[0]["point"]

    manifest = json.loads(next((repo / "vms").glob(f"*/points/{second['id']}.json"))
                          .read_text())
    for key, entry in manifest["vm_files"].items():
        stored = repo / entry["file"]
        assert stored.parent.name == "files" and stored.name == entry["sha256"], entry
        assert (entry["bytes"], entry["sha256"]) == (len(BOOT[key]), file_sha256(files[key]))
    carried = sorted((repo / "vms").glob("*/files/*"))
    assert len(carried) == 2, f"two points share one copy of each file: {carried}"

    gone(files)
    wm("backup", "restore", "web", "--repo", str(repo), "--point", first["id"], "--as-new",
       "copy")
    copy = boots_own_copies(wm, "copy")
    assert wm.json("backup", "verify", "--repo", str(repo))[0]["problems"] == []

    wm("vm", "delete", "copy", "--yes")  # its own copies go with it
    assert not (wm.home / "vms" / copy["id"]).exists()


def test_pruned_points_take_their_carried_files_along(wm: Waymark, tmp_path: Path) -> None:
    files = vm_with_boot_files(wm, tmp_path / "host")
    repo = tmp_path / "repo"
    wm("backup", "repo", "init", str(repo))
    wm("backup", "run", "web", "--repo", str(repo), "--full")
    files["kernel"].write_bytes(b"a newer kernel\n")
    wm("backup", "run", "web", "--repo", str(repo), "--full")
    assert len(list((repo / "vms").glob("*/files/*"))) == 3  # two kernels, one initrd

    wm("backup", "prune", "--repo", str(repo), "--keep-last", "1")
    kept = sorted(p.read_bytes() for p in (repo / "vms").glob("*/files/*"))
    assert kept == sorted([b"a newer kernel\n", BOOT["initrd"]])


def test_an_export_bundle_carries_the_boot_files_and_an_import_uses_its_copies(
        wm: Waymark, tmp_path: Path) -> None:
    files = vm_with_boot_files(wm, tmp_path / "host")
    wm("checkpoint", "create", "web", "--name", "one")
    bundle = tmp_path / "bundle"
    wm("checkpoint", "export", "web", "one", str(bundle))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["vm_files"] == {
        key: {"file": f"boot/{key}", "bytes": len(content), "sha256": file_sha256(files[key])}
        for key, content in BOOT.items()}
    assert {f"boot/{key}" for key in BOOT} <= set(manifest["files"])

    gone(files)
    wm("vm", "import", str(bundle), "--name", "copy")
    boots_own_copies(wm, "copy")


def test_a_vm_whose_boot_file_was_already_gone_is_still_backed_up_and_exported(
        wm: Waymark, tmp_path: Path) -> None:
    files = vm_with_boot_files(wm, tmp_path / "host")
    files["initrd"].unlink()  # what needs it cannot boot here either: it is left out
    repo = tmp_path / "repo"
    wm("backup", "repo", "init", str(repo))
    point = wm.json("backup", "run", "web", "--repo", str(repo))[0]["point"]
    manifest = json.loads(next((repo / "vms").glob(f"*/points/{point['id']}.json")).read_text())
    assert set(manifest["vm_files"]) == {"kernel"}
