"""Bad input: a clear message on stderr, the documented exit code, and nothing changed.

"Nothing changed" is checked the way a user would see it: ``vm list --json``, each VM's
``checkpoint list --json``, and every file under the home (its path and, but for the catalog
database, its bytes) are the same before and after.

Most tests share one home, ``world``, built once: VM ``web`` with a disk and checkpoints, two of
them named ``dup`` and two whose ids start with the same hex digit. Every test must leave it as
it found it (``world.assert_unchanged``).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ERROR_KEYS, Result, Waymark, file_sha256, qemu_io_write
from tests.integration.test_check import leak_a_cluster

EXIT_INVALID, EXIT_NOT_FOUND, EXIT_AMBIGUOUS, EXIT_CONFLICT = 2, 3, 4, 5
EXIT_IMAGE, EXIT_STORAGE, EXIT_BUSY = 8, 73, 75


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def files(home: Path) -> dict[str, str | None]:
    """Every file under ``home``: its sha256 (None for the catalog: the CLI shows its content)."""
    return {str(p.relative_to(home)): None if p.name.startswith("catalog.db") else file_sha256(p)
            for p in sorted(home.rglob("*")) if p.is_file()}


def state(wm: Waymark) -> dict[str, Any]:
    vms = wm.json("vm", "list")
    return {"vms": vms,
            "checkpoints": {vm["id"]: wm.json("checkpoint", "list", vm["id"]) for vm in vms},
            "files": files(wm.home)}


def assert_fails(wm: Waymark, *args: str, code: int, says: str | tuple[str, ...],
                 env: dict[str, str] | None = None) -> Result:
    """``waymark ARGS`` exits with ``code`` and explains itself on stderr, without a traceback."""
    result = wm.run(*args, env=env)
    assert result.returncode == code, result
    for phrase in (says,) if isinstance(says, str) else says:
        assert phrase in result.stderr, result
    assert result.stderr.startswith("error: "), result
    assert "Traceback" not in result.stderr, result
    assert result.stdout == "", result
    return result


@dataclass
class World:
    wm: Waymark
    checkpoints: list[dict[str, Any]]
    before: dict[str, Any]

    def fails(self, *args: str, code: int, says: str | tuple[str, ...],
              env: dict[str, str] | None = None) -> Result:
        result = assert_fails(self.wm, *args, code=code, says=says, env=env)
        assert files(self.wm.home) == self.before["files"], f"{args} changed files in the home"
        return result

    def assert_unchanged(self) -> None:
        assert state(self.wm) == self.before

    def named(self, name: str) -> list[dict[str, Any]]:
        return [c for c in self.checkpoints if c["name"] == name]

    def sharing_a_prefix(self) -> tuple[str, list[dict[str, Any]]]:
        """A one-character id prefix and the checkpoints whose ids start with it."""
        prefix = next(c["id"][0] for c in self.checkpoints
                      if sum(o["id"][0] == c["id"][0] for o in self.checkpoints) > 1)
        return prefix, [c for c in self.checkpoints if c["id"].startswith(prefix)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    wm = Waymark(tmp_path_factory.mktemp("world") / "home")
    vm_id = wm.json("vm", "create", "web", "--disk", "1M")["id"]
    ids = [wm.json("checkpoint", "create", "web", "--name", name)["id"]
           for name in ("base", "dup", "dup")]
    # ids are random: add checkpoints until two share a first hex digit (17 guarantee it)
    while len({i[0] for i in ids}) == len(ids):
        ids.append(wm.json("checkpoint", "create", "web")["id"])
    before = state(wm)
    return World(wm, before["checkpoints"][vm_id]["checkpoints"], before)


def test_unknown_vm_or_checkpoint(world: World) -> None:
    world.fails("checkpoint", "create", "nope", code=EXIT_NOT_FOUND,
                says="no VM is named 'nope'")
    world.fails("checkpoint", "show", "web", "nope", code=EXIT_NOT_FOUND,
                says=("no checkpoint of web is named 'nope'", "waymark checkpoint list web"))
    world.fails("checkpoint", "apply", "web", "nope", "--discard-current",
                code=EXIT_NOT_FOUND, says="no checkpoint of web is named 'nope'")

    # with --json the error is also on stdout, machine-readable
    result = world.wm.run("vm", "delete", "nope", "--yes", "--json")
    assert result.returncode == EXIT_NOT_FOUND, result
    body = json.loads(result.stdout)  # the API's envelope (docs/api.md, "Errors")
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert (error["kind"], error["code"], error["exit_code"]) == \
        ("NotFound", "not_found", EXIT_NOT_FOUND)
    assert "no VM is named 'nope'" in error["message"]
    assert "waymark vm list" in error["hint"]
    assert error["details"] == {}
    world.assert_unchanged()


def test_ambiguous_checkpoint_reference_lists_the_candidates(world: World) -> None:
    dups = world.named("dup")
    assert len(dups) == 2
    candidates = tuple(c["id"][:12] for c in dups)
    world.fails("checkpoint", "show", "web", "dup", code=EXIT_AMBIGUOUS,
                says=("2 checkpoints of web match 'dup'", *candidates))
    world.fails("checkpoint", "apply", "web", "dup", "--discard-current", code=EXIT_AMBIGUOUS,
                says=candidates)

    prefix, sharing = world.sharing_a_prefix()
    world.fails("checkpoint", "apply", "web", prefix, "--discard-current", code=EXIT_AMBIGUOUS,
                says=(f"match {prefix!r}", *(c["id"][:12] for c in sharing)))
    world.assert_unchanged()


def test_bad_names(world: World) -> None:
    hundred = "n" * 100
    world.fails("vm", "create", "", code=EXIT_INVALID, says="the VM name is empty")
    world.fails("vm", "create", hundred, code=EXIT_INVALID, says="100 characters; at most 99")
    world.fails("vm", "create", "web", code=EXIT_CONFLICT,
                says="a VM named 'web' already exists")
    world.fails("checkpoint", "create", "web", "--name", "   ", code=EXIT_INVALID,
                says="the checkpoint name is empty")
    world.fails("checkpoint", "create", "web", "--name", hundred, code=EXIT_INVALID,
                says="100 characters; at most 99")
    world.fails("checkpoint", "rename", "web", "base", hundred, code=EXIT_INVALID,
                says="100 characters; at most 99")
    world.assert_unchanged()


def test_names_of_99_characters_are_accepted(wm: Waymark) -> None:
    name = "n" * 99
    assert wm.json("vm", "create", name)["name"] == name
    assert wm.json("checkpoint", "create", name, "--name", name)["name"] == name


def test_bad_disk_images(world: World, tmp_path: Path) -> None:
    missing = tmp_path / "missing.qcow2"
    vmdk = tmp_path / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(vmdk), "1M")
    gone, orphan = tmp_path / "gone.qcow2", tmp_path / "orphan.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(gone), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(gone), str(orphan))
    gone.unlink()
    loop_a, loop_b = tmp_path / "loop-a.qcow2", tmp_path / "loop-b.qcow2"
    for image in (loop_a, loop_b):
        qemu_img("create", "-q", "-f", "qcow2", str(image), "1M")
    qemu_img("rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(loop_b), str(loop_a))
    qemu_img("rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(loop_a), str(loop_b))
    users = {p: file_sha256(p) for p in (vmdk, orphan, loop_a, loop_b)}

    world.fails("vm", "create", "new", "--disk", str(missing), code=EXIT_NOT_FOUND,
                says=f"disk image {missing} does not exist")
    world.fails("vm", "create", "new", "--disk", "1M", "--disk", str(vmdk), code=EXIT_IMAGE,
                says=f"{vmdk} is a vmdk image; Waymark takes qcow2 or raw")
    world.fails("vm", "create", "new", "--disk", str(orphan), code=EXIT_IMAGE,
                says=(f"the backing chain of {orphan} is broken", str(gone)))
    world.fails("vm", "disk", "add", "web", str(loop_a), code=EXIT_IMAGE,
                says=(f"the backing chain of {loop_a} is broken", "infinite loop"))
    assert {p: file_sha256(p) for p in users} == users
    world.assert_unchanged()


def test_empty_or_tiny_files_are_no_disks(world: World, tmp_path: Path) -> None:
    empty, twelve, short = tmp_path / "empty.raw", tmp_path / "twelve.img", tmp_path / "511.raw"
    empty.touch()
    twelve.write_bytes(b"hello world!")  # QEMU would show it as a 512-byte disk
    short.write_bytes(bytes(511))
    magic = tmp_path / "magic.qcow2"
    magic.write_bytes(b"QFI\xfb" + bytes(8))  # a qcow2 magic, too short for qemu to see one
    zero = tmp_path / "zero.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(zero), "0")
    users = {p: file_sha256(p) for p in (empty, twelve, short, magic, zero)}

    for path, fmt, size in ((empty, "raw", 0), (twelve, "raw", 12), (magic, "raw", 12),
                            (short, "raw", 511), (zero, "qcow2", 0)):
        says = (f"{path} is no disk: as a {fmt} image it holds {size} bytes, less than one "
                "512-byte sector", "qemu-img create")
        world.fails("vm", "create", "new", "--disk", "1M", "--disk", str(path), code=EXIT_IMAGE,
                    says=says)
        world.fails("vm", "disk", "add", "web", str(path), code=EXIT_IMAGE, says=says)
    world.fails("vm", "disk", "add", "web", f"{empty},passthrough=on", code=EXIT_IMAGE,
                says=f"{empty} is no disk: as a raw image it holds 0 bytes")
    world.fails("template", "create", "tiny", "--disk", str(twelve), code=EXIT_IMAGE,
                says=f"{twelve} is no disk")
    assert {p: file_sha256(p) for p in users} == users
    world.assert_unchanged()


def test_a_qcow2_cut_short_after_its_header_is_no_disk(world: World, tmp_path: Path) -> None:
    """A copy that stopped: the header says 64 MiB and qemu-img info reads it, but the
    clusters its tables point at are past the end of the file."""
    cut = tmp_path / "cut.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(cut), "64M")
    qemu_io_write(cut, "qcow2", 0, 4 * 1024 * 1024, 7)
    os.truncate(cut, 256 * 1024)
    subprocess.run(["qemu-img", "info", "-f", "qcow2", str(cut)], check=True,
                   capture_output=True)  # what a header-only look accepts
    before = file_sha256(cut)
    says = (f"{cut} is damaged: qemu-img check finds", "missing past the end of the file",
            "Copy it again from its source")
    world.fails("vm", "create", "new", "--disk", str(cut), code=EXIT_IMAGE, says=says)
    world.fails("vm", "disk", "add", "web", str(cut), code=EXIT_IMAGE, says=says)
    world.fails("template", "create", "cut", "--disk", str(cut), code=EXIT_IMAGE, says=says)
    assert file_sha256(cut) == before
    world.assert_unchanged()


def test_a_qcow2_with_leaked_clusters_only_is_a_disk(wm: Waymark, tmp_path: Path) -> None:
    """Leaks lose space, not data: such an image (a QEMU killed while it allocated) is taken."""
    leaky = tmp_path / "leaky.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(leaky), "64M")
    qemu_io_write(leaky, "qcow2", 0, 1024 * 1024, 7)
    leak_a_cluster(leaky)
    vm = wm.json("vm", "create", "leaky", "--disk", str(leaky))
    assert vm["disks"][0]["virtual_size"] == 64 * 1024 * 1024


def test_a_disk_of_one_sector_is_a_disk(wm: Waymark, tmp_path: Path) -> None:
    sector = tmp_path / "sector.raw"
    sector.write_bytes(bytes(512))
    vm = wm.json("vm", "create", "one", "--disk", str(sector))
    assert vm["disks"][0]["virtual_size"] == 512


def test_home_that_cannot_be_written(wm: Waymark, tmp_path: Path) -> None:
    regular = tmp_path / "a-file"
    regular.write_text("not a folder\n")

    assert_fails(wm, "--home", str(regular / "sub"), "vm", "list", code=EXIT_STORAGE,
                 says=f"cannot create the Waymark home {regular / 'sub'}")
    assert_fails(wm, "vm", "create", "web", code=EXIT_STORAGE,
                 says=f"cannot create the Waymark home {regular / 'sub'}",
                 env=wm.env(WAYMARK_HOME=str(regular / "sub")))
    assert_fails(wm, "--home", str(regular), "vm", "create", "web", code=EXIT_STORAGE,
                 says=f"the Waymark home {regular}")
    assert regular.read_text() == "not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_consent_is_required_to_discard_data(world: World) -> None:
    world.fails("vm", "delete", "web", code=EXIT_INVALID,
                says=("checkpoint(s)", "waymark vm delete web --yes"))
    # stdin is not a terminal: no prompt, a refusal naming both choices
    world.fails("checkpoint", "apply", "web", "base", code=EXIT_INVALID,
                says=("--checkpoint-first", "--discard-current"))
    world.fails("checkpoint", "apply", "web", "base", "--checkpoint-first", "--discard-current",
                code=EXIT_INVALID, says="exclude each other")
    world.assert_unchanged()


@pytest.mark.parametrize("args", [("vm", "create", "tiny", "--memory", "8M"),
                                  ("vm", "set", "web", "--memory", "4M")], ids=["create", "set"])
def test_memory_below_the_16_mib_minimum(world: World, args: tuple[str, ...]) -> None:
    world.fails(*args, code=EXIT_INVALID, says=("memory", "16"))
    world.assert_unchanged()


def test_a_held_vm_lock_makes_commands_fail_busy(wm: Waymark) -> None:
    vm_id = wm.json("vm", "create", "web", "--disk", "1M")["id"]
    before = wm.json("checkpoint", "list", "web"), files(wm.home)
    impatient = wm.env(WAYMARK_LOCK_TIMEOUT="0.5")

    fd = os.open(wm.home / "locks" / f"{vm_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        assert_fails(wm, "checkpoint", "create", "web", code=EXIT_BUSY,
                     says="VM 'web' is busy", env=impatient)
        assert time.monotonic() - started >= 0.5
        assert (wm.json("checkpoint", "list", "web"), files(wm.home)) == before
    finally:
        os.close(fd)  # releases the lock

    ckpt = wm.run("checkpoint", "create", "web", "--json", env=impatient).ok().json()
    assert ckpt["vm_id"] == vm_id
