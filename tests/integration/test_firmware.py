"""A UEFI VM's variable store and a VM's TPM are VM state like its disks, with no guest needed to
show it: the variable store is changed with qemu-io, the TPM with the real tpm2-tools over a
swtpm this test starts on the VM's TPM state (loopback only), as a guest would change them.
Every checkpoint holds both as they were at its instant; apply, delete, export/import, backup
and restore, store and deploy keep them exact. (The guest tests boot OVMF with swtpm and change
both from inside the guest.)"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Waymark, content_sha256, file_sha256, qemu_io_write, query
from tests.tpm_host import NV, nv_read, nv_write, tpm2, tpm_session

OVMF = Path("/usr/share/OVMF")
VM = "gen2"


def tpm_folder(wm: Waymark, vm: str = VM) -> Path:
    return wm.home / "vms" / wm.json("vm", "show", vm)["id"] / "tpm"


def variables(wm: Waymark, vm: str = VM) -> str:
    """The VM's active variable-store image."""
    store = wm.json("vm", "show", vm)["firmware_variables"]
    assert store is not None
    return str(store["active_image"])


def set_state(wm: Waymark, pattern: int, value: str, vm: str = VM) -> tuple[str, str]:
    """Now's variable store gets a block of ``pattern`` and the TPM's NV index ``value``;
    returns (variable store content, NV value) as the guest would read them."""
    qemu_io_write(Path(variables(wm, vm)), "qcow2", 0x1000, 0x1000, pattern)
    nv_write(tpm_folder(wm, vm), value)
    return observed(wm, vm)


def observed(wm: Waymark, vm: str = VM) -> tuple[str, str]:
    return content_sha256(variables(wm, vm)), nv_read(tpm_folder(wm, vm))


def make(wm: Waymark, firmware: str = "uefi", vm: str = VM) -> dict[str, Any]:
    return wm.json("vm", "create", vm, "--disk", "1M", "--memory", "256M",
                   "--firmware", firmware, "--tpm", "on")


# --- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("firmware", "template"), [("uefi", "OVMF_VARS_4M.fd"),
                                                    ("uefi-secure", "OVMF_VARS_4M.ms.fd")])
def test_a_uefi_vm_owns_a_copy_of_its_firmwares_variable_template_and_a_new_tpm(
        wm: Waymark, firmware: str, template: str) -> None:
    shown = make(wm, firmware)
    assert (shown["firmware"], shown["tpm"]) == (firmware, True)
    assert [d["virtual_size"] for d in shown["disks"]] == [1 << 20]  # the guest's one disk
    store = shown["firmware_variables"]
    assert store["virtual_size"] == (OVMF / template).stat().st_size
    assert content_sha256(store["active_image"]) == file_sha256(OVMF / template)
    assert nv_read_or_none(tpm_folder(wm)) is None  # a new TPM: manufactured, nothing defined
    refused = wm.run("vm", "disk", "remove", VM, store["id"][:12])
    assert refused.returncode == 5 and "UEFI variable store" in refused.stderr, refused
    assert wm.json("check")["findings"] == []
    wm("vm", "delete", VM, "--yes")
    assert not (wm.home / "vms" / shown["id"]).exists()


def nv_read_or_none(folder: Path) -> str | None:
    with tpm_session(folder) as env:
        return tpm2(env, "nvread", NV, "-C", "o", "-s", "16").strip() \
            if NV in tpm2(env, "nvreadpublic") else None


def test_each_checkpoint_holds_the_variables_and_tpm_of_its_instant_apply_and_delete_keep_them(
        wm: Waymark) -> None:
    make(wm)
    held = {}
    for n, name in enumerate(("c1", "c2", "c3"), start=1):
        held[name] = set_state(wm, 0x10 * n, f"value-{name}")
        wm("checkpoint", "create", VM, "--name", name)
    now = set_state(wm, 0x44, "value-now")
    assert len({*held.values(), now}) == 4
    tpm_states = dict(query(wm.home, "SELECT name, tpm_state FROM checkpoints"))
    assert all(base64.b64decode(s) for s in tpm_states.values())
    for name in ("c1", "c3", "c2"):
        wm("checkpoint", "apply", VM, name, "--discard-current")
        assert observed(wm) == held[name], name
    wm("checkpoint", "delete", VM, "c2")  # the middle one: its layer merges
    for name in ("c3", "c1"):
        wm("checkpoint", "apply", VM, name, "--discard-current")
        assert observed(wm) == held[name], name
    assert wm.json("check")["findings"] == []


def test_export_import_backup_restore_and_store_deploy_carry_the_variables_and_the_tpm(
        wm: Waymark, tmp_path: Path) -> None:
    make(wm)
    first = set_state(wm, 0x21, "first")
    wm("checkpoint", "create", VM, "--name", "first")
    second = set_state(wm, 0x22, "second")

    wm("checkpoint", "export", VM, "first", str(tmp_path / "bundle"))
    assert (tmp_path / "bundle" / "tpm.state").is_file()
    wm("vm", "import", str(tmp_path / "bundle"), "--name", "imported")
    assert observed(wm, "imported") == first

    repo = tmp_path / "repo"
    wm("backup", "repo", "init", str(repo))
    wm("backup", "run", VM, "--repo", str(repo))
    wm("backup", "restore", VM, "--repo", str(repo), "--as-new", "restored")
    assert observed(wm, "restored") == second
    set_state(wm, 0x23, "third")
    wm("backup", "restore", VM, "--repo", str(repo), "--discard-current")
    assert observed(wm) == second

    library = tmp_path / "library"
    wm("library", "init", str(library))
    wm("vm", "store", VM, "--library", str(library))
    wm("vm", "deploy", VM, "--library", str(library))
    assert observed(wm) == second
    wm("checkpoint", "apply", VM, "first", "--discard-current")
    assert observed(wm) == first
    assert wm.json("check")["findings"] == []


def test_a_vm_whose_tpm_state_is_missing_or_damaged_refuses_to_start(wm: Waymark) -> None:
    """Never a new, empty TPM in place of the VM's own (sealed keys would be lost)."""
    make(wm)
    state = tpm_folder(wm) / "tpm2-00.permall"
    kept = state.read_bytes()
    state.unlink()
    missing = wm.run("vm", "start", VM)
    assert missing.returncode == 3 and "TPM state" in missing.stderr \
        and "missing" in missing.stderr, missing
    assert wm.json("vm", "show", VM)["state"] == "off" and not state.exists()
    state.write_bytes(kept[:100])
    damaged = wm.run("vm", "start", VM)
    assert damaged.returncode == 3 and "damaged" in damaged.stderr, damaged
    assert wm.json("vm", "show", VM)["state"] == "off"
    assert state.read_bytes() == kept[:100]  # left as it was, for whoever looks into it


def test_a_tpm_state_read_from_outside_must_be_one(wm: Waymark, tmp_path: Path) -> None:
    """A backup point's manifest (others may write the repository) whose TPM state is not
    base64 of a TPM state is refused, naming it, and nothing is restored."""
    make(wm)
    repo = tmp_path / "repo"
    wm("backup", "repo", "init", str(repo))
    point = wm.json("backup", "run", VM, "--repo", str(repo))[0]
    manifest = next(repo.rglob(f"{point['point']['id']}.json"))
    doc = json.loads(manifest.read_text())
    for bad in ("not base64 !", base64.b64encode(b"").decode(),
                base64.b64encode(b"x" * (2 << 20)).decode()):
        manifest.write_text(json.dumps({**doc, "tpm_state": bad}))
        refused = wm.run("backup", "restore", VM, "--repo", str(repo), "--as-new", "copy")
        assert refused.returncode == 8 and "TPM state" in refused.stderr, refused
    assert [v["name"] for v in wm.json("vm", "list")] == [VM]


def test_links_left_in_the_tpm_folder_are_never_followed(wm: Waymark, tmp_path: Path) -> None:
    """The TPM folder belongs to QEMU's user while the VM runs, and a guest may take swtpm over:
    a link it leaves in place of the state or the log is never read, written or chowned
    through (a root-only file stays as it was), and the VM refuses to start or checkpoint."""
    make(wm)
    folder = tpm_folder(wm)
    secret = tmp_path / "root-only"
    secret.write_bytes(b"root's secret")
    secret.chmod(0o600)
    owner = secret.stat()
    state = folder / "tpm2-00.permall"
    kept = state.read_bytes()
    state.unlink()
    state.symlink_to(secret)
    for command in (("vm", "start", VM), ("checkpoint", "create", VM, "--name", "x"),
                    ("vm", "store", VM, "--library", str(tmp_path / "lib"))):
        if command[1] == "store":
            wm("library", "init", str(tmp_path / "lib"))
        refused = wm.run(*command)
        assert refused.returncode == 3 and "not a plain TPM state file" in refused.stderr, refused
    state.unlink()
    state.write_bytes(kept)
    (folder / "swtpm.log").unlink(missing_ok=True)
    (folder / "swtpm.log").symlink_to(secret)
    started = wm.run("vm", "start", VM)  # QEMU cannot boot a 1 MiB empty disk; swtpm still runs
    wm.run("vm", "stop", VM, "--force")
    assert secret.read_bytes() == b"root's secret", started
    assert (secret.stat().st_uid, secret.stat().st_mode) == (owner.st_uid, owner.st_mode)
    wm("checkpoint", "create", VM, "--name", "y")
    wm("checkpoint", "apply", VM, "y", "--discard-current")  # a new folder, links gone
    assert not (folder / "swtpm.log").is_symlink()
    assert query(wm.home, "SELECT count(*) FROM checkpoints")[0][0] == 1
