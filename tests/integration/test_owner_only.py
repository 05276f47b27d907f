"""Everything Waymark writes is its owner's only (``waymark.modes``): the catalog (password and
token hashes, sessions' CSRF tokens, the audit log), disks, checkpoints, templates, backup
points, bundles and library shares; whatever umask the caller had (here 022, the usual one,
under which all of these used to be created 0644 in 0755 folders).

Checked: a VM with checkpoints, a template, a backup repository with a point, an export bundle
and a library share holding a stored VM, plus users, a token, a sign-in and a checkpoint taken
through a real ``waymark serve``: no file or folder in the home, the repository, the bundle or
the share can be read or entered by the group or others; empty folders someone else made open
to all (given to ``backup repo init``, ``library init`` and an export) and a home an older
Waymark made 0755 are made 0700 when Waymark uses them.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import Waymark, served

PASSWORD = "alice-password-1"


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The caller's umask is the usual 022: Waymark must not depend on a stricter one."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def open_to_others(*roots: Path) -> list[str]:
    """Every file or folder under ``roots`` (themselves included) the group or others may
    read, write or enter, with its mode."""
    found = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077:
                found.append(f"{path} {stat.S_IMODE(mode):o}")
    return found


def open_folder(path: Path) -> Path:
    """An empty folder someone made with the usual modes (0755)."""
    path.mkdir()
    path.chmod(0o755)
    return path


def test_everything_written_is_owner_only(tmp_path: Path) -> None:
    wm = Waymark(tmp_path / "home")
    wm("vm", "create", "v", "--disk", "2M", "--memory", "256M")
    wm("checkpoint", "create", "v", "--name", "a")
    wm("checkpoint", "create", "v", "--name", "b")
    image = tmp_path / "image.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    wm("template", "create", "t", "--disk", str(image))
    wm("vm", "create", "from-t", "--template", "t")
    repo, bundle, share = (open_folder(tmp_path / n) for n in ("repo", "bundle", "share"))
    wm("backup", "repo", "init", str(repo))
    wm("backup", "run", "v", "--repo", str(repo))
    wm("checkpoint", "export", "v", "a", str(bundle))
    wm("library", "init", str(share))
    wm("vm", "create", "stored", "--disk", "1M", "--memory", "256M")
    wm("checkpoint", "create", "stored", "--name", "s")
    wm("vm", "store", "stored", "--library", str(share))
    wm.run("user", "add", "alice", "--role", "self-service", "--password-stdin",
           input=PASSWORD + "\n").ok()
    wm("user", "grant", "alice", "--vm", "v", "--permission", "checkpoint")
    with served(wm) as (url, _token), httpx.Client(base_url=url, timeout=60) as alice:
        signed_in = alice.post("/api/auth/login", json={"name": "alice", "password": PASSWORD})
        assert signed_in.status_code == 200, signed_in.text
        csrf = alice.get("/api/auth/me").json()["csrf_token"]
        made = alice.post("/api/vms/v/checkpoints", json={"name": "c"},
                          headers={"X-CSRF-Token": csrf})
        assert made.status_code in (200, 201), made.text
    assert {p.name for p in (wm.home / "vms").iterdir()}, "the VMs' folders are there"
    assert open_to_others(wm.home, repo, bundle, share) == []


def test_an_older_home_is_made_owner_only(tmp_path: Path) -> None:
    """A home made with 0755 (by hand, or by a Waymark before this rule) becomes 0700 the next
    time any command opens it; what is inside stays as it was, out of others' reach."""
    home = open_folder(tmp_path / "home")
    wm = Waymark(home)
    assert wm.json("vm", "list") == []
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert open_to_others(home) == []
