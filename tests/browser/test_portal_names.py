"""Names in the portal, in a real browser (Playwright, Debian's Chromium, a real ``waymark
serve``): a VM and a checkpoint named with ``?``, ``#``, ``%`` and spaces are reachable from the
list, from a sign-in that started at the VM's own URL, and by their menus and forms; a VM still
named ``../profiles/small`` (a name from before the grammar refused it) cannot turn an
administrator's "Save settings" into a change of the profile ``small``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from tests.browser.test_portal import (
    ADMIN,
    ADMIN_PASSWORD,
    Watch,
    browser_page,
    menu_action,
    reloaded,
)
from tests.helpers import Waymark, query, served

NAME = "a?b #c%d 50%"
CKPT = "before upgrade? #1 (100%)"
LEGACY = "../profiles/small"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Waymark, str, str]]:
    wm = Waymark(tmp_path_factory.mktemp("portal-names") / "home")
    wm("vm", "create", NAME, "--disk", "1M")
    wm("checkpoint", "create", NAME, "--name", CKPT)
    wm("profile", "create", "small", "--cpus", "1", "--max-checkpoints", "5")
    legacy_id = wm.json("vm", "create", "legacy", "--disk", "1M")["id"]
    with sqlite3.connect(wm.home / "catalog.db") as con:
        # the name an older Waymark let a self-service user choose
        con.execute("UPDATE vms SET name = ? WHERE id = ?", (LEGACY, legacy_id))
    with served(wm) as (url, _):
        yield wm, url, legacy_id


def segment(name: str) -> str:
    return quote(name, safe="")


def test_names_with_url_characters_are_reachable_and_posted_to(
        site: tuple[Waymark, str, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    wm, url, _ = site
    page_url = f"{url}/vms/{segment(NAME)}"
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        watch = Watch(page)
        page.goto(page_url)  # signed out: to the sign-in, then back to this very VM
        assert "/login" in page.url
        page.get_by_label("User name").fill(ADMIN)
        page.get_by_label("Password").fill(ADMIN_PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(page_url)
        expect(page.get_by_role("heading", level=1)).to_contain_text(NAME)

        page.goto(f"{url}/vms")
        link = page.get_by_role("link", name=NAME, exact=True)
        assert link.get_attribute("href") == f"/vms/{segment(NAME)}"
        link.click()
        page.wait_for_url(page_url)
        expect(page.locator(f'[data-name="{CKPT}"]')).to_have_count(1)

        page.get_by_role("tab", name="Settings").click()
        page.get_by_label("Checkpoint limit").fill("77")
        with page.expect_request(lambda r: r.method == "PATCH") as sent:
            reloaded(page, page.get_by_role("button", name="Save settings").click)
        assert sent.value.url == f"{url}/api/vms/{segment(NAME)}"
        assert wm.json("vm", "show", NAME)["max_checkpoints"] == 77

        [ckpt] = wm.json("checkpoint", "list", NAME)["checkpoints"]
        page.get_by_role("tab", name="Checkpoints").click()
        menu_action(page, ckpt["id"], "Rename…")
        page.get_by_label("New name").fill("after? #2 100%")
        with page.expect_request(lambda r: r.method == "PATCH") as sent:
            reloaded(page, page.get_by_role("dialog", name="Rename Checkpoint").get_by_role(
                "button", name="Rename").click)
        assert sent.value.url == f"{url}/api/vms/{segment(NAME)}/checkpoints/{ckpt['id']}"
        assert [c["name"] for c in wm.json("checkpoint", "list", NAME)["checkpoints"]] == \
            ["after? #2 100%"]
        browser.close()
        assert watch.problems == [], "\n".join(watch.problems)


def test_a_slash_in_an_old_name_cannot_redirect_save_settings(
        site: tuple[Waymark, str, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    wm, url, legacy_id = site
    profile = query(wm.home, "SELECT * FROM profiles WHERE name = 'small'")
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        watch = Watch(page)
        page.goto(f"{url}/login")
        page.get_by_label("User name").fill(ADMIN)
        page.get_by_label("Password").fill(ADMIN_PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{url}/vms")
        page.goto(f"{url}/vms/{legacy_id}")
        expect(page.get_by_role("heading", level=1)).to_contain_text(LEGACY)
        page.get_by_role("tab", name="Settings").click()
        page.get_by_label("Checkpoint limit").fill("99")
        watch.allowed.add(f"{url}/api/vms/{segment(LEGACY)}")  # no such VM path: refused
        with page.expect_response(lambda r: r.request.method == "PATCH") as answer:
            page.get_by_role("button", name="Save settings").click()
        assert query(wm.home, "SELECT * FROM profiles WHERE name = 'small'") == profile
        assert answer.value.url == f"{url}/api/vms/{segment(LEGACY)}"
        assert answer.value.status == 404
        form = page.locator("form[data-api-method=PATCH]")
        assert form.get_attribute("data-api-path") == f"/api/vms/{segment(LEGACY)}"
        page.goto(f"{url}/vms")
        link = page.get_by_role("link", name=LEGACY, exact=True)
        assert link.get_attribute("href") == f"/vms/{segment(LEGACY)}"
        browser.close()
        assert watch.problems == [], "\n".join(watch.problems)
