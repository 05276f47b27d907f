"""The portal end to end with a real guest (the issue's run): Playwright driving Debian's
Chromium against ``waymark serve`` on a free loopback port, over a home where the test guest
runs under QEMU.

An administrator signs in, opens the running guest's serial console (its counter lines arrive
live) and, on the VM's page: sees its uptime and its CPU and memory use in the Summary,
takes a checkpoint (live), then
(after something is written in the guest) applies it with "Create Checkpoint and Apply" and
sees both checkpoints and Now in their places; deletes the safety checkpoint and watches the
merge reach 100% and the tree redrawn; renames the first; backs the VM up to a registered
repository and restores the point as a new VM, whose disk holds exactly what the VM's held at
the backup. A
self-service user with ``checkpoint-restore-only`` then sees only that VM, and no Delete
entries. No console errors and no failed requests along the way.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.test_portal import (
    ADMIN,
    ADMIN_PASSWORD,
    Watch,
    browser_page,
    menu_action,
    merged_and_redrawn,
    reloaded,
    sign_in,
    take_checkpoint,
    tree_rows,
)
from tests.guest.guests import Guest, agent_exec, create
from tests.guest.test_live import wait_agent
from tests.helpers import Waymark, content_sha256, served


def test_the_portal_drives_a_running_guest(home: Waymark, image: dict[str, str],
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    from playwright.sync_api import sync_playwright

    wm = home
    vm = create(wm, "portal", image)
    wm("vm", "create", "elsewhere", "--disk", "8M")
    repo = tmp_path_factory.mktemp("portal-backups") / "repo"
    wm("backup", "repo", "init", str(repo))
    wm("location", "add", "usb", str(repo), "--kind", "repository")
    vm.boot()
    wait_agent(vm)
    with served(wm) as (url, _), sync_playwright() as playwright:
        wm.run("user", "add", "restorer", "--role", "self-service", "--password-stdin",
               input="restorer-pass\n").ok()
        wm("user", "grant", "restorer", "--vm", "portal", "--permission",
           "checkpoint-restore-only")
        browser, page = browser_page(playwright)
        watch = Watch(page)
        sign_in(page, url, ADMIN, ADMIN_PASSWORD)
        console_is_live(page)
        first_id = checkpoint_apply_delete_rename(page, vm)
        backup_and_restore_as_new(page, wm)
        browser.close()
        assert watch.problems == [], "\n".join(watch.problems)
        restore_only_view(playwright, url, first_id)
    vm.ensure_off()
    assert wm.run("check").returncode == 0


def console_is_live(page: Any) -> None:
    """From the VM list, the console of the running guest: its counter lines arrive live;
    following can be stopped, which ends the stream."""
    from playwright.sync_api import expect

    page.locator('tr:has(a:text-is("portal")) >> role=link[name="Console"]').click()
    output = page.get_by_label("Serial console output")
    expect(output).to_contain_text("COUNTER", timeout=30000)
    seen = output.inner_text().count("COUNTER")
    page.wait_for_function(
        "([n]) => document.getElementById('console-output').textContent"
        ".split('COUNTER').length - 1 > n", arg=[seen], timeout=30000)
    page.get_by_label("Follow the output").uncheck()
    expect(page.locator("body")).to_have_attribute("data-streaming", "0", timeout=30000)
    page.goto(page.url.rsplit("/console", 1)[0].rsplit("/vms/", 1)[0] + "/vms")


def checkpoint_apply_delete_rename(page: Any, vm: Guest) -> str:
    """On the running VM's page; returns the first checkpoint's id."""
    from playwright.sync_api import expect

    wm = vm.wm
    page.get_by_role("link", name="portal", exact=True).click()
    expect(page.locator("[data-vm-state]")).to_have_text("running")
    running_summary(page, wm)
    take_checkpoint(page)
    [first] = wm.json("checkpoint", "list", "portal")["checkpoints"]
    assert tree_rows(page) == [(1, first["name"]), (2, "Now")]
    agent_exec(vm, "/bin/sh", "-c", "echo after-the-checkpoint > /data/after.txt; sync")

    menu_action(page, first["id"], "Apply…")
    reloaded(page, page.get_by_role("dialog", name="Apply Checkpoint").get_by_role(
        "button", name="Create Checkpoint and Apply").click)
    listing = wm.json("checkpoint", "list", "portal")
    [safety] = [c for c in listing["checkpoints"] if c["id"] != first["id"]]
    assert safety["parent_id"] == first["id"] and listing["current_checkpoint_id"] == first["id"]
    assert tree_rows(page) == [(1, first["name"]), (2, safety["name"]), (2, "Now")]

    menu_action(page, safety["id"], "Delete Checkpoint…")
    page.get_by_role("dialog", name="Delete Checkpoint").get_by_role(
        "button", name="Delete").click()
    merged_and_redrawn(page, [(1, first["name"]), (2, "Now")], 120000)

    page.reload()
    menu_action(page, first["id"], "Rename…")
    page.get_by_label("New name").fill("before the change")
    reloaded(page, page.get_by_role("dialog", name="Rename Checkpoint").get_by_role(
        "button", name="Rename").click)
    expect(page.locator('[data-name="before the change"]')).to_have_count(1)
    return str(first["id"])


def running_summary(page: Any, wm: Waymark) -> None:
    """The Summary of the running guest: its uptime, and its QEMU's CPU and memory use (read
    from /proc); the page then goes back to the Checkpoints tab."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Summary").click()
    summary = page.get_by_role("tabpanel", name="Summary")
    expect(summary.locator('[data-summary="memory"]')).to_contain_text("in use")
    expect(summary.locator('[data-summary="cpus"]')).to_contain_text("CPU use")
    expect(summary.locator('[data-summary="uptime"]')).to_contain_text(" s")
    page.get_by_role("tab", name="Checkpoints").click()


def backup_and_restore_as_new(page: Any, wm: Waymark) -> None:
    """Back up now, restore the point as a new VM: its disk is what the VM's was."""
    from playwright.sync_api import expect

    disk = wm.json("vm", "show", "portal")["disks"][0]["active_image"]
    at_backup = content_sha256(disk)
    page.get_by_role("tab", name="Backups").click()
    reloaded(page, page.get_by_role("button", name="Back up now").click)
    expect(page.locator("tr[data-point]")).to_have_count(1)
    page.get_by_label("Restore").select_option("as_new")
    page.get_by_label("New VM name").fill("portal-restored")
    reloaded(page, page.get_by_role("button", name="Restore", exact=True).click)
    restored = wm.json("vm", "show", "portal-restored")
    assert content_sha256(restored["disks"][0]["active_image"]) == at_backup


def restore_only_view(playwright: Any, url: str, first_id: str) -> None:
    """The restore-only user sees that VM alone, and no Delete entry in its menu."""
    from playwright.sync_api import expect

    browser, page = browser_page(playwright)
    watch = Watch(page)
    sign_in(page, url, "restorer", "restorer-pass")
    expect(page.get_by_role("link", name="portal", exact=True)).to_be_visible()
    for hidden in ("elsewhere", "portal-restored"):
        expect(page.get_by_role("link", name=hidden)).to_have_count(0)
    page.get_by_role("link", name="portal", exact=True).click()
    page.locator(f'[data-ckpt="{first_id}"] > .row .label').click(button="right")
    menu = page.get_by_role("menu")
    expect(menu.get_by_role("menuitem", name="Apply…")).to_be_visible()
    expect(menu.get_by_role("menuitem", name="Delete Checkpoint…")).to_have_count(0)
    browser.close()
    assert watch.problems == [], "\n".join(watch.problems)
