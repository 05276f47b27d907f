"""The edges a real distribution hits (issue 19, item 7), on the test guest: its clock is set
after it ran from a memory state, a production checkpoint names the program that holds the
guest agent's socket, and a VM restored from a backup or imported from a bundle boots with
the boot files it carries when the host's are gone."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.guests import Guest, agent_exec, assert_clear_error, create, wait_for
from tests.helpers import Waymark

pytestmark = pytest.mark.guest

CLOCK_SLACK = 2.0  # seconds: what the guest's clock may differ from the host's after a set


@pytest.fixture(scope="module")
def vm(home: Waymark, image: dict[str, str]) -> Guest:
    guest = create(home, "edges", image)
    guest.boot()
    return guest


def assert_clock_is_the_hosts(vm: Guest, what: str) -> None:
    before = time.time()
    guest_now = int(agent_exec(vm, "/bin/date", "+%s").strip())
    after = time.time()
    assert before - CLOCK_SLACK <= guest_now <= after + CLOCK_SLACK, (
        f"after {what} the guest's clock is {guest_now - after:+.0f} s off the host's")


def test_the_guest_clock_is_set_after_it_ran_from_a_memory_state(vm: Guest) -> None:
    vm.ensure_running()
    vm.wm("checkpoint", "create", vm.name, "--type", "standard", "--name", "tick")
    vm.wm("vm", "save", vm.name)
    time.sleep(6)  # the saved guest's clock stands still meanwhile
    vm.wm("vm", "start", vm.name)
    assert_clock_is_the_hosts(vm, "a save and a start 6 s later")

    vm.wm("checkpoint", "apply", vm.name, "tick", "--discard-current", "--start")
    assert_clock_is_the_hosts(vm, "applying a standard checkpoint taken 6 s earlier")

    vm.wm("vm", "pause", vm.name)
    time.sleep(4)
    vm.wm("vm", "resume", vm.name)
    assert_clock_is_the_hosts(vm, "a pause of 4 s")


@pytest.fixture
def held_agent(vm: Guest) -> Iterator[Path]:
    """Another program connected to the agent socket (QEMU accepted it), until the test ends."""
    vm.ensure_running()
    agent_exec(vm, "/bin/true")  # the agent answers (and its socket is free again)
    path = vm.run_dir / "qga.sock"
    with socket.socket(socket.AF_UNIX) as holder:
        holder.connect(str(path))
        wait_for("the agent socket's client", lambda: not next(
            c for c in vm.qmp_command("query-chardev") if c["label"] == "qga0"
        )["filename"].startswith("disconnected:"), 10.0)
        yield path


def test_a_production_checkpoint_names_the_program_holding_the_agent_socket(
        vm: Guest, held_agent: Path, tmp_path: Path) -> None:
    says = f"another program is connected to the guest agent's socket {held_agent}"
    began = time.monotonic()
    ckpt = vm.wm.json("checkpoint", "create", vm.name, "--type", "production")
    assert ckpt["kind"] == "standard", ckpt
    assert says in ckpt["fallback_reason"] and "disconnect it" in ckpt["fallback_reason"], ckpt
    assert "guest-sync-delimited" not in ckpt["fallback_reason"], ckpt
    assert time.monotonic() - began < 30
    refused = vm.wm.run("checkpoint", "create", vm.name, "--type", "productiononly")
    assert_clear_error(refused, says, "Nothing was created")
    vm.wm("backup", "repo", "init", str(tmp_path / "repo"))  # a backup says the same
    point = vm.wm.json("backup", "run", vm.name, "--repo", str(tmp_path / "repo"))[0]["point"]
    assert point["consistency"].startswith("crash-consistent: ") and \
        says in point["consistency"], point


def test_a_production_checkpoint_freezes_once_the_socket_is_free(vm: Guest) -> None:
    vm.ensure_running()
    ckpt = vm.wm.json("checkpoint", "create", vm.name, "--type", "production")
    assert ckpt["kind"] == "production" and ckpt["fallback_reason"] is None, ckpt


def test_a_vm_restored_or_imported_boots_its_carried_files_when_the_hosts_are_gone(
        home: Waymark, image: dict[str, str], tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    own = {key: str(shutil.copy(image[key], host / key)) for key in ("kernel", "initrd")}
    source = create(home, "carrier", image, **own)
    repo, bundle = tmp_path / "repo", tmp_path / "bundle"
    home("backup", "repo", "init", str(repo))
    home("backup", "run", source.name, "--repo", str(repo))
    home("checkpoint", "create", source.name, "--name", "off")
    home("checkpoint", "export", source.name, "off", str(bundle))
    for path in own.values():
        Path(path).rename(f"{path}.gone")

    assert_clear_error(home.run("vm", "start", source.name), "does not exist",
                       f"waymark vm set {source.name} --kernel FILE")
    home("backup", "restore", source.name, "--repo", str(repo), "--as-new", "restored")
    home("vm", "import", str(bundle), "--name", "imported")
    for name in ("restored", "imported"):
        copy = Guest(home, name)
        assert home.json("vm", "show", name)["kernel"].startswith(str(home.home / "vms"))
        copy.boot()
        home("vm", "stop", name, "--force")
