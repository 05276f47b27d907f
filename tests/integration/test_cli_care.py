"""The CLI's share of issue 20, through the real CLI (in-process unless a terminal is needed):

- progress lines name the VM, its disk and the checkpoints (never an image file), with the
  bytes a step moves; on a terminal (a real pty, ``COLUMNS`` forced) every redraw fits the
  width; off a terminal, plain lines without ``\\r``;
- a delete says the space it freed (``freed_bytes`` in ``--json``, measured by the merge job);
- a backup counts per VM and disk (``Backing up web01 disk 1/2 (id)``);
- ``checkpoint list`` without a VM, ``--type`` and ``--most-recent``;
- ``checkpoint revert`` (Hyper-V's Revert: Now's parent), refused for a VM with no current
  checkpoint, through the host and through ``POST /api/vms/{vm}/revert``;
- "did you mean" for a mistyped VM or checkpoint, never naming a VM the caller may not see;
- ``vm stop`` of a VM that is off is a no-op with a notice (exit 0, ``changed`` false).

The tests marked ``also_served`` run a second time through a real ``waymark serve``.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Waymark, content_sha256, qemu_io_write, serve_process

MIB = 1 << 20
IMAGE_FILE = re.compile(r"[0-9a-f]{32}\.qcow2")
EXIT_NOT_FOUND, EXIT_CONFLICT = 3, 5


def active_image(wm: Waymark, vm: str, disk: int = 0) -> Path:
    return Path(wm.json("vm", "show", vm)["disks"][disk]["active_image"])


def two_checkpoints(wm: Waymark, vm: str = "web01", disks: int = 1) -> None:
    """``vm`` (off) with ``disks`` disks: 'one' holds 2 MiB written, 'two' 1 MiB more."""
    wm("vm", "create", vm, *[arg for _ in range(disks) for arg in ("--disk", "8M")])
    qemu_io_write(active_image(wm, vm), "qcow2", 0, 2 * MIB, 0x11)
    wm("checkpoint", "create", vm, "--name", "one")
    qemu_io_write(active_image(wm, vm), "qcow2", 0, MIB, 0x22)
    wm("checkpoint", "create", vm, "--name", "two")


# --- progress ---------------------------------------------------------------------------------

def test_delete_progress_names_the_vm_and_checkpoints_not_image_files(wm: Waymark) -> None:
    two_checkpoints(wm, disks=2)
    deleted = wm.run("checkpoint", "delete", "web01", "one", env=wm.env(COLUMNS="60")).ok()
    lines = deleted.stderr.splitlines()
    assert lines and "\r" not in deleted.stderr, deleted  # off a terminal: plain lines
    assert not IMAGE_FILE.search(deleted.stderr), deleted.stderr
    merging = [line for line in lines if " merging " in line]
    assert merging, deleted.stderr
    # the first disk's step names the VM, the disk, the deleted checkpoint and its neighbour,
    # with the bytes it moves (a plain line keeps its whole text: a log is not cut)
    assert any(re.fullmatch(r"\[\d/\d\] web01 disk 1/2: merging ('two' into deleted 'one'|"
                            r"deleted 'one' into 'two') \(\d+\.\d (KiB|MiB)\)", line)
               for line in merging), merging


def test_progress_on_a_terminal_is_redrawn_in_place_and_fits_its_width(wm: Waymark) -> None:
    """A real pty: every drawn line (between ``\\r``) fits ``COLUMNS`` less the last column and
    names the VM and a checkpoint (a long name is cut in its middle); a narrow line drops the
    bytes first, a wide one shows them with a bar."""
    vm = "a-vm-with-a-rather-long-name-for-a-narrow-terminal"
    two_checkpoints(wm, vm=vm)
    narrow = _drawn(_on_a_terminal(wm, ["checkpoint", "delete", vm, "one"], columns=72))
    assert all(len(line) <= 71 for line in narrow), narrow
    assert any(line.startswith("[1/2] a-vm-with-a-rather-long-name-…") and
               line.endswith("into deleted 'one'   0%") for line in narrow), narrow
    wide = _drawn(_on_a_terminal(wm, ["checkpoint", "delete", vm, "two"], columns=150))
    assert all(len(line) <= 149 for line in wide), wide
    assert any(re.fullmatch(rf"\[1/\d\] {vm}: merging Now into deleted 'two' \[#* *\] +"
                            r"\d+%  [\d.]+ \w?i?B of [\d.]+ (KiB|MiB).*", line)
               for line in wide), wide


def _drawn(out: str) -> list[str]:
    """The progress lines a terminal showed, each redraw (after a ``\\r``) on its own."""
    assert not IMAGE_FILE.search(out), out
    assert "Deleted checkpoint '" in out and "; freed " in out, out
    pieces = [re.sub(r"\x1b\[K", "", piece) for piece in re.split(r"[\r\n]+", out)]
    drawn = [piece for piece in pieces if piece.startswith("[")]
    assert drawn, out
    return drawn


def _on_a_terminal(wm: Waymark, args: list[str], columns: int) -> str:
    """Run ``waymark ARGS`` in its own process with stdin, stdout and stderr on a pty of
    ``columns`` columns; everything it wrote."""
    leader, follower = pty.openpty()
    env = wm.env(COLUMNS=str(columns), LINES="24")
    proc = subprocess.Popen([sys.executable, "-m", "waymark", *args], env=env,
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the pty closed: the command ended
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif proc.poll() is not None:
            break
    os.close(leader)
    assert proc.wait(30) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode()


def test_a_backup_counts_per_vm_and_disk(wm: Waymark, tmp_path: Path) -> None:
    two_checkpoints(wm, disks=2)
    repo = tmp_path / "repo"
    wm("backup", "repo", "init", str(repo))
    ran = wm.run("backup", "run", "web01", "--repo", str(repo)).ok()
    disks = [d["id"] for d in wm.json("vm", "show", "web01")["disks"]]
    for number, disk in enumerate(disks, 1):
        assert re.search(rf"^\[{number}/{number}\] Backing up web01 disk {number}/2 "
                         rf"\({disk[:12]}\) \(8\.0 MiB\)$", ran.stderr, re.MULTILINE), ran.stderr


# --- the space a delete freed -----------------------------------------------------------------

@pytest.mark.also_served
def test_a_delete_says_the_space_it_freed(wm: Waymark) -> None:
    two_checkpoints(wm)
    deleted = wm.run("checkpoint", "delete", "web01", "two").ok()
    assert re.fullmatch(r"Deleted checkpoint 'two' \([0-9a-f]{12}\) of VM web01; "
                        r"freed \d+\.\d (KiB|MiB)\.\n", deleted.stdout), deleted.stdout
    # 'one' holds 2 MiB, Now the 1 MiB written after it: deleting 'one' merges and frees a file
    data = wm.json("checkpoint", "delete", "web01", "one")
    assert [d["name"] for d in data["deleted"]] == ["one"]
    assert data["freed_bytes"] >= MIB, data
    job = wm.json("job", "show", data["job_id"])
    assert job["result"]["freed_bytes"] == data["freed_bytes"], job


# --- checkpoint list across VMs ---------------------------------------------------------------

@pytest.mark.also_served
def test_list_without_a_vm_with_type_and_most_recent(wm: Waymark) -> None:
    two_checkpoints(wm)
    wm("vm", "create", "db", "--disk", "1M")
    wm("checkpoint", "create", "db", "--name", "base")
    wm("vm", "create", "empty")

    every = wm.json("checkpoint", "list")
    assert [(r["vm_name"], r["name"], r["is_current"]) for r in every] == [
        ("db", "base", True), ("web01", "one", False), ("web01", "two", True)]
    assert all(r["kind"] == "disk-only" and r["has_memory"] is False for r in every)
    text = wm("checkpoint", "list").stdout.splitlines()
    assert text[0].split() == ["VM", "CHECKPOINT", "TYPE", "TAKEN", "ID"]
    assert [line.split()[:2] for line in text[1:]] == [["db", "base"], ["web01", "one"],
                                                       ["web01", "two"]]
    assert text[3].endswith("(current)") and not text[2].endswith("(current)")

    recent = wm.json("checkpoint", "list", "--most-recent")
    assert [(r["vm_name"], r["name"]) for r in recent] == [("db", "base"), ("web01", "two")]
    # every checkpoint here holds its disks only: production matches them, standard none
    assert wm.json("checkpoint", "list", "--type", "production") == every
    assert wm.json("checkpoint", "list", "--type", "disk-only") == every
    assert wm.json("checkpoint", "list", "--type", "standard") == []
    assert wm("checkpoint", "list", "--type", "standard").stdout == \
        "No checkpoints match --type standard.\n"
    # with a VM, the filters keep to it
    assert [r["name"] for r in wm.json("checkpoint", "list", "web01", "--most-recent")] == ["two"]
    refused = wm.run("checkpoint", "list", "--type", "checkpointy")
    assert refused.returncode == 2 and "standard" in refused.stderr, refused
    helped = wm("checkpoint", "list", "--help").stdout
    assert "standard: holds the memory state" in " ".join(helped.split())


# --- revert -----------------------------------------------------------------------------------

@pytest.mark.also_served
def test_revert_applies_nows_parent(wm: Waymark) -> None:
    two_checkpoints(wm)
    disk = active_image(wm, "web01")
    at_two = content_sha256(disk)
    qemu_io_write(disk, "qcow2", 0, MIB, 0x33)
    assert content_sha256(disk) != at_two

    asked = wm.run("checkpoint", "revert", "web01")  # no terminal: the choice is needed
    assert asked.returncode == 2 and "--discard-current" in asked.stderr, asked
    reverted = wm.run("checkpoint", "revert", "web01", "--discard-current").ok()
    assert reverted.stdout == "Applied checkpoint 'two'; the VM is off.\n", reverted
    assert content_sha256(active_image(wm, "web01")) == at_two

    first = wm.json("checkpoint", "revert", "web01", "--checkpoint-first")
    listing = wm.json("checkpoint", "list", "web01")
    two = next(c for c in listing["checkpoints"] if c["name"] == "two")
    assert first["checkpoint_id"] == two["id"] and first["safety_checkpoint_id"]
    assert listing["current_checkpoint_id"] == two["id"]


@pytest.mark.also_served
def test_revert_without_a_current_checkpoint_is_refused(wm: Waymark) -> None:
    wm("vm", "create", "bare", "--disk", "1M")
    refused = wm.run("checkpoint", "revert", "bare", "--discard-current")
    assert refused.returncode == EXIT_CONFLICT, refused
    assert "error: VM 'bare' has no current checkpoint (Now has no parent)" in refused.stderr
    assert "waymark checkpoint create bare" in refused.stderr, refused
    wm("checkpoint", "create", "bare", "--name", "only")
    wm("checkpoint", "delete", "bare", "only")
    wm("checkpoint", "create", "bare", "--name", "kept")
    wm.run("checkpoint", "apply", "bare", "kept", "--discard-current").ok()
    wm("checkpoint", "delete", "bare", "kept")
    wm("checkpoint", "create", "bare", "--name", "again")
    wm("checkpoint", "create", "bare", "--name", "last")
    wm("checkpoint", "delete", "bare", "again")  # 'last' stays current
    wm("checkpoint", "delete", "bare", "last")   # now nothing is current, nothing is left
    assert wm.json("checkpoint", "list", "bare")["current_checkpoint_id"] is None
    assert wm.run("checkpoint", "revert", "bare", "--discard-current").returncode == \
        EXIT_CONFLICT


def test_the_api_reverts_and_refuses_as_the_cli(wm: Waymark) -> None:
    two_checkpoints(wm)
    wm("vm", "create", "bare", "--disk", "1M")
    wm.run("user", "add", "admin", "--role", "administrator", "--password-stdin",
           input="a long test password\n").ok()
    token = wm.json("token", "create", "t", "--user", "admin")["token"]
    with serve_process(wm) as url:
        answer = _post(url, token, "/api/vms/web01/revert", {"mode": "discard_current"})
        refused = _post(url, token, "/api/vms/bare/revert", {"mode": "discard_current"})
        bad = _post(url, token, "/api/vms/web01/revert", {"mode": "maybe"})
    listing = wm.json("checkpoint", "list", "web01")
    assert answer == (200, {"checkpoint_id": listing["current_checkpoint_id"], "state": "off",
                            "safety_checkpoint_id": None, "detached_disk_ids": [],
                            "kept_disk_ids": [], "warnings": []}), answer
    assert refused[0] == 409 and "no current checkpoint" in refused[1]["error"]["message"]
    assert bad[0] == 400, bad


def _post(url: str, token: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    resp = httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {token}"},
                      timeout=60)
    return resp.status_code, resp.json()


# --- did you mean -----------------------------------------------------------------------------

def test_a_mistyped_vm_or_checkpoint_gets_a_suggestion(wm: Waymark) -> None:
    two_checkpoints(wm)
    wm("vm", "create", "database", "--disk", "1M")
    vm = wm.run("checkpoint", "list", "web1")
    assert vm.returncode == EXIT_NOT_FOUND, vm
    assert vm.stderr.splitlines()[1] == \
        "Did you mean 'web01'? List them with: waymark vm list", vm.stderr
    ckpt = wm.run("checkpoint", "show", "web01", "tow")
    assert ckpt.returncode == EXIT_NOT_FOUND, ckpt
    assert "Did you mean 'two'? List them with: waymark checkpoint list web01" in ckpt.stderr
    far = wm.run("vm", "show", "zzzzzz")
    assert far.stderr.splitlines()[1] == "List them with: waymark vm list", far.stderr


def test_a_suggestion_never_names_a_vm_the_caller_may_not_see(wm: Waymark) -> None:
    """Sam may see web01 only: typing web02 (another's, hidden) or web03 (none) gets the same
    404 and the same hint, naming web01 and never web02."""
    for name in ("web01", "web02"):
        wm("vm", "create", name, "--disk", "1M")
    wm.run("user", "add", "sam", "--role", "self-service", "--password-stdin",
           input="a long test password\n").ok()
    wm("user", "grant", "sam", "--vm", "web01", "--permission", "start-stop")
    token = wm.json("token", "create", "t", "--user", "sam")["token"]
    with serve_process(wm) as url:
        remote = wm.env(WAYMARK_SERVER=url, WAYMARK_TOKEN=token)
        hidden = wm.run("vm", "show", "web02", "--json", env=remote)
        missing = wm.run("vm", "show", "web03", "--json", env=remote)
    for result in (hidden, missing):
        assert result.returncode == EXIT_NOT_FOUND, result
        error = json.loads(result.stdout)["error"]
        assert error["hint"] == "Did you mean 'web01'? List the VMs you may see: GET /api/vms"
        assert "web02" not in error["hint"]
    assert json.loads(hidden.stdout)["error"]["message"].replace("web02", "web03") == \
        json.loads(missing.stdout)["error"]["message"]


# --- idempotent power actions -----------------------------------------------------------------

@pytest.mark.also_served
def test_stopping_a_vm_that_is_off_is_a_no_op_with_a_notice(wm: Waymark) -> None:
    wm("vm", "create", "web01", "--disk", "1M")
    stopped = wm.run("vm", "stop", "web01").ok()
    assert stopped.stdout == "web01 is already off: nothing to do.\n", stopped
    assert wm.json("vm", "stop", "web01") == {"state": "off", "how": "already off",
                                              "changed": False}
    assert wm.json("vm", "stop", "web01", "--force")["changed"] is False
    # resuming or pausing a VM that is off is still refused: it does not run
    for action in ("pause", "resume"):
        refused = wm.run("vm", action, "web01")
        assert refused.returncode == EXIT_CONFLICT and "is off" in refused.stderr, refused
