"""``vm set --kernel/--initrd/--append/--no-kernel`` (CLI and ``PATCH /api/vms/{vm}``): a VM's
boot files change after creation with the rule of ``vm create``: administrators (the CLI, an
administrator through the API) name host files, self-service users may not."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import Waymark, query, serve_process


def boot_files(folder: Path) -> tuple[Path, Path]:
    kernel, initrd = folder / "vmlinuz", folder / "initrd.img"
    kernel.write_bytes(b"kernel")
    initrd.write_bytes(b"initrd")
    return kernel, initrd


def config(wm: Waymark, name: str) -> tuple[str | None, str | None, str | None]:
    shown = wm.json("vm", "show", name)
    return shown["kernel"], shown["initrd"], shown["append"]


def test_vm_set_changes_and_drops_the_boot_files(wm: Waymark, tmp_path: Path) -> None:
    kernel, initrd = boot_files(tmp_path)
    wm("vm", "create", "web", "--disk", "1M")

    wm("vm", "set", "web", "--kernel", str(kernel), "--initrd", str(initrd),
       "--append", "console=ttyS0")
    assert config(wm, "web") == (str(kernel), str(initrd), "console=ttyS0")

    wm("vm", "set", "web", "--initrd", "", "--append", "quiet")  # '' drops one of them
    assert config(wm, "web") == (str(kernel), None, "quiet")

    wm("vm", "set", "web", "--no-kernel")  # the VM boots from its disk from now on
    assert config(wm, "web") == (None, None, None)


@pytest.mark.parametrize(("options", "says", "code"), [
    (("--kernel", "/nonexistent/vmlinuz"), "--kernel /nonexistent/vmlinuz does not exist", 3),
    (("--initrd", "INITRD"), "need a kernel", 2),
    (("--append", "quiet"), "need a kernel", 2),
    (("--no-kernel", "--kernel", "KERNEL"), "--no-kernel drops the kernel", 2),
], ids=["missing-file", "initrd-alone", "append-alone", "contradiction"])
def test_vm_set_refuses_bad_boot_settings_changing_nothing(
        wm: Waymark, tmp_path: Path, options: tuple[str, ...], says: str, code: int) -> None:
    kernel, initrd = boot_files(tmp_path)
    wm("vm", "create", "web", "--disk", "1M", "--memory", "256M")
    before = query(wm.home, "SELECT config FROM vms")
    given = [{"KERNEL": str(kernel), "INITRD": str(initrd)}.get(o, o) for o in options]
    refused = wm.run("vm", "set", "web", "--memory", "512M", *given)
    assert refused.returncode == code, refused
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") >= 2, refused.stderr
    assert says in refused.stderr, refused.stderr
    assert query(wm.home, "SELECT config FROM vms") == before, "a refused set changes nothing"


def test_vm_set_of_boot_files_needs_the_vm_off_and_a_saved_one_its_consent(
        wm: Waymark, tmp_path: Path) -> None:
    kernel, _ = boot_files(tmp_path)
    vm_id = wm.json("vm", "create", "web", "--disk", "1M")["id"]
    saved = wm.home / "vms" / vm_id / "saved"  # a saved VM, as far as the catalog knows
    saved.mkdir(parents=True)
    subprocess.run(["sqlite3", str(wm.home / "catalog.db"),
                    f"UPDATE vms SET state = 'saved' WHERE id = '{vm_id}'"], check=True)
    refused = wm.run("vm", "set", "web", "--kernel", str(kernel))
    assert refused.returncode == 5, refused
    assert "--kernel would make it unusable" in refused.stderr, refused.stderr
    assert config(wm, "web") == (None, None, None)
    wm("vm", "set", "web", "--kernel", str(kernel), "--discard-saved-state")
    assert config(wm, "web") == (str(kernel), None, None)
    assert wm.json("vm", "show", "web")["state"] == "off"


def test_a_missing_boot_file_names_the_vm_set_that_replaces_it(wm: Waymark,
                                                              tmp_path: Path) -> None:
    kernel, _ = boot_files(tmp_path)
    wm("vm", "create", "web", "--disk", "1M", "--kernel", str(kernel))
    kernel.unlink()
    refused = wm.run("vm", "start", "web")
    assert refused.returncode == 3, refused
    assert "waymark vm set web --kernel FILE" in refused.stderr, refused.stderr
    (tmp_path / "new").mkdir()  # and what the hint says works
    other, _ = boot_files(tmp_path / "new")
    wm("vm", "set", "web", "--kernel", str(other))
    assert config(wm, "web")[0] == str(other)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[str, Waymark, dict[str, str]]]:
    wm = Waymark(tmp_path / "home")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(tmp_path / "base.qcow2"), "1M"],
                   check=True, capture_output=True)
    wm("template", "create", "tpl", "--disk", str(tmp_path / "base.qcow2"))
    tokens = {}
    for name, role in (("admin", "administrator"), ("alice", "self-service")):
        wm.run("user", "add", name, "--role", role, "--password-stdin",
               input=f"{name}-password-1\n").ok()
        tokens[name] = wm.json("token", "create", "t", "--user", name)["token"]
    wm("user", "grant", "alice", "--template", "tpl")
    with serve_process(wm) as url:
        yield url, wm, tokens


def test_the_api_sets_boot_files_for_administrators_only(
        api: tuple[str, Waymark, dict[str, str]], tmp_path: Path) -> None:
    url, wm, tokens = api
    kernel, initrd = boot_files(tmp_path)

    def patch(who: str, body: dict[str, object]) -> httpx.Response:
        return httpx.patch(f"{url}/api/vms/mine", json=body, timeout=60,
                           headers={"Authorization": f"Bearer {tokens[who]}"})

    created = httpx.post(f"{url}/api/vms", json={"name": "mine", "template": "tpl"}, timeout=60,
                         headers={"Authorization": f"Bearer {tokens['alice']}"})
    assert created.status_code == 201, created.text
    for body in ({"kernel": str(kernel)}, {"initrd": str(initrd)}):
        denied = patch("alice", body)
        assert denied.status_code == 403, denied.text
        assert "only administrators choose the host files" in denied.json()["error"]["message"]
    assert config(wm, "mine") == (None, None, None)

    done = patch("admin", {"kernel": str(kernel), "initrd": str(initrd), "append": "quiet"})
    assert done.status_code == 200, done.text
    assert (done.json()["kernel"], done.json()["append"]) == (str(kernel), "quiet")
    bad = patch("admin", {"append": "a\0b"})
    assert bad.status_code == 400, bad.text
    # the owner may change the command line of their VM, and drop its kernel
    assert patch("alice", {"append": "console=ttyS0"}).status_code == 200
    assert config(wm, "mine") == (str(kernel), str(initrd), "console=ttyS0")
    assert patch("alice", {"no_kernel": True}).status_code == 200
    assert config(wm, "mine") == (None, None, None)
