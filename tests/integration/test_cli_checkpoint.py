"""``waymark checkpoint``: create, list, show, apply and rename, via the real CLI; every test
runs twice: on the host, and a second time with the checkpoint, VM and job commands going
through a real ``waymark serve`` (``--server``), with the same output and exit codes."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Waymark, content_sha256, file_sha256, qemu_io_write

KIB = 1024
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
DEFAULT_NAME = re.compile(r"^(?P<vm>.*) - \((?P<stamp>\d{4}-\d\d-\d\d - \d\d:\d\d:\d\d)\)$")
ENTRY_KEYS = {"id", "name", "parent_id", "created_at", "kind", "has_memory", "requested_type",
              "fallback_reason", "skipped_disks", "allocated_bytes", "shared_bytes",
              "chain_depth"}


pytestmark = pytest.mark.also_served


def make_image(path: Path, fmt: str, size: str = "1M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
    return path


def assert_default_name(ckpt: dict[str, Any], vm_name: str) -> None:
    """Hyper-V's ``VMNAME - (YYYY-MM-DD - HH:MM:SS)``, in local time, taken when it was created."""
    match = DEFAULT_NAME.match(ckpt["name"])
    assert match, ckpt["name"]
    assert match["vm"] == vm_name
    stamp = datetime.strptime(match["stamp"], "%Y-%m-%d - %H:%M:%S").astimezone()
    created = datetime.strptime(ckpt["created_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((created - stamp).total_seconds()) <= 2


def assert_now_under(tree_text: str, ckpt_id: str) -> None:
    """In ``checkpoint list``'s tree, ``Now`` is drawn one level below checkpoint ``ckpt_id``."""
    lines = tree_text.splitlines()
    [now] = [i for i, line in enumerate(lines) if line.endswith("Now")]
    [current] = [i for i, line in enumerate(lines) if f"[{ckpt_id[:8]} " in line]
    assert current < now
    mark_column = re.search(r"[■▶]", lines[current]).start()  # type: ignore[union-attr]
    assert lines[now].index("Now") == mark_column + 3, tree_text
    assert lines[now][mark_column:].startswith(("└─ Now", "├─ Now")), tree_text


def test_create_list_and_show(wm: Waymark, tmp_path: Path) -> None:
    device = make_image(tmp_path / "device.raw", "raw")
    vm = wm.json("vm", "create", "web", "--disk", "1M", "--disk", f"{device},passthrough=on")
    disk, passthrough = vm["disks"]
    qemu_io_write(Path(disk["active_image"]), "qcow2", 0, 64 * KIB, 0x11)

    first = wm.json("checkpoint", "create", "web")
    assert_default_name(first, "web")
    created = wm("checkpoint", "create", "web", "--name", "second")
    assert re.fullmatch(r"Created checkpoint 'second' \([0-9a-f]{12}, disk-only\)\.\n",
                        created.stdout)

    listing = wm.json("checkpoint", "list", "web")
    assert listing["vm_id"] == vm["id"]
    one, two = listing["checkpoints"]
    assert listing["current_checkpoint_id"] == two["id"]
    assert (one["id"], one["name"]) == (first["id"], first["name"])
    assert two["name"] == "second"
    assert (one["parent_id"], two["parent_id"]) == (None, one["id"])
    for entry in (one, two):
        assert entry.keys() >= ENTRY_KEYS
        assert RFC3339_UTC.match(entry["created_at"])
        assert entry["kind"] == "disk-only"
        assert entry["has_memory"] is False
        assert entry["requested_type"] == "production"
        assert entry["fallback_reason"] is None
        assert [(s["id"], s["path"]) for s in entry["skipped_disks"]] == [
            (passthrough["id"], str(device))]
        assert isinstance(entry["shared_bytes"], int)
    assert one["created_at"] <= two["created_at"]
    # the first checkpoint holds the 64 KiB written before it; the second holds nothing new
    assert one["allocated_bytes"] - two["allocated_bytes"] >= 64 * KIB
    assert (one["chain_depth"], two["chain_depth"]) == (1, 2)

    assert_now_under(wm("checkpoint", "list", "web").stdout, two["id"])

    # CKPT is an exact name or an id prefix
    shown = wm.json("checkpoint", "show", "web", first["id"][:6])
    assert shown["name"] == first["name"]
    assert shown["is_current"] is False
    assert shown["child_ids"] == [two["id"]]
    assert shown["configuration"]["memory_mib"] == 512
    assert [d["disk_id"] for d in shown["disks"]] == [disk["id"]]
    assert content_sha256(shown["disks"][0]["frozen_image"]) == content_sha256(
        disk["active_image"])
    text = wm("checkpoint", "show", "web", "second").stdout
    assert f"Checkpoint second  ({two['id']})" in text
    assert "current: yes" in text
    assert f"not captured: {device}" in text


def test_default_name_is_cut_to_99_characters(wm: Waymark) -> None:
    long_name = "v" * 99
    wm("vm", "create", long_name)
    ckpt = wm.json("checkpoint", "create", long_name)
    assert len(ckpt["name"]) == 99
    assert_default_name(ckpt, "v" * (99 - len(" - (YYYY-MM-DD - HH:MM:SS)")))


def test_apply_restores_disks_and_configuration(wm: Waymark, tmp_path: Path) -> None:
    device = make_image(tmp_path / "device.raw", "raw")
    device_sha = file_sha256(device)
    vm = wm.json("vm", "create", "web", "--memory", "512M", "--disk", "1M",
                 "--disk", f"{device},passthrough=on")
    disk, passthrough = vm["disks"]
    qemu_io_write(Path(disk["active_image"]), "qcow2", 0, 64 * KIB, 0x11)
    saved = content_sha256(disk["active_image"])
    ckpt = wm.json("checkpoint", "create", "web", "--name", "before")
    assert [s["id"] for s in ckpt["skipped_disks"]] == [passthrough["id"]]

    # change everything after the checkpoint: configuration, disk content, a new disk
    changed = wm.json("vm", "set", "web", "--memory", "1G", "--cpus", "2")
    current_image = Path(changed["disks"][0]["active_image"])
    qemu_io_write(current_image, "qcow2", 0, 64 * KIB, 0x22)
    added = wm.json("vm", "disk", "add", "web", "2M")

    applied = wm.json("checkpoint", "apply", "web", "before", "--discard-current")
    assert applied == {"checkpoint_id": ckpt["id"], "state": "off",
                       "safety_checkpoint_id": None, "detached_disk_ids": [added["id"]],
                       "kept_disk_ids": [], "warnings": []}

    after = wm.json("vm", "show", "web")
    assert (after["memory_mib"], after["cpus"]) == (512, 1)
    assert after["current_checkpoint_id"] == ckpt["id"]
    assert [d["id"] for d in after["disks"]] == [disk["id"], passthrough["id"]]
    assert content_sha256(after["disks"][0]["active_image"]) == saved
    assert not current_image.exists(), "the discarded state's image is removed"
    [detached] = after["detached_disks"]
    assert detached["id"] == added["id"]
    assert Path(detached["active_image"]).is_file(), "a detached disk keeps its file"
    assert file_sha256(device) == device_sha


def test_apply_with_checkpoint_first_keeps_the_current_state(wm: Waymark) -> None:
    """The state being left is checkpointed first, as a sibling of Now under the target."""
    wm("vm", "create", "web", "--disk", "1M")
    first = wm.json("checkpoint", "create", "web", "--name", "A")
    wm("vm", "set", "web", "--memory", "1G")

    applied = wm.json("checkpoint", "apply", "web", "A", "--checkpoint-first")
    assert applied["checkpoint_id"] == first["id"]
    safety_id = applied["safety_checkpoint_id"]
    assert safety_id

    safety = wm.json("checkpoint", "show", "web", safety_id[:8])
    assert_default_name(safety, "web")
    assert safety["parent_id"] == first["id"]
    assert safety["configuration"]["memory_mib"] == 1024
    assert safety["is_current"] is False
    assert_now_under(wm("checkpoint", "list", "web").stdout, first["id"])


def test_rename_and_references(wm: Waymark) -> None:
    wm("vm", "create", "web")
    first = wm.json("checkpoint", "create", "web", "--name", "A")
    second = wm.json("checkpoint", "create", "web", "--name", "B")

    # by exact name, then by id prefix; names need not be unique (as in Hyper-V), but taking
    # a name another checkpoint has is warned about: that name is ambiguous from then on
    alone = wm.run("checkpoint", "rename", "web", "A", "  same  ", "--json").ok()
    assert alone.json()["name"] == "same" and alone.json()["warnings"] == []
    assert "warning" not in alone.stderr
    renamed = wm("checkpoint", "rename", "web", second["id"][:6], "same")
    assert renamed.stdout == f"Renamed checkpoint {second['id'][:12]} to 'same'.\n"
    assert renamed.stderr.startswith("warning: 1 other checkpoint(s) of 'web' named 'same' "
                                     f"too ({first['id'][:12]})"), renamed.stderr
    again = wm.run("checkpoint", "rename", "web", second["id"][:6], "same", "--json").ok()
    [warning] = again.json()["warnings"]
    assert first["id"][:12] in warning and "ambiguous" in warning
    assert again.stderr == f"warning: {warning}\n"
    assert wm.run("checkpoint", "show", "web", "same").returncode == 4  # ambiguous indeed

    # an exact name wins over an id prefix
    wm("checkpoint", "rename", "web", second["id"][:6], first["id"][:8])
    assert wm.json("checkpoint", "show", "web", first["id"][:8])["id"] == second["id"]


def test_checkpoint_limit(wm: Waymark) -> None:
    wm("vm", "create", "web", "--disk", "1M", "--max-checkpoints", "2")
    first = wm.json("checkpoint", "create", "web", "--name", "one")
    wm("checkpoint", "create", "web", "--name", "two")
    before = wm.json("checkpoint", "list", "web")
    images = sorted(wm.home.rglob("*.qcow2"))

    refused = wm.run("checkpoint", "create", "web")
    assert refused.returncode == 6, refused
    assert "--max-checkpoints" in refused.stderr

    # --checkpoint-first would need one more checkpoint: refused before changing anything
    refused = wm.run("checkpoint", "apply", "web", "one", "--checkpoint-first")
    assert refused.returncode == 6, refused
    assert "--max-checkpoints" in refused.stderr
    assert wm.json("checkpoint", "list", "web") == before
    assert sorted(wm.home.rglob("*.qcow2")) == images

    # discarding needs no new checkpoint
    applied = wm.json("checkpoint", "apply", "web", "one", "--discard-current")
    assert applied["checkpoint_id"] == first["id"]
    assert applied["safety_checkpoint_id"] is None


def test_disabled_checkpoint_type_refuses_create(wm: Waymark) -> None:
    wm("vm", "create", "web", "--checkpoint-type", "disabled")

    refused = wm.run("checkpoint", "create", "web")
    assert refused.returncode == 5, refused
    assert "disabled" in refused.stderr
    assert "Now  (no checkpoints)" in wm("checkpoint", "list", "web").stdout

    wm("vm", "set", "web", "--checkpoint-type", "production")
    ckpt = wm.json("checkpoint", "create", "web")
    assert ckpt["requested_type"] == "production"
    assert ckpt["parent_id"] is None
