"""A backup repository, an export bundle and a library share may sit on storage others can write
(docs/backups.md, docs/library.md): everything read there is untrusted input. Each test crafts
what such a writer could (real qcow2 files built with qemu-img in a temporary folder) and shows
the real CLI refusing it, naming the bad file, with the catalog, the home, the storage and the
host file it aimed at all unchanged. The same configuration rules hold CLI input.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Result, Waymark, file_sha256, query
from waymark import durable
from waymark.engine import executor, steps
from waymark.errors import ImageError
from waymark.external import shares
from waymark.external.shares import opened_inside, pinned_chain
from waymark.images import qemu_img as engine
from waymark.usecases.vms import bundles

EXIT_INVALID, EXIT_IMAGE = 2, 8
SHADOW = "/etc/shadow"
HELPER_BRIDGE = "br0,helper=/bin/sh"
TABLES = ("vms", "disks", "images", "checkpoints", "frozen_images", "intents", "backup_bases")


# --- helpers ----------------------------------------------------------------------------------

def tree_files(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (files with their sha256; the catalog's by name:
    the tables are compared instead)."""
    return {str(p.relative_to(folder)): "folder" if p.is_dir() else
            "" if p.name.startswith("catalog.db") or p.name.endswith(".lock") else file_sha256(p)
            for p in sorted(folder.rglob("*"))}


def snapshot(wm: Waymark, *folders: Path) -> dict[str, Any]:
    return {"rows": {t: query(wm.home, f"SELECT * FROM {t} ORDER BY 1") for t in TABLES},
            "home": tree_files(wm.home), **{str(f): tree_files(f) for f in folders}}


def refused(wm: Waymark, watched: tuple[Path, ...], args: tuple[str, ...], code: int,
            *says: str) -> Result:
    """``args`` fails with ``code``, an error naming each of ``says``, no traceback, and
    nothing in the home, the catalog or ``watched`` changed."""
    before = snapshot(wm, *watched)
    result = wm.run(*args)
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr and "error: " in result.stderr, result
    for fragment in says:
        assert fragment in result.stderr, f"{fragment!r} not in: {result.stderr}"
    assert snapshot(wm, *watched) == before, f"{args} changed something"
    return result


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def host_secret(tmp_path: Path) -> Path:
    """A host file no VM owner may read (stands for /etc/shadow, or a disk of another VM)."""
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes(b"root:$6$secret-hash:19000:0:99999:7:::\n".ljust(1 << 20, b"S"))
    return secret


def rewrite(path: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))
    return data


# --- backup repositories ----------------------------------------------------------------------

def backed_up(wm: Waymark, tmp_path: Path, points: int = 1) -> tuple[Path, list[dict[str, Any]]]:
    """VM ``web`` (off, a 1 MiB disk) with ``points`` full points in the repository ``repo``."""
    wm("vm", "create", "web", "--disk", "1M", "--memory", "128M")
    repo = tmp_path / "repo"
    wm("backup", "repo", "init", str(repo))
    made = [wm.json("backup", "run", "web", "--repo", str(repo), "--full")[0]["point"]
            for _ in range(points)]
    return repo, made


def manifest_of(repo: Path, point_id: str) -> Path:
    (path,) = (repo / "vms").glob(f"*/points/{point_id}.json")
    return path


def craft_disk(repo: Path, point_id: str, make: Callable[[Path], None]) -> Path:
    """Replace the point's disk file by what ``make`` builds, and its manifest's checksum and
    size with the new file's (whoever writes the storage can write both)."""
    manifest = manifest_of(repo, point_id)
    disk = repo / json.loads(manifest.read_text())["disks"][0]["file"]
    disk.unlink()
    make(disk)
    rewrite(manifest, lambda m: m["disks"][0].update(sha256=file_sha256(disk),
                                                     bytes=disk.stat().st_size))
    return disk


def backing_outside(secret: Path) -> dict[str, Callable[[Path], None]]:
    """The ways a qcow2 file from the storage can lead qemu-img to a host file."""
    outside = secret.with_suffix(".qcow2")
    if not outside.exists():
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(secret), str(outside))
    spec = json.dumps({"driver": "raw", "file": {"driver": "file", "filename": str(secret)}})

    def overlay(backing: Callable[[Path], str], fmt: str) -> Callable[[Path], None]:
        return lambda disk: qemu_img("create", "-q", "-f", "qcow2", "-F", fmt, "-b",
                                     backing(disk), "-u", str(disk), "1M")

    def data_file(disk: Path) -> None:  # made on a scratch data file, then renamed in place
        scratch = disk.with_name("scratch.raw")
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={scratch},data_file_raw=on",
                 str(disk), "1M")
        qemu_img("amend", "-f", "qcow2", "-o", f"data_file={secret}", str(disk))
        scratch.unlink()

    return {"absolute": overlay(lambda disk: str(secret), "raw"),
            "relative": overlay(lambda disk: os.path.relpath(outside, disk.parent), "qcow2"),
            "json": overlay(lambda disk: f"json:{spec}", "raw"),
            "data-file": data_file}


@pytest.mark.parametrize("how", ["absolute", "relative", "json", "data-file"])
def test_a_point_whose_backing_file_is_outside_the_repository_is_not_restored(
        wm: Waymark, tmp_path: Path, how: str) -> None:
    """Restoring would copy the host file (read as root) into a disk the VM's owner reads."""
    secret = host_secret(tmp_path)
    repo, (point,) = backed_up(wm, tmp_path)
    craft_disk(repo, point["id"], backing_outside(secret)[how])
    file_name = json.loads(manifest_of(repo, point["id"]).read_text())["disks"][0]["file"]
    refused(wm, (repo,), ("backup", "restore", "web", "--repo", str(repo), "--as-new", "copy"),
            EXIT_IMAGE, file_name, "Nothing was restored")
    refused(wm, (repo,), ("backup", "restore", "web", "--repo", str(repo),
                          "--discard-current"), EXIT_IMAGE, file_name)
    verified = wm.run("backup", "verify", "--repo", str(repo), "--json")
    assert verified.returncode == EXIT_IMAGE, verified
    (row,) = json.loads(verified.stdout)
    assert row["problems"] and row["problems"][0].startswith(file_name), row
    assert secret.read_bytes().startswith(b"root:")


def two_layers(folder: Path) -> tuple[Path, Path]:
    """``top.qcow2`` (0x42 in its second 64 KiB) over ``base.qcow2`` (0x41 in its first),
    named relatively: a chain that stays inside ``folder``."""
    folder.mkdir()
    top, base = folder / "top.qcow2", folder / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 64k", str(base)],
                   check=True, capture_output=True)
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", str(top))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 64k 64k", str(top)],
                   check=True, capture_output=True)
    return top, base


def raw_bytes(image: Path, tmp_path: Path) -> bytes:
    flat = tmp_path / "flat.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(image), str(flat))
    data = flat.read_bytes()
    flat.unlink()
    return data


def test_a_backing_file_swapped_after_the_check_is_not_what_is_copied(tmp_path: Path) -> None:
    """The race left by checking names: a restore, an import checks a point's chain, then
    someone writing the storage swaps a backing file for a link to a host file before the copy.
    The copy step (the journal's ``convert`` with ``confined_to``) copies the files it checked,
    held open, each layer named explicitly down to ``"backing": null``; a new check refuses."""
    secret = host_secret(tmp_path)
    outside = secret.with_suffix(".qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(secret), str(outside))
    repo = tmp_path / "repo"
    top, base = two_layers(repo)
    pinned, by_name = tmp_path / "pinned.qcow2", tmp_path / "by-name.qcow2"
    with pinned_chain(repo, top, where="point") as layers:
        assert [layer.path for layer in layers] == [top, base]
        base.rename(repo / "moved.qcow2")
        base.symlink_to(outside)  # the swap, between the check and the copy
        engine.convert_pinned([layer.fd for layer in layers], pinned)
    engine.convert(top, "qcow2", by_name)  # what a copy by name does now: the attack is real
    assert b"root:" in raw_bytes(by_name, tmp_path)
    copied = raw_bytes(pinned, tmp_path)
    assert b"root:" not in copied
    assert copied[:64 << 10] == b"\x41" * (64 << 10)
    assert copied[64 << 10:128 << 10] == b"\x42" * (64 << 10)
    assert copied[128 << 10:] == bytes(len(copied) - (128 << 10))
    assert engine.header(pinned).backing_filename is None
    with pytest.raises(ImageError, match=r"base\.qcow2"), pinned_chain(repo, top, where="point"):
        pass  # checked again (a re-run step, a new restore): refused
    assert secret.read_bytes().startswith(b"root:")


@pytest.mark.parametrize("same_file_system", [True, False])
def test_a_file_swapped_after_the_check_is_not_what_is_copied(
        tmp_path: Path, same_file_system: bool) -> None:
    """The same race for the files a deploy or an import copies whole (images of a library
    share, memory states, kernels): the journal's ``copy_file`` with ``confined_to`` links or
    copies the regular file it opened; a link to a host file in its place is refused."""
    secret = host_secret(tmp_path)
    share = tmp_path / "share"
    share.mkdir()
    state = share / "state.bin"
    state.write_bytes(b"guest memory\n")
    copied = (Path("/dev/shm") if not same_file_system else tmp_path) / f"copied-{os.getpid()}"
    try:
        with opened_inside(share, state, where="share") as fd:
            state.rename(share / "moved.bin")
            state.symlink_to(secret)  # the swap, between the check and the copy
            durable.link_or_copy(state, copied, fd=fd)
        assert copied.read_bytes() == b"guest memory\n"
    finally:
        copied.unlink(missing_ok=True)
    step = steps.CopyFile(src=str(state), path=str(copied), confined_to=str(share))
    with pytest.raises(ImageError, match=r"state\.bin"):
        executor.run(step)  # checked again (a re-run step): refused
    assert not copied.exists()
    assert secret.read_bytes().startswith(b"root:")


VICTIMS: dict[str, Callable[[Path], str]] = {"relative": lambda victim: "../victim.txt",
           "absolute": str}


@pytest.mark.parametrize("how", sorted(VICTIMS))
def test_prune_refuses_a_manifest_naming_a_file_outside_the_repository(
        wm: Waymark, tmp_path: Path, how: str) -> None:
    """Prune (also run by the scheduler, as root) would delete the host file the older point's
    manifest names."""
    repo, (old, _) = backed_up(wm, tmp_path, points=2)
    victim = tmp_path / "victim.txt"
    victim.write_text("a host file\n")
    name = VICTIMS[how](victim)
    rewrite(manifest_of(repo, old["id"]), lambda m: m["disks"][0].update(file=name))
    refused(wm, (repo, tmp_path), ("backup", "prune", "--repo", str(repo), "--keep-last", "1"),
            EXIT_IMAGE, f"{old['id']}.json", name)
    assert victim.read_text() == "a host file\n"


def test_a_manifest_filed_under_another_name_or_a_crafted_merge_intent_is_refused(
        wm: Waymark, tmp_path: Path) -> None:
    """Ids build paths too: a manifest whose VM or point id is not the folder and file it is
    filed as, and an interrupted merge's intent naming a host file, delete nothing."""
    repo, (old, _) = backed_up(wm, tmp_path, points=2)
    victim = tmp_path / "victim.json"
    victim.write_text("{}\n")
    manifest = manifest_of(repo, old["id"])
    original = manifest.read_text()
    rewrite(manifest, lambda m: m.update(id="../../../../victim"))
    refused(wm, (repo, tmp_path), ("backup", "prune", "--repo", str(repo), "--keep-last", "1"),
            EXIT_IMAGE, f"{old['id']}.json", "not the manifest of point")
    manifest.write_text(original)
    rewrite(manifest, lambda m: m["disks"][0].update(virtual_size="1G; rm -rf /"))
    refused(wm, (repo, tmp_path), ("backup", "restore", "web", "--repo", str(repo), "--point",
                                   old["id"], "--as-new", "sized"),
            EXIT_IMAGE, f"{old['id']}.json", "not a size in bytes")
    manifest.write_text(original)
    gone = {**json.loads(original), "disks": [{**json.loads(original)["disks"][0],
                                               "file": str(victim)}]}
    (manifest.parent.parent / "merging.json").write_text(json.dumps({"gone": gone,
                                                                     "child": "x"}))
    refused(wm, (repo, tmp_path), ("backup", "run", "web", "--repo", str(repo)),
            EXIT_IMAGE, "merging.json", str(victim))
    assert victim.read_text() == "{}\n"


def _plant(repo: Path, where: str, target: Path) -> str:
    """A symbolic link to ``target`` planted in the repository at ``where``; its name there."""
    (vm,) = (repo / "vms").iterdir()
    disk_folder = next((vm / "disks").iterdir())
    place = {"disk-folder": disk_folder / "evil", "vm-folder": repo / "vms" / "evil",
             "points": vm / "points" / "evil",
             "file": disk_folder / "20990101T000000000000Z-00000000.qcow2"}[where]
    place.symlink_to(target)
    return str(place.relative_to(repo))


LINK_COMMANDS = {"run": ("backup", "run", "web"), "prune": ("backup", "prune", "--keep-last", "1"),
                 "restore": ("backup", "restore", "web", "--as-new", "copy")}


@pytest.mark.parametrize(("where", "command"), [
    ("disk-folder", "run"), ("disk-folder", "prune"), ("disk-folder", "restore"),
    ("vm-folder", "run"), ("points", "prune"), ("file", "run")])
def test_a_symbolic_link_planted_in_a_repository_stops_every_command_that_cleans_it(
        wm: Waymark, tmp_path: Path, where: str, command: str) -> None:
    """A run, a prune and a restore first remove what a killed run left, by pattern: a link
    planted in the repository would lead that removal (as root) into a host folder and delete
    what is there. The command is refused naming the link, and nothing anywhere changes."""
    repo, _ = backed_up(wm, tmp_path, points=2)
    host = tmp_path / "host-folder"
    host.mkdir()
    (host / "precious.qcow2").write_text("a host file\n")
    name = _plant(repo, where, host / "precious.qcow2" if where == "file" else host)
    refused(wm, (repo, host), (*LINK_COMMANDS[command], "--repo", str(repo)),
            EXIT_IMAGE, name, "a symbolic link", str(host))
    assert (host / "precious.qcow2").read_text() == "a host file\n"


def test_a_folder_swapped_for_a_link_after_the_clean_up_is_not_written_through(
        tmp_path: Path) -> None:
    """A link made after the clean-up's check (a writer racing the run) is caught where the run
    writes: the folder is made and checked one level at a time, and nothing is written out."""
    root, host = tmp_path / "repo", tmp_path / "host"
    (root / "vms" / "vm1").mkdir(parents=True)
    host.mkdir()
    (root / "vms" / "vm1" / "disks").symlink_to(host)
    with pytest.raises(ImageError, match="vms/vm1/disks is no folder but a symbolic link"):
        shares.plain_folder(root, root / "vms" / "vm1" / "disks" / "d1", where="vms/vm1/disks/d1")
    assert list(host.iterdir()) == []
    assert shares.plain_folder(root, root / "vms" / "vm2" / "points", where="x").is_dir()


def test_an_export_bundle_holding_a_planted_link_is_not_cleaned_through_it(
        tmp_path: Path) -> None:
    """A re-run export first removes what an interrupted one wrote, by name: a link where its
    disks folder was would lead that into a host folder."""
    dest, host = tmp_path / "bundle", tmp_path / "host"
    dest.mkdir()
    host.mkdir()
    (host / "disk0.qcow2").write_text("a host file\n")
    (dest / "disks").symlink_to(host)
    with pytest.raises(ImageError, match="a symbolic link"):
        bundles.remove_partial(dest)
    assert (host / "disk0.qcow2").read_text() == "a host file\n"


def test_a_point_time_in_any_rfc_3339_form_is_shown_in_seconds_and_garbage_is_refused(
        wm: Waymark, tmp_path: Path) -> None:
    """A point's time comes from its manifest: Waymark writes it with microseconds (older
    versions too), answers show it as every moment (whole seconds, ``Z``); an offset is read;
    anything else is refused, naming the manifest, and prune deletes nothing."""
    repo, (point,) = backed_up(wm, tmp_path)
    manifest = manifest_of(repo, point["id"])
    written = json.loads(manifest.read_text())["created_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", written), written
    assert point["created_at"] == written[:19] + "Z"
    rewrite(manifest, lambda m: m.update(created_at="2026-12-07T04:12:21.5+01:00"))
    [row] = wm.json("backup", "list", "--repo", str(repo))
    assert row["created_at"] == "2026-12-07T03:12:21Z", row
    where = str(manifest.relative_to(repo))
    for hostile in ("yesterday", "2026-12-07", "2026-02-30T00:00:00Z", "2026-12-07T03:12:21",
                    "2026-12-07T03:12:21Z" + "0" * 100, 1765077141):
        rewrite(manifest, lambda m, hostile=hostile: m.update(created_at=hostile))
        refused(wm, (repo,), ("backup", "list", "--repo", str(repo)), EXIT_IMAGE, where,
                "not the manifest of point")
        refused(wm, (repo,), ("backup", "prune", "--repo", str(repo), "--keep-last", "1"),
                EXIT_IMAGE, where)


CONFIGS: dict[str, Callable[[dict[str, Any]], None]] = {
    "initrd": lambda config: config.update(initrd=SHADOW),
    "kernel": lambda config: config.update(kernel="/root/.ssh/id_ed25519"),
    "bridge": lambda config: config["nics"][0].update(kind="bridge", bridge=HELPER_BRIDGE),
    "forward": lambda config: config["nics"][0].update(
        forwards=["tcp::2222-:22,guestfwd=tcp:10.0.2.100:1-cmd:/bin/sh"]),
    "mac": lambda config: config["nics"][0].update(mac="52:54:00:00:00:01,romfile=/etc/shadow"),
    "machine": lambda config: config.update(machine="pc-q35-7.2,dumpdtb=/etc/passwd"),
    "unknown": lambda config: config.update(helper="/bin/sh"),
    # a CPU model reaches QEMU's -cpu: no property may ride along
    "cpu": lambda config: config.update(cpu_model="qemu64,+vmx,hv-passthrough=on"),
    "accel": lambda config: config.update(accel="kvm,kernel-irqchip=off"),
    "media": lambda config: config.update(media="disc.iso,driver=host_device"),
    "media-line": lambda config: config.update(media="/srv/a.iso\n-device x"),
    "boot": lambda config: config.update(boot_order=["disk", "cdrom,bootindex=0"]),
    "boot-twice": lambda config: config.update(boot_order=["disk", "disk"]),
}
SAYS = {"initrd": SHADOW, "kernel": "id_ed25519", "bridge": HELPER_BRIDGE, "forward": "guestfwd",
        "mac": "romfile", "machine": "dumpdtb", "unknown": "helper", "cpu": "hv-passthrough",
        "accel": "kernel-irqchip", "media": "host_device",
        "media-line": "not an absolute path", "boot": "bootindex", "boot-twice": "twice"}


@pytest.mark.parametrize("what", ["initrd", "bridge", "cpu"])
def test_a_point_carrying_a_hostile_configuration_is_not_restored(
        wm: Waymark, tmp_path: Path, what: str) -> None:
    repo, (point,) = backed_up(wm, tmp_path)
    manifest = manifest_of(repo, point["id"])
    rewrite(manifest, lambda m: CONFIGS[what](m["vm"]["config"]))
    where = str(manifest.relative_to(repo))
    refused(wm, (repo,), ("backup", "restore", "web", "--repo", str(repo), "--as-new", "copy"),
            EXIT_IMAGE, where, SAYS[what], "Nothing was changed")
    refused(wm, (repo,), ("backup", "restore", "web", "--repo", str(repo),
                          "--discard-current"), EXIT_IMAGE, where, SAYS[what])


# --- export bundles ---------------------------------------------------------------------------

def bundle_of(wm: Waymark, tmp_path: Path) -> Path:
    wm("vm", "create", "src", "--disk", "1M", "--memory", "128M")
    wm("checkpoint", "create", "src", "--name", "one")
    bundle = tmp_path / "bundle"
    wm("checkpoint", "export", "src", "one", str(bundle))
    return bundle


def reseal(bundle: Path, rel: str) -> None:
    """The bundle's manifest with ``rel``'s new checksum (its writer can do that too)."""
    rewrite(bundle / "manifest.json",
            lambda m: m["files"].update({rel: file_sha256(bundle / rel)}))


@pytest.mark.parametrize("what", sorted(CONFIGS))
def test_a_bundle_carrying_a_hostile_configuration_is_not_imported(
        wm: Waymark, tmp_path: Path, what: str) -> None:
    bundle = bundle_of(wm, tmp_path)
    rewrite(bundle / "configuration.json", CONFIGS[what])
    reseal(bundle, "configuration.json")
    refused(wm, (bundle,), ("vm", "import", str(bundle), "--name", "clone"), EXIT_IMAGE,
            str(bundle / "configuration.json"), SAYS[what], "Nothing was changed")


@pytest.mark.guest  # asks qemu-system-x86_64 which CPU models it offers (no guest runs)
def test_a_bundle_naming_a_cpu_model_this_qemu_lacks_is_not_imported(
        wm: Waymark, tmp_path: Path) -> None:
    """A well-formed name this host's QEMU does not offer (a bundle from a newer QEMU, or a
    made-up one) is refused at import, naming it, not when the VM first starts."""
    bundle = bundle_of(wm, tmp_path)
    rewrite(bundle / "configuration.json", lambda c: c.update(cpu_model="Pentium9000-v7"))
    reseal(bundle, "configuration.json")
    refused(wm, (bundle,), ("vm", "import", str(bundle), "--name", "clone"), EXIT_IMAGE,
            str(bundle / "configuration.json"), "no CPU model 'Pentium9000-v7'",
            "Nothing was changed")


def test_a_bundle_written_before_cpu_models_and_accelerators_imports_unchanged(
        wm: Waymark, tmp_path: Path) -> None:
    """A configuration an earlier Waymark wrote (qemu64, no ``accel`` key) still imports: the
    VM keeps qemu64 (its memory states need it) and gets ``auto``."""
    bundle = bundle_of(wm, tmp_path)

    def earlier(config: dict[str, Any]) -> None:
        config.update(cpu_model="qemu64")
        del config["accel"]

    rewrite(bundle / "configuration.json", earlier)
    reseal(bundle, "configuration.json")
    wm("vm", "import", str(bundle), "--name", "clone")
    shown = wm.json("vm", "show", "clone")
    assert (shown["cpu_model"], shown["accel"], shown["accelerator"]) == ("qemu64", "auto", None)


@pytest.mark.parametrize("how", ["absolute", "relative", "json", "data-file"])
def test_a_bundle_disk_leading_outside_is_not_imported(wm: Waymark, tmp_path: Path,
                                                       how: str) -> None:
    secret = host_secret(tmp_path)
    bundle = bundle_of(wm, tmp_path)
    disk = bundle / "disks" / "disk0.qcow2"
    disk.unlink()
    backing_outside(secret)[how](disk)
    reseal(bundle, "disks/disk0.qcow2")
    refused(wm, (bundle,), ("vm", "import", str(bundle), "--name", "clone"), EXIT_IMAGE,
            "disk0.qcow2")


def test_a_bundle_manifest_naming_a_file_outside_is_not_imported(wm: Waymark,
                                                                tmp_path: Path) -> None:
    secret = host_secret(tmp_path)
    bundle = bundle_of(wm, tmp_path)

    def memory_elsewhere(manifest: dict[str, Any]) -> None:
        manifest["memory"] = str(secret)
        manifest["files"][str(secret)] = file_sha256(secret)

    rewrite(bundle / "manifest.json", memory_elsewhere)
    refused(wm, (bundle,), ("vm", "import", str(bundle), "--name", "clone"), EXIT_IMAGE,
            "manifest.json", str(secret))


def test_a_bundle_manifest_with_a_size_or_limit_that_is_no_number_is_not_imported(
        wm: Waymark, tmp_path: Path) -> None:
    bundle = bundle_of(wm, tmp_path)
    original = (bundle / "manifest.json").read_text()
    rewrite(bundle / "manifest.json", lambda m: m["disks"][0].update(virtual_size="1M"))
    refused(wm, (bundle,), ("vm", "import", str(bundle), "--name", "clone"), EXIT_IMAGE,
            "'1M'", "not a size in bytes")
    (bundle / "manifest.json").write_text(original)
    rewrite(bundle / "manifest.json", lambda m: m["vm"].update(max_checkpoints="many"))
    refused(wm, (bundle,), ("vm", "import", str(bundle), "--name", "clone"), EXIT_INVALID,
            "checkpoint limit 'many' is not a number")


# --- the files a VM needs beyond its disks (kernel, initrd) ----------------------------------

def carrying(wm: Waymark, tmp_path: Path, kind: str) -> tuple[Path, Path, tuple[str, ...]]:
    """VM ``web`` booting a kernel and an initrd, backed up (``repo``) or exported
    (``bundle``): the share's folder, the manifest naming its carried files, and the command
    that restores or imports it."""
    host = tmp_path / "host"
    host.mkdir()
    for name in ("kernel", "initrd"):
        (host / name).write_bytes(f"a {name}\n".encode() * 100)
    wm("vm", "create", "web", "--disk", "1M", "--memory", "128M", "--kernel",
       str(host / "kernel"), "--initrd", str(host / "initrd"))
    if kind == "repo":
        repo = tmp_path / "repo"
        wm("backup", "repo", "init", str(repo))
        point = wm.json("backup", "run", "web", "--repo", str(repo))[0]["point"]
        return repo, manifest_of(repo, point["id"]), (
            "backup", "restore", "web", "--repo", str(repo), "--as-new", "copy")
    bundle = tmp_path / "bundle"
    wm("checkpoint", "create", "web", "--name", "one")
    wm("checkpoint", "export", "web", "one", str(bundle))
    return bundle, bundle / "manifest.json", ("vm", "import", str(bundle), "--name", "copy")


def _carried_elsewhere(root: Path, manifest: dict[str, Any], secret: Path) -> None:
    """The kernel entry names a file of the share outside the carried files' folder."""
    elsewhere = manifest["disks"][0]["file"]
    manifest["vm_files"]["kernel"].update(file=elsewhere, bytes=(root / elsewhere).stat().st_size,
                                          sha256=file_sha256(root / elsewhere))


def _carried_link(root: Path, manifest: dict[str, Any], secret: Path) -> None:
    """The carried kernel replaced by a link to a host file (its size and digest too)."""
    kernel = root / manifest["vm_files"]["kernel"]["file"]
    kernel.unlink()
    kernel.symlink_to(secret)
    manifest["vm_files"]["kernel"].update(bytes=secret.stat().st_size,
                                          sha256=file_sha256(secret))


def _carried_damaged(root: Path, manifest: dict[str, Any], secret: Path) -> None:
    kernel = root / manifest["vm_files"]["kernel"]["file"]
    os.chmod(kernel, 0o600)
    kernel.write_bytes(kernel.read_bytes().replace(b"a", b"A"))
    if "files" in manifest:  # a bundle's own checksums, rewritten by its writer too
        manifest["files"][manifest["vm_files"]["kernel"]["file"]] = file_sha256(kernel)


def _carried_unbooted(root: Path, manifest: dict[str, Any], secret: Path) -> None:
    """The configuration boots no initrd, yet the share carries one."""
    config = root / "configuration.json"
    if config.is_file():
        rewrite(config, lambda c: c.update(initrd=None))
        manifest["files"]["configuration.json"] = file_sha256(config)
    else:
        manifest["vm"]["config"]["initrd"] = None


CARRIED: dict[str, tuple[Callable[[Path, dict[str, Any], Path], None], str]] = {
    "absolute": (lambda r, m, s: m["vm_files"]["kernel"].update(file=str(s)), "outside"),
    "dotdot": (lambda r, m, s: m["vm_files"]["kernel"].update(
        file=os.path.relpath(s, r)), "leads outside"),
    "elsewhere": (_carried_elsewhere, "leads outside"),
    "link": (_carried_link, "leads outside"),
    "key": (lambda r, m, s: m["vm_files"].update(firmware=m["vm_files"].pop("kernel")),
            "'firmware', not one of the files a VM has beyond its disks"),
    "size": (lambda r, m, s: m["vm_files"]["kernel"].update(bytes="1M"), "has the size '1M'"),
    "huge": (lambda r, m, s: m["vm_files"]["kernel"].update(bytes=1 << 40), "has the size"),
    "digest": (lambda r, m, s: m["vm_files"]["kernel"].update(sha256="abc"), "not a sha256"),
    "shape": (lambda r, m, s: m.update(vm_files=["kernel"]), "not a mapping"),
    "damaged": (_carried_damaged, "does not match"),
    "unbooted": (_carried_unbooted, "carries a initrd its configuration does not boot"),
}


@pytest.mark.parametrize("what", sorted(CARRIED))
@pytest.mark.parametrize("kind", ["repo", "bundle"])
def test_a_share_carrying_hostile_boot_files_is_not_restored_or_imported(
        wm: Waymark, tmp_path: Path, kind: str, what: str) -> None:
    secret = host_secret(tmp_path)
    root, manifest, command = carrying(wm, tmp_path, kind)
    craft, says = CARRIED[what]
    rewrite(manifest, lambda m: craft(root, m, secret))
    refused(wm, (root, secret.parent), command, EXIT_IMAGE, says)


# --- library shares ---------------------------------------------------------------------------

def stored(wm: Waymark, tmp_path: Path) -> tuple[Path, Path]:
    """VM ``kept`` (a checkpoint, a NIC) stored in the library ``lib``; its manifest."""
    library = tmp_path / "lib"
    wm("library", "init", str(library))
    vm_id = wm.json("vm", "create", "kept", "--disk", "1M", "--memory", "128M")["id"]
    wm("checkpoint", "create", "kept", "--name", "one")
    wm("vm", "store", "kept", "--library", str(library))
    return library, library / "vms" / vm_id / "manifest.json"


@pytest.mark.parametrize("what", ["initrd", "bridge", "forward", "mac", "cpu"])
@pytest.mark.parametrize("where", ["vm", "checkpoint"])
def test_a_share_carrying_a_hostile_configuration_is_not_deployed(
        wm: Waymark, tmp_path: Path, what: str, where: str) -> None:
    library, manifest = stored(wm, tmp_path)
    rewrite(manifest, lambda m: CONFIGS[what](
        m["vm"]["config"] if where == "vm" else m["checkpoints"][0]["config"]))
    refused(wm, (library,), ("vm", "deploy", "kept", "--library", str(library)), EXIT_IMAGE,
            str(manifest), SAYS[what], "Nothing was changed")


def test_a_share_manifest_leading_outside_is_not_deployed(wm: Waymark, tmp_path: Path) -> None:
    """An image id that climbs out of the VM's folder here, a file name that climbs out of its
    folder there, and a base image whose header names a host file."""
    secret = host_secret(tmp_path)
    library, manifest = stored(wm, tmp_path)
    original = manifest.read_text()
    rewrite(manifest, lambda m: m["images"][0].update(id="../../../../escape"))
    refused(wm, (library,), ("vm", "deploy", "kept", "--library", str(library)), EXIT_IMAGE,
            str(manifest), "../../../../escape")
    manifest.write_text(original)
    rewrite(manifest, lambda m: m["boot"].update({SHADOW: "../../../../../../etc/shadow"}))
    refused(wm, (library,), ("vm", "deploy", "kept", "--library", str(library)), EXIT_IMAGE,
            str(manifest), "etc/shadow")
    manifest.write_text(original)
    base = json.loads(original)["images"][0]
    disk = manifest.parent / base["file"]
    disk.unlink()
    backing_outside(secret)["absolute"](disk)
    rewrite(manifest, lambda m: m["files"][base["file"]].update(
        sha256=file_sha256(disk), size=disk.stat().st_size))
    refused(wm, (library,), ("vm", "deploy", "kept", "--library", str(library)), EXIT_IMAGE,
            base["file"], "must stand alone")


SHAPES: dict[str, Callable[[dict[str, Any]], None]] = {
    "missing": lambda m: m["checkpoints"][0].pop("memory_file"),
    "ill-typed": lambda m: next(iter(m["files"].values())).update(size="1"),
    "unknown": lambda m: m["vm"].update(vm_id="another", name_key="x"),
    "not a list": lambda m: m.update(images={"id": "x"}),
    "no time": lambda m: m["checkpoints"][0].update(created_at="yesterday"),
    # a TPM state swtpm would be handed: base64 of something a TPM state's size, or nothing
    "no tpm state": lambda m: m["checkpoints"][0].update(tpm_state="not base64 !"),
    "huge tpm state": lambda m: m["checkpoints"][0].update(
        tpm_state=base64.b64encode(b"x" * (2 << 20)).decode()),
    "tpm elsewhere": lambda m: m.update(tpm="files/disks/x.qcow2"),
    # notes a terminal or page would act on, or more than fit (waymark.model.notes)
    "hostile notes": lambda m: m["checkpoints"][0].update(notes="ok\x1b[2J\u202e"),
    "huge notes": lambda m: m["checkpoints"][0].update(notes="x" * 4001),
    "notes no text": lambda m: m["checkpoints"][0].update(notes=["a list"]),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_share_manifest_of_another_shape_is_listed_as_damaged_and_not_deployed(
        wm: Waymark, tmp_path: Path, shape: str) -> None:
    """Its fields become catalog rows: a missing, ill-typed or unknown one is refused before
    any is read (never a KeyError or a row built from a stranger's keys)."""
    library, manifest = stored(wm, tmp_path)
    vm_id = manifest.parent.name
    rewrite(manifest, SHAPES[shape])
    listed = wm.json("library", "list", "--library", str(library))
    assert [(v["id"], v["status"]) for v in listed["vms"]] == [(vm_id, "damaged")]
    refused(wm, (library,), ("vm", "deploy", vm_id, "--library", str(library)), EXIT_IMAGE,
            str(manifest), "not a stored VM's manifest", "Nothing was changed")


def test_a_deployed_vm_goes_back_to_the_owner_this_host_stored_it_for_not_the_manifests(
        wm: Waymark, tmp_path: Path) -> None:
    """Whoever writes the share could name any user as the owner and hand them a VM (or take
    one): the owner comes from this host's record of the store, else the administrators."""
    for name in ("alice", "mallory"):
        wm.run("user", "add", name, "--role", "self-service", "--password-stdin",
               input="a long enough password\n").ok()
    users = dict(query(wm.home, "SELECT name, id FROM users"))
    library = tmp_path / "lib"
    wm("library", "init", str(library))
    for vm, owner in (("hers", users["alice"]), ("nobodys", None)):
        vm_id = wm.json("vm", "create", vm, "--disk", "1M", "--memory", "128M")["id"]
        con = sqlite3.connect(wm.home / "catalog.db")
        with con:
            con.execute("UPDATE vms SET owner_id = ? WHERE id = ?", (owner, vm_id))
        con.close()
        wm("vm", "store", vm, "--library", str(library))
        rewrite(library / "vms" / vm_id / "manifest.json",
                lambda m: m["vm"].update(owner_id=users["mallory"]))
    wm("vm", "deploy", "hers", "--library", str(library))
    assert query(wm.home, "SELECT owner_id FROM vms WHERE name = 'hers'") == [(users["alice"],)]
    # stored by another host (this one has no record of it): the administrators'
    con = sqlite3.connect(wm.home / "catalog.db")
    with con:
        con.execute("DELETE FROM stored_vms WHERE name = 'nobodys'")
    con.close()
    wm("vm", "deploy", "nobodys", "--library", str(library))
    assert query(wm.home, "SELECT owner_id FROM vms WHERE name = 'nobodys'") == [(None,)]


# --- CLI input: the same rules --------------------------------------------------------------

CLI_NICS = {"bridge=br0 x": "'br0 x'", "bridge=a-bridge-too-long": "a-bridge-too-long",
            "bridge=..": "'..'", "bridge=br0/../x": "br0/../x", "bridge=": "''",
            "user,hostfwd=tcp::2222-:22:x": "tcp::2222-:22:x",
            "user,hostfwd=tcp::99999-:22": "99999", "user,hostfwd=": "''",
            f"bridge={HELPER_BRIDGE}": "--nic"}


@pytest.mark.parametrize("nic", sorted(CLI_NICS))
def test_cli_nics_follow_the_same_grammar(wm: Waymark, nic: str) -> None:
    wm("vm", "list")
    refused(wm, (), ("vm", "create", "n", "--disk", "1M", "--nic", nic), EXIT_INVALID,
            CLI_NICS[nic])


def test_cli_nics_that_were_good_still_are(wm: Waymark) -> None:
    made = wm.json("vm", "create", "n", "--disk", "1M", "--nic", "user,hostfwd=tcp::2222-:22",
                   "--nic", "bridge=br-lan.10", "--nic", "user")
    assert made["id"]
