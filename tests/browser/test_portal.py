"""The web portal in a real browser: Playwright driving Debian's Chromium against a real
``waymark serve`` on a free loopback port (VMs that are off here; the issue's run with a live
guest comes with the guest tests).

What is checked, as a user sees it:

- an administrator signs in, sees the VM list, opens a VM, takes two checkpoints with the
  Checkpoint button (its dialog's Create: the VM's default name and type) and sees the tree
  (newest at the bottom, Now under the current one, the disk-only icon); applies the first
  with "Create Checkpoint and Apply" (the safety checkpoint appears under the second, Now
  moves under the first); renames through the menu; deletes the safety checkpoint through
  the menu (the dialog says how much it frees) and sees its merge reach 100% and the tree
  redrawn without a reload; the VM page and its space chart (in the tree's order, with Now)
  are saved as screenshots and checked for what must be visible;
- a self-service user with ``checkpoint-restore-only`` on one VM sees only that VM, no
  Checkpoint or Delete VM button, and a menu with Apply but no Delete entries; a forged POST
  of a checkpoint (an action the page does not offer) from their signed-in page gets 403 and
  creates nothing;
- a sign-in form posted from a page of another site is refused (login CSRF) and sets no
  cookie; the portal's own form still signs in;
- no console errors and no failed network requests, other than that forged 403 (a violation
  of the Content-Security-Policy would be a console error).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Waymark, query, served

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ADMIN, ADMIN_PASSWORD = "root-admin", "test-password"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Waymark, str]]:
    if shutil.which("chromium") is None and not Path(CHROMIUM).exists():
        raise RuntimeError("missing chromium (apt-get install -y chromium)")
    wm = Waymark(tmp_path_factory.mktemp("portal") / "home")
    wm("vm", "create", "web", "--disk", "16M")
    wm("vm", "create", "db", "--disk", "16M")
    repo = tmp_path_factory.mktemp("portal-repo") / "repo"
    wm("backup", "repo", "init", str(repo))
    wm("location", "add", "usb", str(repo), "--kind", "repository")
    with served(wm) as (url, _):
        wm.run("user", "add", "restorer", "--role", "self-service", "--password-stdin",
               input="restorer-pass\n").ok()
        wm("user", "grant", "restorer", "--vm", "web", "--permission", "checkpoint-restore-only")
        yield wm, url


class Watch:
    """Console errors and failed requests of one page (but for ``allowed`` URLs: a request
    the test makes fail on purpose)."""

    def __init__(self, page: Any) -> None:
        self.problems: list[str] = []
        self.allowed: set[str] = set()
        page.on("console", lambda m: m.type == "error"
                and m.location.get("url") not in self.allowed
                and self.problems.append(f"console: {m.text} ({m.location.get('url')})"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(
            f"failed: {r.method} {r.url} {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and r.url not in self.allowed
                and self.problems.append(f"HTTP {r.status}: {r.request.method} {r.url}"))


def browser_page(playwright: Any) -> tuple[Any, Any]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
    return browser, browser.new_page(viewport={"width": 1200, "height": 900})


def sign_in(page: Any, url: str, name: str, password: str) -> None:
    page.goto(f"{url}/vms")
    assert "/login" in page.url
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{url}/vms")


def tree_rows(page: Any) -> list[tuple[int, str]]:
    """(level, label) of each tree item, in document order."""
    items = page.locator('[role="treeitem"]')
    return [(int(items.nth(i).get_attribute("aria-level")),
             items.nth(i).locator(".label").first.inner_text())
            for i in range(items.count())]


def menu_action(page: Any, ckpt_id: str, action: str) -> None:
    """Right-click the checkpoint's own row (its item also holds its subtree), then choose."""
    page.locator(f'[role="treeitem"][data-ckpt="{ckpt_id}"] > .row .label').click(button="right")
    page.get_by_role("menuitem", name=action).click()


def reloaded(page: Any, act: Any) -> None:
    """Do ``act``, which makes the page reload itself, and wait for the new page."""
    with page.expect_navigation():
        act()


def take_checkpoint(page: Any) -> None:
    """The Checkpoint button, then Create in its dialog (the VM's default name and type)."""
    page.get_by_role("button", name="Checkpoint", exact=True).click()
    reloaded(page, page.get_by_role("dialog", name="Create Checkpoint").get_by_role(
        "button", name="Create", exact=True).click)


def merged_and_redrawn(page: Any, rows: list[tuple[int, str]], timeout: float) -> None:
    """After a delete: its merge reached 100%, the job stream ended, and the tree was redrawn
    from the server (no reload) with ``rows``."""
    from playwright.sync_api import expect

    status = page.locator("p.job-status")
    expect(status).to_contain_text("100%", timeout=timeout)
    expect(status).to_have_attribute("data-job-status", "completed")
    expect(page.locator("body")).to_have_attribute("data-streaming", "0")  # stream ended
    expect(page.locator("#vm")).to_have_attribute("data-redrawn", "1")  # no reload
    assert tree_rows(page) == rows


def check_space_chart(space: Any, expect: Any, rows: list[str]) -> None:
    """The chart's rows are ``rows`` (the tree's order, Now among them), each with its own
    space, and the checkpoints' with the shared space below them."""
    expect(space.get_by_role("table", name="Space held by each checkpoint")).to_be_visible()
    assert [t.strip() for t in space.locator("tbody th[scope=row]").all_inner_texts()] == \
        [r if r != "Now" else "➤ Now" for r in rows]
    expect(space.locator(".bar:not(.shared)")).to_have_count(len(rows))  # own space, each
    expect(space.locator(".bar.shared")).to_have_count(len(rows) - 1)  # shared: not Now
    widths = space.locator(".bar").evaluate_all("bars => bars.map(b => b.style.width)")
    assert all(w.endswith("%") for w in widths), widths  # set from data-width (CSP)


def test_an_administrator_checkpoints_applies_renames_and_deletes(
        site: tuple[Waymark, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    wm, url = site
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        watch = Watch(page)
        sign_in(page, url, ADMIN, ADMIN_PASSWORD)
        expect(page.get_by_role("link", name="web")).to_be_visible()
        expect(page.get_by_role("link", name="db")).to_be_visible()
        page.get_by_role("link", name="web").click()
        for expected in (1, 2):
            take_checkpoint(page)
            expect(page.locator("[data-ckpt]")).to_have_count(expected)
        made = wm.json("checkpoint", "list", "web")["checkpoints"]
        (first, first_id), (second, second_id) = [(c["name"], c["id"]) for c in made]
        assert tree_rows(page) == [(1, first), (2, second), (3, "Now")]
        expect(page.locator(".icon.disks")).to_have_count(2)

        menu_action(page, first_id, "Apply…")
        dialog = page.get_by_role("dialog", name="Apply Checkpoint")
        expect(dialog.get_by_role("button", name="Apply", exact=True)).to_be_visible()
        expect(dialog.get_by_role("button", name="Cancel")).to_be_visible()
        reloaded(page, dialog.get_by_role("button", name="Create Checkpoint and Apply").click)
        listing = wm.json("checkpoint", "list", "web")
        assert listing["current_checkpoint_id"] == first_id
        [(safety, safety_id)] = [(c["name"], c["id"]) for c in listing["checkpoints"]
                                 if c["id"] not in (first_id, second_id)]
        assert tree_rows(page) == [(1, first), (2, second), (3, safety), (2, "Now")]

        menu_action(page, second_id, "Rename…")
        page.get_by_label("New name").fill("known good")
        reloaded(page, page.get_by_role("dialog", name="Rename Checkpoint").get_by_role(
            "button", name="Rename").click)
        expect(page.locator('[data-name="known good"]')).to_have_count(1)

        menu_action(page, safety_id, "Delete Checkpoint…")
        delete = page.get_by_role("dialog", name="Delete Checkpoint")
        expect(delete).to_contain_text("frees about")
        delete.get_by_role("button", name="Delete").click()
        # the answer's merge job (job_id) is named
        expect(page.locator("#notice")).to_have_text(
            re.compile(rf"Deleted {re.escape(safety)}; merging in job [0-9a-f]{{12}}\."))
        merged_and_redrawn(page, [(1, first), (2, "known good"), (2, "Now")], 30000)
        assert [c["name"] for c in wm.json("checkpoint", "list", "web")["checkpoints"]] == \
            [first, "known good"]

        page.reload()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "vm-page.png"), full_page=True)
        space = page.locator("section.space")
        check_space_chart(space, expect, [first, "known good", "Now"])
        space.screenshot(path=str(ARTIFACTS / "space-chart.png"))
        expect(page.get_by_role("tree")).to_be_visible()
        assert (ARTIFACTS / "vm-page.png").stat().st_size > 0
        browser.close()
        assert watch.problems == [], "\n".join(watch.problems)
    assert wm.run("check").returncode == 0


def test_a_restore_only_user_sees_one_vm_and_no_delete(site: tuple[Waymark, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    wm, url = site
    wm("checkpoint", "create", "web", "--name", "for-restore")
    before = wm.json("checkpoint", "list", "web")
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        watch = Watch(page)
        sign_in(page, url, "restorer", "restorer-pass")
        expect(page.get_by_role("link", name="web")).to_be_visible()
        expect(page.get_by_role("link", name="db")).to_have_count(0)
        page.get_by_role("link", name="web").click()
        expect(page.get_by_role("button", name="Checkpoint")).to_have_count(0)
        expect(page.get_by_role("button", name="Delete VM…")).to_have_count(0)  # not theirs
        page.locator('[data-name="for-restore"] > .row .label').click(button="right")
        menu = page.get_by_role("menu")
        expect(menu.get_by_role("menuitem", name="Apply…")).to_be_visible()
        expect(menu.get_by_role("menuitem", name="Delete Checkpoint…")).to_have_count(0)
        expect(menu.get_by_role("menuitem", name="Delete Checkpoint Subtree…")).to_have_count(0)
        expect(menu.get_by_role("menuitem", name="Rename…")).to_have_count(0)
        page.keyboard.press("Escape")

        forged_url = f"{url}/api/vms/web/checkpoints"
        watch.allowed.add(forged_url)
        status = page.evaluate("""async (target) => {
            const csrf = document.querySelector('meta[name="csrf-token"]').content;
            const r = await fetch(target, {method: "POST", headers: {"X-CSRF-Token": csrf}});
            return r.status;
        }""", forged_url)
        assert status == 403
        browser.close()
        assert watch.problems == [], "\n".join(watch.problems)
    assert wm.json("checkpoint", "list", "web") == before


def test_a_sign_in_form_on_another_site_signs_no_one_in(site: tuple[Waymark, str]) -> None:
    """Login CSRF: a page of another site posts the portal's sign-in form with the attacker's
    name and password (so the victim would work, unknowing, in the attacker's account); the
    browser sends its Origin, the portal refuses it and sets no cookie. The same browser then
    signs in through the portal's own form as usual."""
    from playwright.sync_api import sync_playwright

    wm, url = site
    evil = "http://evil.example/"
    attack = f"""<!doctype html><form method="post" action="{url}/login">
        <input name="name" value="restorer"><input name="password" value="restorer-pass">
        <input name="next" value="/vms"><button id="go">Go</button></form>"""
    sessions_before = query(wm.home, "SELECT count(*) FROM web_sessions")
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        page.route(evil, lambda route: route.fulfill(content_type="text/html", body=attack))
        page.goto(evil)
        with page.expect_navigation() as navigation:
            page.click("#go")
        response = navigation.value
        assert response is not None and response.status == 403
        assert response.request.headers.get("origin") == "http://evil.example"
        assert "another site" in page.content()
        assert not [c for c in page.context.cookies() if c["name"] == "waymark_session"]
        assert query(wm.home, "SELECT count(*) FROM web_sessions") == sessions_before
        watch = Watch(page)
        sign_in(page, url, "restorer", "restorer-pass")  # the real form still works
        assert [c for c in page.context.cookies() if c["name"] == "waymark_session"]
        browser.close()
        assert watch.problems == [], "\n".join(watch.problems)


def test_administration_pages(site: tuple[Waymark, str]) -> None:
    """Users, grants and the audit log on /admin (a grant made through its form reaches the
    catalog; a token made there is shown once); profiles, templates and locations on /library;
    a non-administrator gets 403 on both."""
    from playwright.sync_api import expect, sync_playwright

    wm, url = site
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        watch = Watch(page)
        sign_in(page, url, ADMIN, ADMIN_PASSWORD)
        page.get_by_role("link", name="Administration").click()
        users = page.get_by_role("table", name="Users")
        expect(users).to_contain_text("restorer")
        expect(users).to_contain_text("checkpoint-restore-only")
        page.get_by_label("User", exact=True).select_option("restorer")
        page.get_by_label("VM").select_option("db")
        page.get_by_label("start-stop").check()
        reloaded(page, page.get_by_role("button", name="Grant").click)
        granted = next(u for u in wm.json("user", "list") if u["name"] == "restorer")["grants"]
        db_id = wm.json("vm", "show", "db")["id"]
        assert {"kind": "vm", "object": db_id, "permissions": ["start-stop"]} in granted
        expect(page.get_by_role("table", name="Audit log")).to_contain_text(
            "POST /api/users/{name}/grants")
        page.get_by_label("New token for you, named").fill("from-the-portal")
        page.get_by_role("button", name="Create token").click()
        expect(page.locator("#notice")).to_contain_text("wm_")
        page.get_by_role("link", name="Library").click()
        expect(page.get_by_role("table", name="Locations")).to_be_visible()
        browser.close()
        assert watch.problems == [], "\n".join(watch.problems)

        browser, page = browser_page(playwright)
        sign_in(page, url, "restorer", "restorer-pass")
        for path in ("/admin", "/library"):
            response = page.goto(f"{url}{path}")
            assert response is not None and response.status == 403
        browser.close()


def test_backup_schedules_are_made_edited_and_removed(site: tuple[Waymark, str]) -> None:
    """On /backups: a schedule made through the form is in the catalog with what was chosen;
    saving it with another time changes only that; Remove removes it."""
    from playwright.sync_api import expect, sync_playwright

    wm, url = site
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        watch = Watch(page)
        sign_in(page, url, ADMIN, ADMIN_PASSWORD)
        page.get_by_role("link", name="Backups").click()
        new = page.get_by_role("form", name="New schedule")
        new.get_by_label("Name").fill("nightly")
        new.get_by_label("VMs").select_option(label="web")
        new.get_by_label("At").fill("03:15")
        reloaded(page, new.get_by_role("button", name="Create schedule").click)
        [made] = wm.json("backup", "schedule", "list")
        web_id = wm.json("vm", "show", "web")["id"]
        assert (made["name"], made["vm_ids"], made["every"], made["at"]) == \
            ("nightly", [web_id], "daily", "03:15")
        edit = page.get_by_role("form", name="Schedule nightly")
        edit.get_by_label("At").fill("04:45")
        reloaded(page, edit.get_by_role("button", name="Save nightly").click)
        [edited] = wm.json("backup", "schedule", "list")
        assert (edited["vm_ids"], edited["at"]) == ([web_id], "04:45")
        page.get_by_role("button", name="Remove nightly").click()
        reloaded(page, page.get_by_role("dialog", name="Remove Schedule").get_by_role(
            "button", name="Remove nightly").click)
        assert wm.json("backup", "schedule", "list") == []
        expect(page.get_by_text("No schedules.")).to_be_visible()
        browser.close()
        assert watch.problems == [], "\n".join(watch.problems)
