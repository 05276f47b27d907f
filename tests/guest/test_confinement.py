"""QEMU runs confined (issue 17, finding 4): never as root, under its seccomp sandbox, opening
nothing by path, and every live operation still works.

The VM's disk is a file the user brings from a private folder (0700, root's): an overlay whose
backing file is the test guest's data disk, so QEMU must read a user's image *and its backing
chain* that its own user could not even reach by path. One VM, ``c``, boots once for the module.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.guests import Guest, assert_clear_error, create, wait_for
from tests.helpers import Waymark

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@pytest.fixture(scope="module")
def private_disk(image: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The user's own image: an overlay on the guest's data disk, in a folder only root reads."""
    folder = tmp_path_factory.mktemp("private") / "images"
    folder.mkdir(mode=0o700)
    base = folder / "base.qcow2"
    shutil.copyfile(image["disk"], base)
    top = folder / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    str(top)], check=True)
    for path in (base, top):
        path.chmod(0o600)
    return str(top)


@pytest.fixture(scope="module")
def vm(home: Waymark, image: dict[str, str], private_disk: str) -> Guest:
    return create(home, "c", image, disk=private_disk)


@pytest.fixture(scope="module")
def repo(home: Waymark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("backups") / "repo"
    home("backup", "repo", "init", str(path))
    return path


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def qemu_pid(vm: Guest) -> int:
    pid = vm.status()["pid"]
    assert isinstance(pid, int) and vm.qemus() == [pid], (pid, vm.qemus())
    return pid


def assert_confined(pid: int) -> None:
    """Real, effective, saved and file-system uid and gid are not root; seccomp filters on."""
    status = status_of(pid)
    uids, gids = status["Uid"].split(), status["Gid"].split()
    assert "0" not in uids and "0" not in gids, (uids, gids)
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1", status
    assert status["CapEff"] == "0000000000000000", status
    if os.geteuid() == 0:
        assert pwd.getpwuid(int(uids[0])).pw_name == "waymark-qemu"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"-sandbox") + 1].decode() == SANDBOX


def assert_no_path_opened(pid: int, private_disk: str) -> None:
    """QEMU names no image by path: each is an fd set it was handed."""
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    blockdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    files = [b["file"]["filename"] for b in blockdevs]
    assert files and all(re.fullmatch(r"/dev/fdset/\d+", f) for f in files), files
    assert f"opaque={private_disk}" in " ".join(argv)


def backup(vm: Guest, repo: Path) -> dict[str, Any]:
    (row,) = vm.wm.json("backup", "run", vm.name, "--repo", str(repo))
    assert row["ok"], row
    return dict(row)


def test_qemu_runs_unprivileged_in_its_sandbox(vm: Guest, private_disk: str) -> None:
    vm.boot()
    pid = qemu_pid(vm)
    assert_confined(pid)
    assert_no_path_opened(pid, private_disk)
    # the user's files keep their owner and mode: nothing was chowned or opened up for QEMU
    folder = Path(private_disk).parent
    for path in (folder, *folder.iterdir()):
        assert path.stat().st_uid == os.geteuid(), path
    assert folder.stat().st_mode & 0o077 == 0
    # the run folder is root's alone but for the VNC socket's folder, QEMU's user's (QEMU binds
    # the socket itself), owner-only
    display = vm.run_dir / "display"
    qemu_uid = pwd.getpwnam("waymark-qemu").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert display.stat().st_uid == qemu_uid
    assert display.stat().st_mode & 0o777 == 0o700 and (display / "vnc.sock").is_socket()
    others = [p for p in vm.run_dir.iterdir() if p != display]
    assert others and all(p.stat().st_uid == os.geteuid() for p in others), others


def test_live_checkpoint_merge_and_backup_still_work(vm: Guest, repo: Path) -> None:
    vm.ensure_running()
    pid = qemu_pid(vm)
    mark = vm.mark()
    vm.wait_counter_above(mark, 0)
    made = vm.wm("checkpoint", "create", vm.name, "--name", "one", "--type", "standard")
    assert "standard" in made.stdout
    vm.wm("checkpoint", "create", vm.name, "--name", "two", "--type", "standard")
    vm.wm("checkpoint", "delete", vm.name, "one")  # a live merge (block-commit)
    vm.wm("checkpoint", "delete", vm.name, "two")  # the active image's parent: a live merge
    first, second = backup(vm, repo), backup(vm, repo)
    assert "full" in json.dumps(first) and "incremental" in json.dumps(second)
    rows = vm.wm.json("backup", "verify", "--repo", str(repo))
    assert all(r["problems"] == [] for r in rows), rows
    checked = vm.wm.run("check", "--json")
    assert checked.returncode == 0 and checked.json()["clean"], checked.stdout + checked.stderr
    # the same confined QEMU did it all, and the guest kept running
    assert qemu_pid(vm) == pid and vm.state() == "running"
    assert_confined(pid)
    # backing links QEMU rewrote name the files, not the descriptors it was handed
    shown = vm.wm.json("vm", "show", vm.name)
    chain = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json",
                            shown["disks"][0]["active_image"]], capture_output=True, text=True,
                           check=True).stdout
    assert "/dev/fdset" not in chain, chain


def test_a_saved_memory_state_resumes_confined(vm: Guest) -> None:
    vm.ensure_running()
    vm.wm("vm", "save", vm.name)
    mark = vm.mark()
    vm.wm("vm", "start", vm.name)
    vm.wait_counter_above(mark, 0)
    assert_confined(qemu_pid(vm))
    vm.wm("vm", "stop", vm.name, "--force")
    wait_for("QEMU gone", lambda: vm.qemus() == [], 10.0)


@pytest.mark.root  # the QEMU user is chosen only when run as root
@pytest.mark.parametrize(("user", "fragments"), [
    ("root", ("QEMU user 'root' is root", "WAYMARK_QEMU_USER")),
    ("no such user!", ("could not be created", "useradd --system")),
])
def test_a_bad_qemu_user_is_refused_and_nothing_starts(vm: Guest, user: str,
                                                       fragments: tuple[str, ...]) -> None:
    vm.ensure_off()
    refused = vm.wm.run("vm", "start", vm.name, env=vm.wm.env(WAYMARK_QEMU_USER=user))
    assert_clear_error(refused, *fragments)
    assert vm.state() == "off" and vm.qemus() == []


@pytest.fixture
def bridge() -> Iterator[str]:
    """A host bridge of the test's own (removed afterwards)."""
    if shutil.which("ip") is None:
        raise RuntimeError("missing ip (apt-get install -y iproute2)")
    name = "wmtest0"
    subprocess.run(["ip", "link", "add", "name", name, "type", "bridge"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "delete", name], check=False)


def ports(bridge: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show", "master", bridge], capture_output=True,
                         text=True, check=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


@pytest.mark.root  # a tap device on a bridge
def test_a_bridge_nic_gets_a_tap_device_made_for_it(home: Waymark, image: dict[str, str],
                                                   bridge: str) -> None:
    """QEMU, unprivileged and unable to run a helper, gets the tap device open: it is plugged
    into the bridge while the VM runs and gone with it."""
    home("vm", "create", "nic", "--kernel", image["kernel"], "--initrd", image["initrd"],
         "--disk", image["disk"], "--memory", "256M", "--append", image["append"],
         "--nic", f"bridge={bridge}")
    vm = Guest(home, "nic")
    home("vm", "start", vm.name)
    try:
        pid = qemu_pid(vm)
        assert_confined(pid)
        assert len(ports(bridge)) == 1, ports(bridge)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert any(a.startswith(b"tap,id=net0,fd=") for a in argv), argv
    finally:
        home("vm", "stop", vm.name, "--force")
    wait_for("the tap device gone", lambda: ports(bridge) == [], 10.0)
    home("vm", "delete", vm.name, "--yes")
