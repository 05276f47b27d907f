"""A Generation 2 VM (UEFI with Secure Boot, a TPM 2.0) booting the test guest from its own disk
(Debian's signed shim and GRUB): from inside the guest an EFI variable and a TPM NV index are set,
checkpoints taken, both changed, and every way back gives exactly the values of the instant it
was taken: a production checkpoint applied (a cold boot), a standard one (the guest resumes, its
counter continuing), a live delete of the middle checkpoint of three, a backup restored as a new
VM, an export imported, a store and deploy. One VM boots for the module; each boot of UEFI under
TCG costs 15-30 s on these machines, so the tests share boots where one proves several things.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.firmware_guest import (
    NV_INDEX,
    define_nv_index,
    nv_indices,
    read_efi_variable,
    read_nv,
    set_efi_variable,
    tpm_present,
    write_nv,
)
from tests.guest.guests import Guest, readies, wait_for
from tests.guest.screens import lit_rows, png_pixels
from tests.helpers import Waymark, content_sha256, file_sha256, query

GLOBAL_VARIABLES = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")  # EFI_GLOBAL_VARIABLE
UEFI_BOOT = 240.0  # seconds: OVMF with SMM under TCG on a loaded 2-core machine
VARIABLE = "WaymarkCheckpoint"
SIZE = 8


def values(vm: Guest) -> tuple[bytes, bytes]:
    """What the guest reads now: the EFI variable's data and the TPM NV index."""
    found = read_efi_variable(vm, VARIABLE)
    assert found is not None, "the EFI variable is gone"
    return found[1], read_nv(vm, SIZE)


def set_values(vm: Guest, text: str) -> tuple[bytes, bytes]:
    value = text.encode().ljust(SIZE, b".")
    set_efi_variable(vm, VARIABLE, value)
    write_nv(vm, value)
    assert values(vm) == (value, value)
    return value, value


def boot(vm: Guest, *options: str) -> int:
    mark = vm.mark()
    vm.wm("vm", "start", vm.name, *options)
    vm.wait_ready(mark, UEFI_BOOT)
    return mark


def apply(vm: Guest, checkpoint: str) -> int:
    """Apply with --start; returns the serial log's mark before it."""
    mark = vm.mark()
    vm.wm("checkpoint", "apply", vm.name, checkpoint, "--discard-current", "--start")
    return mark


@pytest.fixture(scope="module")
def gen2(home: Waymark, image: dict[str, str]) -> Iterator[Guest]:
    """The test guest's boot disk as a Secure Boot VM with a TPM, booted; an NV index defined.
    (512 MiB: with Secure Boot and 256 MiB, this kernel resets after its EFI stub in some boots.)"""
    home("vm", "create", "gen2", "--disk", image["boot_disk"], "--memory", "512M",
         "--firmware", "uefi-secure", "--tpm", "on")
    vm = Guest(home, "gen2")
    mark = boot(vm)
    # Debian's shim, signed GRUB and signed kernel ran under Microsoft's keys
    assert "Secure boot enabled" in vm.since(mark), vm.since(mark)[-3000:]
    assert tpm_present(vm)
    define_nv_index(vm, SIZE)
    yield vm


def test_the_screen_of_a_uefi_vm_is_drawn_through_ovmf(gen2: Guest, tmp_path: Path) -> None:
    """The standard VGA under OVMF: the guest's console on the UEFI frame buffer, in a PNG.
    First of the file: the VM as its fixture booted it (later tests stop and apply it)."""
    shot = tmp_path / "gen2.png"
    lit = wait_for("text on the UEFI screen", lambda: lit_rows(png_pixels(
        screenshot_bytes(gen2, shot))[2]), 60)
    width, height, _ = png_pixels(shot.read_bytes())
    assert width >= 640 and height >= 400 and lit, (width, height)


def test_a_secure_boot_vm_with_a_tpm_boots_its_own_disk_and_production_checkpoints_hold_both(
        gen2: Guest) -> None:
    vm = gen2
    secure = read_efi_variable(vm, "SecureBoot", guid=GLOBAL_VARIABLES)
    assert secure is not None and secure[1] == b"\x01", secure
    held = set_values(vm, "prod")
    made = vm.wm.json("checkpoint", "create", vm.name, "--name", "p", "--type", "production")
    assert made["kind"] == "production" and made["freeze_seconds"] is not None, made
    set_values(vm, "after-p")
    mark = apply(vm, "p")
    vm.wait_ready(mark, UEFI_BOOT)  # a production checkpoint applies as a cold boot
    assert values(vm) == held
    assert nv_indices(vm).count(NV_INDEX) == 1


def test_a_standard_checkpoint_resumes_with_the_variable_and_tpm_value_of_its_instant(
        gen2: Guest) -> None:
    vm = gen2
    held = set_values(vm, "standard")
    made = vm.wm.json("checkpoint", "create", vm.name, "--name", "s", "--type", "standard")
    assert made["kind"] == "standard", made
    set_values(vm, "after-s")
    mark = apply(vm, "s")
    seen = vm.wait_counter_above(mark, 0)
    assert readies(vm.since(mark)) == [] and min(seen) > 1, seen  # it resumed, not booted
    assert values(vm) == held


def test_killed_while_the_guest_is_stopped_for_the_tpm_copy_the_next_command_continues_it(
        gen2: Guest) -> None:
    """Waymark SIGKILLed between stopping the guest's CPUs (to copy the TPM state with the
    disks' switch) and continuing them: the next command's recovery continues the guest, and
    the checkpoint, whose disks never switched, did not happen."""
    vm = gen2
    before = [c["name"] for c in vm.wm.json("checkpoint", "list", vm.name)["checkpoints"]]
    killed = vm.wm.run("checkpoint", "create", vm.name, "--name", "k", "--type", "production",
                       env=vm.wm.env(WAYMARK_FAILPOINT="tpm-copied"))
    assert killed.returncode == -9, killed
    after = [c["name"] for c in vm.wm.json("checkpoint", "list", vm.name)["checkpoints"]]
    assert after == before and vm.state() == "running"
    mark = vm.mark()
    vm.wait_counter_above(mark, 0, timeout=30.0)  # it runs on
    assert vm.wm.json("check", vm.name)["findings"] == []


def test_a_live_delete_of_the_middle_of_three_keeps_the_other_two_exact(gen2: Guest) -> None:
    """m2 is merged away while the VM runs; m3 (whose layer the merge touches) boots with its
    values, and m1's frozen variable store and TPM state are the bytes they were."""
    vm = gen2
    held = {}
    for name in ("m1", "m2", "m3"):
        held[name] = set_values(vm, name)
        vm.wm("checkpoint", "create", vm.name, "--name", name, "--type", "production")
    now = set_values(vm, "now")
    before = frozen_state(vm, "m1")
    vm.wm("checkpoint", "delete", vm.name, "m2")  # merged while the VM runs
    assert vm.state() == "running" and values(vm) == now
    assert frozen_state(vm, "m1") == before
    mark = apply(vm, "m3")
    vm.wait_ready(mark, UEFI_BOOT)
    assert values(vm) == held["m3"]
    assert vm.wm.json("check", vm.name)["findings"] == []


def frozen_state(vm: Guest, checkpoint: str) -> tuple[str, str]:
    """A checkpoint's variable store (content of its frozen chain) and TPM state, as bytes'
    digests."""
    (vars_image, tpm_state), = query(
        vm.wm.home, "SELECT i.path, c.tpm_state FROM checkpoints c JOIN vms v ON v.id = c.vm_id "
        "JOIN frozen_images f ON f.checkpoint_id = c.id JOIN images i ON i.id = f.image_id "
        "WHERE v.name = ? AND c.name = ? AND f.disk_id = json_extract(v.config, '$.nvram')",
        vm.name, checkpoint)
    return content_sha256(vars_image), hashlib.sha256(base64.b64decode(tpm_state)).hexdigest()


def now_state(wm: Waymark, name: str) -> tuple[str, str]:
    """Now's variable store (its chain's content) and TPM state file, as digests."""
    shown = wm.json("vm", "show", name)
    tpm = wm.home / "vms" / shown["id"] / "tpm" / "tpm2-00.permall"
    return content_sha256(shown["firmware_variables"]["active_image"]), file_sha256(tpm)


def test_backup_export_and_store_carry_the_variable_and_the_tpm(gen2: Guest, tmp_path: Path
                                                                ) -> None:
    """A backup of the running VM (its TPM state copied at the backup's instant) restored as a
    new VM boots with the values of that instant; an imported export and a stored and deployed
    VM hold exactly the bytes of the variable store and TPM state they left with (those bytes
    boot with the values: the tests above)."""
    vm, wm = gen2, gen2.wm
    backed = set_values(vm, "backup")
    repo = tmp_path / "repo"
    wm("backup", "repo", "init", str(repo))
    point = wm.json("backup", "run", vm.name, "--repo", str(repo))[0]["point"]
    assert point["consistency"].startswith("application-consistent"), point
    set_values(vm, "export")
    wm("checkpoint", "create", vm.name, "--name", "x", "--type", "production")
    wm("checkpoint", "export", vm.name, "x", str(tmp_path / "bundle"))
    wm("vm", "import", str(tmp_path / "bundle"), "--name", "imported")
    assert now_state(wm, "imported") == frozen_state(vm, "x")
    wm("backup", "restore", vm.name, "--repo", str(repo), "--as-new", "restored")
    wm("vm", "stop", vm.name)  # a clean shutdown: the TPM's state is written; one guest at once
    restored = Guest(wm, "restored")
    boot(restored)
    assert values(restored) == backed
    wm("vm", "stop", "restored", "--force")
    left = now_state(wm, vm.name)
    library = tmp_path / "library"
    wm("library", "init", str(library))
    wm("vm", "store", vm.name, "--library", str(library))
    wm("vm", "deploy", vm.name, "--library", str(library))
    assert now_state(wm, vm.name) == left
    assert frozen_state(vm, "x") == now_state(wm, "imported")


def screenshot_bytes(vm: Guest, dest: Path) -> bytes:
    vm.wm("vm", "screenshot", vm.name, str(dest))
    return dest.read_bytes()
