"""The CD drive and the boot order, through the real CLI and a real ``waymark serve`` (no guest:
what a running VM does with them is tests/guest/test_media.py's)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Waymark, file_sha256, query, served
from tests.integration.test_untrusted_storage import bundle_of, reseal, rewrite

EXIT_INVALID, EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_IMAGE = 2, 3, 5, 8


def fake_iso(path: Path) -> Path:
    """The smallest file Waymark takes for an ISO: ISO 9660's 'CD001' at byte 32769."""
    path.write_bytes(bytes(32769) + b"CD001" + bytes(2042))
    return path


def configs(wm: Waymark) -> list[Any]:
    return [json.loads(c) for (c,) in query(wm.home, "SELECT config FROM vms ORDER BY name")]


def refused(wm: Waymark, code: int, *args: str, says: str) -> None:
    """The command fails with ``code``, its message naming ``says``; no VM changed."""
    before = configs(wm)
    result = wm.run(*args, "--json")
    assert result.returncode == code, result
    error = json.loads(result.stdout)["error"]
    assert says in error["message"] and error["hint"], error
    assert configs(wm) == before


def test_insert_and_eject_while_off_and_vm_show_says_what_is_in(wm: Waymark,
                                                                 tmp_path: Path) -> None:
    iso = fake_iso(tmp_path / "debian 12,netinst.iso")
    digest = file_sha256(iso)
    wm("vm", "create", "web", "--disk", "1M", "--memory", "128M")
    shown = wm.json("vm", "show", "web")
    assert (shown["media"], shown["media_name"], shown["boot_order"]) == \
        (None, None, ["disk", "cdrom"])
    assert "cd drive: (empty)   boot order: disk,cdrom" in wm("vm", "show", "web").stdout

    inserted = wm("vm", "media", "insert", "web", str(iso))
    assert inserted.stdout == f"Inserted {iso} into the CD drive of web.\n"
    shown = wm.json("vm", "show", "web")
    assert (shown["media"], shown["media_name"]) == (str(iso), iso.name)
    assert f"cd drive: {iso}" in wm("vm", "show", "web").stdout

    ejected = wm.json("vm", "media", "eject", "web")
    assert (ejected["media"], ejected["media_name"]) == (None, None)
    wm("vm", "media", "eject", "web")  # an empty drive stays empty
    assert file_sha256(iso) == digest  # never written


def test_an_iso_that_is_not_there_or_is_no_iso_is_refused_and_nothing_changes(
        wm: Waymark, tmp_path: Path) -> None:
    wm("vm", "create", "web", "--disk", "1M", "--memory", "128M")
    wm("vm", "media", "insert", "web", str(fake_iso(tmp_path / "kept.iso")))
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    short = tmp_path / "short.iso"
    short.write_bytes(b"CD001")
    refused(wm, EXIT_NOT_FOUND, "vm", "media", "insert", "web", str(tmp_path / "gone.iso"),
            says="does not exist")
    for not_iso in (disk, short, tmp_path):
        refused(wm, EXIT_IMAGE, "vm", "media", "insert", "web", str(not_iso),
                says="is not an ISO image")
    assert wm.json("vm", "show", "web")["media_name"] == "kept.iso"


def test_a_saved_vms_drive_does_not_change(wm: Waymark, tmp_path: Path) -> None:
    """Its saved memory resumes with the drive it was saved with (a real save is
    tests/guest's: the catalog's state is enough here, nothing else is read)."""
    iso = fake_iso(tmp_path / "a.iso")
    wm("vm", "create", "web", "--disk", "1M", "--memory", "128M")
    with sqlite3.connect(wm.home / "catalog.db") as con:
        con.execute("UPDATE vms SET state = 'saved'")
    con.close()
    for args in (("insert", "web", str(iso)), ("eject", "web")):
        refused(wm, EXIT_CONFLICT, "vm", "media", *args, says="is saved")


def test_the_boot_order_is_set_at_creation_and_changed_and_checked(wm: Waymark) -> None:
    wm("vm", "create", "web", "--disk", "1M", "--memory", "128M", "--boot", "cdrom,disk,network")
    assert wm.json("vm", "show", "web")["boot_order"] == ["cdrom", "disk", "network"]
    assert wm.json("vm", "set", "web", "--boot", "network")["boot_order"] == ["network"]
    for bad, says in (("disk,floppy", "'floppy', which is no boot device"),
                      ("disk,disk", "a device twice"), ("", "which is no boot device"),
                      ("disk,cdrom,bootindex=0", "no boot device")):
        refused(wm, EXIT_INVALID, "vm", "set", "web", "--boot", bad, says=says)
        refused(wm, EXIT_INVALID, "vm", "create", "other", "--boot", bad, says=says)
    assert query(wm.home, "SELECT name FROM vms") == [("web",)]


def test_a_checkpoint_records_the_iso_and_apply_puts_it_back_or_empties_a_gone_ones_drive(
        wm: Waymark, tmp_path: Path) -> None:
    iso = fake_iso(tmp_path / "install.iso")
    wm("vm", "create", "web", "--disk", "1M", "--memory", "128M", "--boot", "cdrom,disk")
    wm("vm", "media", "insert", "web", str(iso))
    wm("checkpoint", "create", "web", "--name", "with-iso")
    frozen = query(wm.home, "SELECT count(*) FROM frozen_images")
    assert frozen == [(1,)], "the ISO is no disk of the checkpoint"
    wm("vm", "media", "eject", "web")
    wm("vm", "set", "web", "--boot", "disk")

    applied = wm.json("checkpoint", "apply", "web", "with-iso", "--discard-current")
    assert applied["warnings"] == []
    shown = wm.json("vm", "show", "web")
    assert (shown["media"], shown["boot_order"]) == (str(iso), ["cdrom", "disk"])

    iso.unlink()
    applied = wm.json("checkpoint", "apply", "web", "with-iso", "--discard-current")
    assert applied["state"] == "off"
    (warning,) = applied["warnings"]
    assert str(iso) in warning and "the drive is empty" in warning
    assert wm.json("vm", "show", "web")["media"] is None
    printed = wm("checkpoint", "apply", "web", "with-iso", "--discard-current").stdout
    assert f"Warning: The ISO {iso} that was in the CD drive is gone" in printed


def test_backups_and_exports_record_the_iso_by_path_and_never_copy_it(
        wm: Waymark, tmp_path: Path) -> None:
    iso = fake_iso(tmp_path / "install.iso")
    with iso.open("ab") as grow:  # a content no disk image of a 1 MiB VM could hold
        grow.write(b"waymark-iso-content" * 4096)
    wm("vm", "create", "web", "--disk", "1M", "--memory", "128M")
    wm("vm", "media", "insert", "web", str(iso))
    wm("checkpoint", "create", "web", "--name", "with-iso")
    repo, bundle = tmp_path / "repo", tmp_path / "bundle"
    wm("backup", "repo", "init", str(repo))
    wm("backup", "run", "web", "--repo", str(repo), "--full")
    wm("checkpoint", "export", "web", "with-iso", str(bundle))
    for folder in (repo, bundle):
        copies = [p for p in folder.rglob("*") if p.is_file()
                  and b"waymark-iso-content" in p.read_bytes()]
        assert copies == [], f"the ISO was copied into {folder}"
    assert json.loads((bundle / "configuration.json").read_text())["media"] == str(iso)
    wm("vm", "import", str(bundle), "--name", "clone")  # an ISO this host offers stays in
    assert wm.json("vm", "show", "clone")["media"] == str(iso)
    restored = wm.json("backup", "restore", "web", "--repo", str(repo), "--as-new", "copy")
    assert wm.json("vm", "show", "copy")["media"] == str(iso), restored


def test_a_vm_whose_iso_is_gone_does_not_start_and_says_so(wm: Waymark,
                                                             tmp_path: Path) -> None:
    iso = fake_iso(tmp_path / "install.iso")
    wm("vm", "create", "web", "--disk", "1M", "--memory", "128M")
    wm("vm", "media", "insert", "web", str(iso))
    iso.unlink()
    result = wm.run("vm", "start", "web")
    assert result.returncode == EXIT_NOT_FOUND, result
    assert f"the ISO {iso} in the VM's CD drive is gone" in result.stderr
    assert "waymark vm media eject" in result.stderr
    assert wm.json("vm", "status", "web")["state"] == "off"


def test_a_bundle_naming_an_iso_this_host_does_not_offer_imports_with_the_drive_empty(
        wm: Waymark, tmp_path: Path) -> None:
    bundle = bundle_of(wm, tmp_path)
    rewrite(bundle / "configuration.json", lambda c: c.update(media="/etc/shadow",
                                                               boot_order=["cdrom"]))
    reseal(bundle, "configuration.json")
    wm("vm", "import", str(bundle), "--name", "clone")
    shown = wm.json("vm", "show", "clone")
    assert (shown["media"], shown["boot_order"]) == (None, ["cdrom"])


def test_a_bundle_keeps_an_iso_of_a_media_location(wm: Waymark, tmp_path: Path) -> None:
    isos = tmp_path / "isos"
    isos.mkdir()
    iso = fake_iso(isos / "tools.iso")
    wm("location", "add", "isos", str(isos), "--kind", "media")
    bundle = bundle_of(wm, tmp_path)
    rewrite(bundle / "configuration.json", lambda c: c.update(media=str(iso)))
    reseal(bundle, "configuration.json")
    wm("vm", "import", str(bundle), "--name", "clone")
    assert wm.json("vm", "show", "clone")["media"] == str(iso)


# --- the API ----------------------------------------------------------------------------------

def call(url: str, token: str, method: str, path: str, body: Any = None
         ) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def media_home(wm: Waymark, tmp_path: Path) -> Path:
    """A template ``tpl``, a media location ``isos`` with ``tools.iso``, a self-service user
    ``sam`` granted the template."""
    isos = tmp_path / "isos"
    isos.mkdir()
    fake_iso(isos / "tools.iso")
    (isos / "notes.txt").write_text("no ISO\n")
    (tmp_path / "outside.iso").symlink_to(fake_iso(tmp_path / "secret.iso"))
    (isos / "link.iso").symlink_to(tmp_path / "secret.iso")
    wm("location", "add", "isos", str(isos), "--kind", "media")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"),
                    "1M"], check=True)
    wm("template", "create", "tpl", "--disk", str(tmp_path / "base.qcow2"))
    wm.run("user", "add", "sam", "--role", "self-service", "--password-stdin",
           input="sam-password-1\n").ok()
    wm("user", "grant", "sam", "--template", "tpl")
    return isos


def test_the_api_inserts_a_media_locations_iso_for_owners_and_any_host_iso_for_administrators(
        wm: Waymark, tmp_path: Path, media_home: Path) -> None:
    sam = wm.json("token", "create", "t", "--user", "sam")["token"]
    with served(wm) as (url, admin):
        status, made = call(url, sam, "POST", "/api/vms", {"name": "mine", "template": "tpl"})
        assert status == 201, made
        assert made["boot_order"] == ["disk", "cdrom"] and made["media_name"] is None
        status, made = call(url, sam, "POST", "/api/vms", {"name": "net", "template": "tpl",
                                                           "boot_order": ["network", "disk"]})
        assert (status, made["boot_order"]) == (201, ["network", "disk"])
        status, shown = call(url, sam, "POST", "/api/vms/mine/media",
                             {"location": "isos", "file": "tools.iso"})
        assert status == 200, shown
        assert shown["media_name"] == "tools.iso" and "media" not in shown  # no host path
        for body, code in (({"path": str(tmp_path / "secret.iso")}, 403),
                           ({"location": "isos", "file": "../secret.iso"}, 400),
                           ({"location": "isos", "file": "link.iso"}, 400),
                           ({"location": "isos", "file": "notes.txt"}, 422),
                           ({"location": "isos", "file": "gone.iso"}, 404),
                           ({"location": "nowhere", "file": "tools.iso"}, 404),
                           ({"location": "isos"}, 400)):
            status, answer = call(url, sam, "POST", "/api/vms/mine/media", body)
            assert status == code, (body, answer)
            assert str(tmp_path) not in json.dumps(answer)
        assert wm.json("vm", "show", "mine")["media"] == str(media_home / "tools.iso")

        status, shown = call(url, sam, "PATCH", "/api/vms/mine", {"boot_order": ["cdrom"]})
        assert (status, shown["boot_order"]) == (200, ["cdrom"])
        for order in (["disk", "disk"], ["floppy"], []):
            status, answer = call(url, sam, "PATCH", "/api/vms/mine", {"boot_order": order})
            assert status == 400, answer
        assert wm.json("vm", "show", "mine")["boot_order"] == ["cdrom"]
        status, shown = call(url, sam, "DELETE", "/api/vms/mine/media")
        assert (status, shown["media_name"]) == (200, None)

        status, shown = call(url, admin, "POST", "/api/vms/mine/media",
                             {"path": str(tmp_path / "secret.iso")})
        assert (status, shown["media"]) == (200, str(tmp_path / "secret.iso"))
        status, answer = call(url, admin, "POST", "/api/vms/mine/media",
                              {"path": str(tmp_path / "secret.iso"), "location": "isos"})
        assert status == 400, answer


def test_an_iso_kept_in_the_vms_own_folder_is_no_stray_file(wm: Waymark) -> None:
    """``waymark check --repair`` moves away files nothing references: the ISO in a VM's
    drive (or in one of its checkpoints') is referenced."""
    vm_id = wm.json("vm", "create", "web", "--disk", "1M", "--memory", "128M")["id"]
    iso = fake_iso(wm.home / "vms" / vm_id / "install.iso")
    wm("vm", "media", "insert", "web", str(iso))
    wm("checkpoint", "create", "web", "--name", "with-iso")
    wm("vm", "media", "eject", "web")
    result = wm.run("check", "--repair", "--json")
    assert result.returncode == 0 and result.json()["findings"] == [], result.stdout
    assert iso.exists()
