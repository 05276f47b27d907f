"""The VM page's panes, the task history and the backup overview in a real browser (Playwright
driving Debian's Chromium against a real ``waymark serve``; VMs that are off).

What is checked, as a user sees it:

- the VM page's tab strip (Summary, Checkpoints, Console, Backups, Settings): ARIA tabs, the
  page opening on Checkpoints, a click and the arrow, Home and End keys choosing a tab (its
  panel shown, the others hidden), the chosen tab kept across a reload; the Summary shows the
  memory, CPUs, firmware, TPM, CPU model, the checkpoint type and its source, the disk's size,
  space used and chain depth; the Console tab links to the serial console and to "Connect…";
- the Checkpoint button opens a dialog: Cancel makes nothing; a name and a type make exactly
  that checkpoint; no name and the default type make one named by the VM's default;
- a checkpoint's "Settings…" (by mouse and by keyboard) shows the hardware it recorded, read
  only;
- the task history lists a merge started through the API (by the signed-in user) and one
  started by the CLI (the host's user), with their duration and status, newest first; a
  self-service user sees only their VM's task;
- the backup overview lists the repository's usage, each VM's last success and last failure
  (a schedule's run whose VM lost its disk), the schedule's last run, and every point;
- screenshots of the Summary, the task history and the overview under test-artifacts/; no
  console errors and no failed requests.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.test_portal import (
    ADMIN,
    ADMIN_PASSWORD,
    ARTIFACTS,
    Watch,
    browser_page,
    reloaded,
    sign_in,
)
from tests.helpers import Waymark, served

VIEWER, VIEWER_PASSWORD = "selfie", "selfie-password"
TABS = ["Summary", "Checkpoints", "Console", "Backups", "Settings"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Waymark, str, str]]:
    wm = Waymark(tmp_path_factory.mktemp("pages") / "home")
    for vm, size in (("web", "16M"), ("db", "8M"), ("lost", "1M")):
        wm("vm", "create", vm, "--disk", size)
    repo = tmp_path_factory.mktemp("pages-repo") / "repo"
    wm("backup", "repo", "init", str(repo))
    wm("location", "add", "usb", str(repo), "--kind", "repository")
    wm("backup", "schedule", "add", "nightly", "--vm", "web", "--vm", "lost", "--repo",
       str(repo), "--daily", "03:00")
    Path(wm.json("vm", "show", "lost")["disks"][0]["active_image"]).unlink()
    with sqlite3.connect(wm.home / "catalog.db") as db:  # due now
        db.execute("UPDATE schedules SET next_due_at = '2000-01-01 00:00:00.000000'")
    assert wm.run("backup", "run-due").returncode != 0  # lost's backup fails, web's is made
    with served(wm) as (url, token):
        wm.run("user", "add", VIEWER, "--role", "self-service", "--password-stdin",
               input=f"{VIEWER_PASSWORD}\n").ok()
        wm("user", "grant", VIEWER, "--vm", "db", "--permission", "checkpoint")
        yield wm, url, token


def tab(page: Any, name: str) -> Any:
    return page.get_by_role("tab", name=name, exact=True)


def shown_panels(page: Any) -> list[str]:
    return page.locator('[role="tabpanel"]:visible').evaluate_all(
        "panels => panels.map(p => p.id)")


def test_the_vm_page_has_tabs_and_a_summary(site: tuple[Waymark, str, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    wm, url, _ = site
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        watch = Watch(page)
        sign_in(page, url, ADMIN, ADMIN_PASSWORD)
        page.get_by_role("link", name="web", exact=True).click()
        strip = page.get_by_role("tablist")
        assert strip.get_by_role("tab").all_inner_texts() == TABS
        expect(tab(page, "Checkpoints")).to_have_attribute("aria-selected", "true")
        assert shown_panels(page) == ["panel-checkpoints", "panel-space"]
        expect(page.get_by_role("tree")).to_be_visible()

        tab(page, "Summary").click()
        expect(tab(page, "Summary")).to_have_attribute("aria-selected", "true")
        expect(tab(page, "Checkpoints")).to_have_attribute("aria-selected", "false")
        assert shown_panels(page) == ["panel-summary"]
        summary = page.get_by_role("tabpanel", name="Summary")
        facts = {"memory": "512 MiB", "cpus": "1 virtual CPU", "cpu-model": "Westmere",
                 "firmware": "BIOS (SeaBIOS)", "tpm": "none", "state": "off",
                 "checkpoint-type": "production (Waymark's default)", "media": "empty",
                 "boot-order": "disk, cdrom", "uptime": "—"}
        for key, text in facts.items():
            expect(summary.locator(f'[data-summary="{key}"]')).to_have_text(text)
        shown = wm.json("vm", "show", "web")["disks"][0]
        disk = summary.get_by_role("table", name="Disks of web").locator("tbody tr")
        expect(disk).to_have_count(1)
        expect(disk.locator("td")).to_have_text(["16.0 MiB", human(shown["allocated_bytes"]),
                                                 str(shown["chain_depth"])])
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "vm-summary.png"), full_page=True)

        # the keyboard: arrows move and choose (wrapping), Home and End
        tab(page, "Summary").focus()
        for key, expected in (("ArrowRight", "Checkpoints"), ("ArrowRight", "Console"),
                              ("End", "Settings"), ("ArrowRight", "Summary"),
                              ("ArrowLeft", "Settings"), ("Home", "Summary"),
                              ("ArrowLeft", "Settings"), ("ArrowLeft", "Backups")):
            page.keyboard.press(key)
            expect(tab(page, expected)).to_be_focused()
            expect(tab(page, expected)).to_have_attribute("aria-selected", "true")
            expect(tab(page, expected)).to_have_attribute("tabindex", "0")
        assert shown_panels(page) == ["panel-backups"]
        expect(page.get_by_role("tab", selected=False)).to_have_count(4)
        page.reload()  # the tab chosen stays
        expect(tab(page, "Backups")).to_have_attribute("aria-selected", "true")
        assert shown_panels(page) == ["panel-backups"]
        expect(page.locator("#panel-backups tr[data-point]")).to_have_count(1)

        tab(page, "Console").click()
        console = page.get_by_role("tabpanel", name="Console")
        assert console.get_by_role("link", name="Connect…").get_attribute("href") == \
            "/vms/web/display"
        assert console.get_by_role("link", name="Serial console").get_attribute("href") == \
            "/vms/web/console"
        tab(page, "Checkpoints").click()  # back to where other tests expect the page
        browser.close()
        assert watch.problems == [], "\n".join(watch.problems)


def human(size: int) -> str:
    """Jinja's filesizeformat(binary=True), for the sizes the page shows."""
    units = ["KiB", "MiB", "GiB"]
    if size < 1024:
        return f"{size} Bytes"
    value, unit = size / 1024, 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{value:.1f} {units[unit]}"


def test_a_checkpoint_with_a_name_and_a_type_and_its_settings(
        site: tuple[Waymark, str, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    wm, url, _ = site
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        watch = Watch(page)
        sign_in(page, url, ADMIN, ADMIN_PASSWORD)
        page.get_by_role("link", name="db", exact=True).click()
        take = page.get_by_role("button", name="Checkpoint", exact=True)
        dialog = page.get_by_role("dialog", name="Create Checkpoint")

        take.click()  # Cancel: nothing is made
        expect(dialog).to_be_visible()
        expect(dialog.get_by_label("Name")).to_be_focused()
        dialog.get_by_label("Name").fill("never")
        dialog.get_by_role("button", name="Cancel").click()
        expect(dialog).to_be_hidden()
        assert wm.json("checkpoint", "list", "db")["checkpoints"] == []

        take.click()  # a name and a type
        expect(dialog.get_by_label("Type")).to_have_value("")
        dialog.get_by_label("Name").fill("before upgrade")
        dialog.get_by_label("Type").select_option("standard")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "checkpoint-dialog.png"))
        reloaded(page, dialog.get_by_role("button", name="Create").click)
        [made] = wm.json("checkpoint", "list", "db")["checkpoints"]
        assert (made["name"], made["requested_type"]) == ("before upgrade", "standard")

        page.get_by_role("button", name="Checkpoint", exact=True).click()  # the defaults
        expect(dialog.get_by_label("Name")).to_have_value("")
        reloaded(page, lambda: page.keyboard.press("Enter"))  # Enter in the name: Create
        _, second = wm.json("checkpoint", "list", "db")["checkpoints"]
        assert second["name"].startswith("db") and second["requested_type"] == "production"

        settings_by_mouse(page, made)
        settings_by_keyboard(page, second)
        browser.close()
        assert watch.problems == [], "\n".join(watch.problems)


def settings_by_mouse(page: Any, made: dict[str, Any]) -> None:
    """Settings… from the right-click menu: the hardware the checkpoint recorded."""
    from playwright.sync_api import expect

    row = page.locator(f'[data-ckpt="{made["id"]}"] > .row .label')
    row.click(button="right")
    page.get_by_role("menuitem", name="Settings…").click()
    settings = page.get_by_role("dialog", name="Settings of before upgrade")
    expect(settings).to_be_visible()
    facts = settings.locator("dl")
    for term, value in (("Memory", "512 MiB"), ("Processors", "1 virtual CPU"),
                        ("Firmware", "BIOS (SeaBIOS)"), ("TPM", "none"),
                        ("Boot order", "disk, cdrom"), ("DVD drive", "empty"),
                        ("CPU model", "Westmere"),
                        ("Type", re.compile(r"^standard, taken as disk-only.*; disks only: "
                                            r"applying it leaves the VM off$"))):
        expect(facts.locator(f'dt:text-is("{term}") + dd')).to_have_text(value)
    expect(facts.locator('dt:text-is("Taken") + dd time')).to_have_attribute(
        "datetime", made["created_at"])
    expect(settings.locator("tbody tr td").nth(1)).to_have_text("8.0 MiB")
    expect(settings.locator("input, select, textarea")).to_have_count(0)  # read-only
    expect(settings.get_by_role("button", name="Close")).to_be_focused()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "checkpoint-settings.png"))
    settings.get_by_role("button", name="Close").click()
    expect(settings).to_be_hidden()


def settings_by_keyboard(page: Any, second: dict[str, Any]) -> None:
    """Enter on the row opens the menu on Settings…; Enter; Escape closes the dialog."""
    from playwright.sync_api import expect

    item = page.locator(f'[data-ckpt="{second["id"]}"]')
    item.focus()
    page.keyboard.press("Enter")
    menu = page.get_by_role("menu")
    expect(menu).to_be_visible()
    # Hyper-V's order: Settings… first (so it has the focus), then Apply…, Rename…
    assert menu.get_by_role("menuitem").all_inner_texts()[:3] == \
        ["Settings…", "Apply…", "Rename…"]
    expect(menu.get_by_role("menuitem", name="Settings…")).to_be_focused()
    page.keyboard.press("ArrowDown")
    expect(menu.get_by_role("menuitem", name="Apply…")).to_be_focused()
    page.keyboard.press("ArrowUp")
    page.keyboard.press("Enter")
    named = page.get_by_role("dialog", name=f"Settings of {second['name']}")
    expect(named).to_be_visible()
    page.keyboard.press("Escape")
    expect(named).to_be_hidden()


def test_the_task_history_names_users_and_durations(site: tuple[Waymark, str, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    wm, url, token = site
    wm("checkpoint", "create", "web", "--name", "by-api")
    wm("checkpoint", "create", "db", "--name", "by-cli")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as api:
        answer = api.delete("/api/vms/web/checkpoints/by-api")
        assert answer.status_code == 202, answer.text
        web_job = answer.json()["job_id"]
    wm("job", "wait", web_job)
    wm("checkpoint", "delete", "db", "by-cli")
    [db_job] = [j for j in wm.json("job", "list", "--all") if j["vm_name"] == "db"]
    host_user = db_job["user"]
    assert host_user.endswith(" (host)"), db_job
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        watch = Watch(page)
        sign_in(page, url, ADMIN, ADMIN_PASSWORD)
        page.get_by_role("navigation", name="Main").get_by_role("link", name="Tasks").click()
        page.wait_for_url(f"{url}/tasks")
        table = page.get_by_role("table", name="Task history")
        rows = table.locator("tbody tr")
        expect(rows).to_have_count(2)
        assert rows.evaluate_all("rs => rs.map(r => r.dataset.job)") == [db_job["id"], web_job]
        web = table.locator(f'tr[data-job="{web_job}"]')
        expect(web.locator('[data-cell="user"]')).to_have_text(ADMIN)
        expect(web.locator('[data-cell="status"]')).to_have_text("completed")
        expect(web.locator('[data-cell="duration"]')).to_have_text(
            f"{wm.json('job', 'show', web_job)['duration_seconds']} s")
        expect(web.get_by_role("link", name="web")).to_be_visible()
        expect(web.locator("time")).to_have_count(1)
        expect(table.locator(f'tr[data-job="{db_job["id"]}"] [data-cell="user"]')).to_have_text(
            host_user)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "task-history.png"), full_page=True)
        reloaded(page, page.get_by_role("button", name="Sign out").click)
        page.wait_for_url(f"{url}/login")

        sign_in(page, url, VIEWER, VIEWER_PASSWORD)  # their VM's task only
        page.get_by_role("link", name="Tasks").click()
        rows = page.get_by_role("table", name="Task history").locator("tbody tr")
        expect(rows).to_have_count(1)
        expect(rows.first).to_have_attribute("data-job", db_job["id"])
        browser.close()
        assert watch.problems == [], "\n".join(watch.problems)


def test_the_backup_overview_shows_usage_and_last_results(
        site: tuple[Waymark, str, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    wm, url, _ = site
    repo = wm.json("location", "list")[0]["path"]
    [point] = wm.json("backup", "list", "--repo", repo)
    [schedule] = wm.json("backup", "schedule", "list")
    failure = next(v["error"] for v in schedule["last_result"]["vms"] if v["vm_name"] == "lost")
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        watch = Watch(page)
        sign_in(page, url, ADMIN, ADMIN_PASSWORD)
        page.get_by_role("link", name="Backups").click()
        page.wait_for_url(f"{url}/backups")
        usb = page.get_by_role("table", name="Repositories").locator('tr[data-repository="usb"]')
        expect(usb.locator('[data-cell="points"]')).to_have_text("1")
        expect(usb.locator('[data-cell="bytes"]')).to_have_text(human(point["bytes"]))
        results = page.get_by_role("table", name="Last results")
        web = results.locator('tr[data-vm-result="web"]')
        expect(web.locator('[data-cell="success"] time')).to_have_attribute(
            "datetime", point["created_at"])
        expect(web.locator('[data-cell="failure"]')).to_have_text("none recorded")
        lost = results.locator('tr[data-vm-result="lost"]')
        expect(lost.locator('[data-cell="success"]')).to_have_text("never")
        expect(lost.locator('[data-cell="failure"]')).to_contain_text("schedule nightly")
        expect(lost.locator('[data-cell="failure"] .error')).to_have_text(failure)
        runs = page.get_by_role("table", name="Last runs of the schedules")
        nightly = runs.locator('tr[data-schedule-run="nightly"]')
        expect(nightly.locator("time")).to_have_attribute("datetime", schedule["last_run_at"])
        expect(nightly.locator('[data-cell="result"]')).to_have_text("1 of 2 VMs failed")
        points = page.get_by_role("table", name="Backup points").locator("tbody tr")
        expect(points).to_have_count(1)
        expect(points.first).to_have_attribute("data-point", point["id"])
        expect(points.first).to_contain_text("web")
        schedules = page.get_by_role("heading", name="Schedules", exact=True)
        expect(schedules).to_be_visible()  # still there, below
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "backups-overview.png"), full_page=True)
        browser.close()
        assert watch.problems == [], "\n".join(watch.problems)
