"""Safe destructive actions and a tree you can read, in a real browser (Playwright driving
Debian's Chromium against a real ``waymark serve``; every VM is off).

Every destructive action asks through the one confirmation (``confirmAction`` in
``static/confirm.js``): a dialog naming what is lost, focus on Cancel, one red button. For each,
Cancel (or Escape) changes nothing, checked through the CLI, and confirming does exactly what
the dialog named: apply, delete, delete subtree, restore into the VM (both modes), prune (after
a dry-run preview), VM delete, user removal, token revocation. The tree: the menu opens inside
the clicked row (not below the checkpoint's subtree), a deleted checkpoint's row says
"Deleting…" while its children and Now stay, then the tree and space chart are redrawn from the
server without a reload; times are the browser's local time with the ISO form on hover;
keyboard-only use of the tree, its menu and a dialog. No console errors, no failed requests.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.browser.test_portal import (
    ADMIN,
    ADMIN_PASSWORD,
    ARTIFACTS,
    CHROMIUM,
    FLAGS,
    Watch,
    menu_action,
    reloaded,
    sign_in,
    tree_rows,
)
from tests.helpers import Waymark, served

RED = "rgb(179, 38, 30)"  # button.danger in app.css
ZONE = "Asia/Kolkata"  # UTC+05:30: a local time differs from UTC in its hours and minutes


def chain(wm: Waymark, vm: str, *names: str) -> dict[str, str]:
    """A VM with ``names`` as a chain of checkpoints (each under the one before, Now under the
    last); their ids by name."""
    wm("vm", "create", vm, "--disk", "16M")
    for name in names:
        wm("checkpoint", "create", vm, "--name", name)
    return ids(wm, vm)


def ids(wm: Waymark, vm: str) -> dict[str, str]:
    return {c["name"]: c["id"] for c in wm.json("checkpoint", "list", vm)["checkpoints"]}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Waymark, str, Path]]:
    if not Path(CHROMIUM).exists():
        raise RuntimeError("missing chromium (apt-get install -y chromium)")
    wm = Waymark(tmp_path_factory.mktemp("safety") / "home")
    repos = tmp_path_factory.mktemp("safety-repos")
    for name in ("usb", "pruning"):
        wm("backup", "repo", "init", str(repos / name))
        wm("location", "add", name, str(repos / name), "--kind", "repository")
    with served(wm) as (url, _):
        yield wm, url, repos


def browser_page(playwright: Any, **options: Any) -> tuple[Any, Any]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
    return browser, browser.new_page(viewport={"width": 1200, "height": 900}, **options)


def admin_on(playwright: Any, url: str, path: str, **options: Any) -> tuple[Any, Any, Watch]:
    browser, page = browser_page(playwright, **options)
    watch = Watch(page)
    sign_in(page, url, ADMIN, ADMIN_PASSWORD)
    page.goto(f"{url}{path}")
    return browser, page, watch


def confirmation(page: Any, title: str) -> Any:
    """The open confirmation titled ``title``, checked for the pattern: focus on Cancel, one
    red (danger) button, Cancel last."""
    from playwright.sync_api import expect

    dialog = page.get_by_role("dialog", name=title)
    expect(dialog).to_be_visible()
    assert page.evaluate("document.activeElement.textContent") == "Cancel"
    assert page.evaluate("document.activeElement.closest('dialog') !== null")
    danger = dialog.locator("button.danger")
    expect(danger).to_have_count(1)
    assert danger.evaluate("b => getComputedStyle(b).backgroundColor") == RED
    assert dialog.get_by_role("button").last.inner_text() == "Cancel"
    return dialog


def cancel(page: Any, dialog: Any, escape: bool = False) -> None:
    from playwright.sync_api import expect

    if escape:
        page.keyboard.press("Escape")
    else:
        dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_have_count(0)  # the dialog is gone, not only hidden


def finish(browser: Any, watch: Watch) -> None:
    browser.close()
    assert watch.problems == [], "\n".join(watch.problems)


def test_the_menu_opens_inside_the_clicked_row(site: tuple[Waymark, str, Path]) -> None:
    """A checkpoint with a deep subtree: the menu's top is inside its own row whether it is
    opened by a right-click, its ⋮ button or the keyboard (Shift+F10); Escape closes it and
    gives the focus back to the checkpoint."""
    from playwright.sync_api import sync_playwright

    wm, url, _ = site
    made = chain(wm, "deep", "d1", "d2", "d3", "d4", "d5", "d6")
    with sync_playwright() as playwright:
        browser, page, watch = admin_on(playwright, url, "/vms/deep")
        row = page.locator(f'[data-ckpt="{made["d1"]}"] > .row')
        subtree = page.locator(f'[data-ckpt="{made["d1"]}"]').bounding_box()
        box = row.bounding_box()
        assert subtree["height"] > 5 * box["height"]  # the item holds the whole chain
        menu = page.get_by_role("menu")

        def menu_top_in_row() -> None:
            top = menu.bounding_box()["y"]
            assert box["y"] <= top <= box["y"] + box["height"], (top, box)

        row.locator(".label").click(button="right")
        menu_top_in_row()
        page.keyboard.press("Escape")
        assert page.evaluate("document.activeElement.dataset.ckpt") == made["d1"]
        row.get_by_role("button", name="Actions for d1").click()
        menu_top_in_row()
        page.keyboard.press("Escape")
        page.keyboard.press("Shift+F10")
        menu_top_in_row()
        assert page.evaluate("document.activeElement.getAttribute('role')") == "menuitem"
        page.keyboard.press("Escape")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "vm-page-tree.png"), full_page=True)
        finish(browser, watch)


def test_apply_asks_and_does_what_was_chosen(site: tuple[Waymark, str, Path]) -> None:
    """Apply's three buttons (focus on Cancel, Apply red): Cancel and Escape change nothing;
    "Apply" applies without a safety checkpoint; Now is marked and its checkpoint highlighted."""
    from playwright.sync_api import expect, sync_playwright

    wm, url, _ = site
    made = chain(wm, "applied", "a1", "a2")
    before = wm.json("checkpoint", "list", "applied")
    with sync_playwright() as playwright:
        browser, page, watch = admin_on(playwright, url, "/vms/applied")
        current = page.locator('[role="treeitem"][aria-current="true"]')
        expect(current).to_have_attribute("data-ckpt", made["a2"])
        expect(page.locator('[data-now] .now-icon')).to_be_visible()
        for escape in (False, True):
            menu_action(page, made["a1"], "Apply…")
            dialog = confirmation(page, "Apply Checkpoint")
            assert dialog.get_by_role("button").all_inner_texts() == [
                "Create Checkpoint and Apply", "Apply", "Cancel"]
            expect(dialog).to_contain_text('"a1"')
            expect(dialog).to_contain_text('Now: the VM\'s current state, changed since "a2"')
            cancel(page, dialog, escape)
            assert wm.json("checkpoint", "list", "applied") == before
        menu_action(page, made["a1"], "Apply…")
        reloaded(page, confirmation(page, "Apply Checkpoint").get_by_role(
            "button", name="Apply", exact=True).click)
        after = wm.json("checkpoint", "list", "applied")
        assert after["current_checkpoint_id"] == made["a1"]
        assert ids(wm, "applied") == made  # no safety checkpoint: "Apply" discards Now
        assert tree_rows(page) == [(1, "a1"), (2, "a2"), (2, "Now")]
        expect(current).to_have_attribute("data-ckpt", made["a1"])
        finish(browser, watch)


def test_a_delete_keeps_the_children_and_now_until_the_tree_is_redrawn(
        site: tuple[Waymark, str, Path]) -> None:
    """Delete (a checkpoint in the middle): Cancel changes nothing; confirmed, the row says
    "Deleting…" while its children and Now stay in place (the job stream is held here: a merge
    that takes its time), then the tree and the space chart are redrawn from the server, with
    no reload, and the checkpoint is gone from the catalog alone."""
    from playwright.sync_api import expect, sync_playwright

    wm, url, _ = site
    made = chain(wm, "trunk", "t1", "t2", "t3")
    before = wm.json("checkpoint", "list", "trunk")
    with sync_playwright() as playwright:
        browser, page, watch = admin_on(playwright, url, "/vms/trunk")
        page.evaluate("window.notReloaded = true")
        menu_action(page, made["t2"], "Delete Checkpoint…")
        dialog = confirmation(page, "Delete Checkpoint")
        expect(dialog).to_contain_text("Its children and Now stay")
        expect(dialog.locator("ul.lost li")).to_have_count(1)
        expect(dialog.locator("ul.lost li")).to_contain_text("t2")
        cancel(page, dialog)
        assert wm.json("checkpoint", "list", "trunk") == before

        held: list[Any] = []

        def hold(route: Any) -> None:  # the job stream waits: a merge that takes its time
            held.append(route)

        page.route("**/api/jobs/events*", hold)
        menu_action(page, made["t2"], "Delete Checkpoint…")
        confirmation(page, "Delete Checkpoint").get_by_role("button", name="Delete").click()
        doomed = page.locator(f'[data-ckpt="{made["t2"]}"]')
        expect(doomed.locator(":scope > .row")).to_contain_text("Deleting…")
        expect(doomed).to_have_attribute("aria-disabled", "true")
        expect(doomed.get_by_role("button", name="Actions for t2")).to_have_count(0)
        assert tree_rows(page) == [(1, "t1"), (2, "t2"), (3, "t3"), (4, "Now")]
        expect(page.get_by_text("Now", exact=True)).to_be_visible()
        expect(page.locator(f'[data-ckpt="{made["t3"]}"]')).to_be_visible()
        assert set(ids(wm, "trunk")) == {"t1", "t3"}  # it left the catalog at once

        for route in list(held):  # the merge's news reaches the page now
            route.continue_()
        page.unroute("**/api/jobs/events*")
        expect(page.locator("#vm")).to_have_attribute("data-redrawn", "1")
        assert tree_rows(page) == [(1, "t1"), (2, "t3"), (3, "Now")]
        rows = page.locator("section.space tbody th[scope=row]").all_inner_texts()
        assert [r.strip() for r in rows] == ["t1", "t3", "➤ Now"]
        assert page.evaluate("window.notReloaded") is True
        # the deleted checkpoint had the focus: Now has it (the keyboard goes on in the tree)
        assert page.evaluate("document.activeElement.dataset.now") == "1"
        expect(page.locator("body")).to_have_attribute("data-streaming", "0")
        menu_action(page, made["t3"], "Rename…")  # the redrawn tree still has its menus
        page.keyboard.press("Escape")
        finish(browser, watch)
    assert wm.run("check").returncode == 0


def test_delete_subtree_lists_what_goes(site: tuple[Waymark, str, Path]) -> None:
    """Delete Checkpoint Subtree is titled so, lists each checkpoint it removes with its
    space and the total freed, says where Now goes when it is below; Cancel changes nothing;
    confirmed, exactly those checkpoints go."""
    from playwright.sync_api import expect, sync_playwright

    wm, url, _ = site
    chain(wm, "forest", "root", "left", "leaf")
    wm("checkpoint", "apply", "forest", "root", "--discard-current")
    wm("checkpoint", "create", "forest", "--name", "right")  # root > left > leaf; root > right
    made = ids(wm, "forest")
    before = wm.json("checkpoint", "list", "forest")
    with sync_playwright() as playwright:
        browser, page, watch = admin_on(playwright, url, "/vms/forest")
        menu_action(page, made["right"], "Delete Checkpoint Subtree…")
        dialog = confirmation(page, "Delete Checkpoint Subtree")
        expect(dialog).to_contain_text('Now stays: it moves under "root"')
        cancel(page, dialog)

        menu_action(page, made["left"], "Delete Checkpoint Subtree…")
        dialog = confirmation(page, "Delete Checkpoint Subtree")
        expect(dialog).to_contain_text(re.compile(r"removes 2 checkpoints and frees about \d"))
        lost = [t.split(" (")[0] for t in dialog.locator("ul.lost li").all_inner_texts()]
        assert lost == ["left", "leaf"]
        page.screenshot(path=str(ARTIFACTS / "delete-subtree-dialog.png"))
        cancel(page, dialog)
        assert wm.json("checkpoint", "list", "forest") == before

        menu_action(page, made["left"], "Delete Checkpoint Subtree…")
        confirmation(page, "Delete Checkpoint Subtree").get_by_role(
            "button", name="Delete Subtree").click()
        expect(page.locator("#vm")).to_have_attribute("data-redrawn", "1", timeout=30000)
        assert set(ids(wm, "forest")) == {"root", "right"}
        assert tree_rows(page) == [(1, "root"), (2, "right"), (3, "Now")]
        finish(browser, watch)


def test_restore_into_the_vm_asks_first(site: tuple[Waymark, str, Path]) -> None:
    """Both in-place restores ask (naming Now as lost, or kept in a checkpoint first); Cancel
    restores nothing; each confirmed mode does what it said: "Now is lost" adds only the
    restored checkpoint, "checkpoint Now first" a checkpoint of Now too. A restore as a new VM
    loses nothing and asks nothing."""
    from playwright.sync_api import expect, sync_playwright

    wm, url, _ = site
    chain(wm, "restored", "r1")
    [point] = [o["point"] for o in wm.json("backup", "run", "restored", "--repo",
                                          str(site[2] / "usb"))]
    wm("checkpoint", "create", "restored", "--name", "r2")
    with sync_playwright() as playwright:
        browser, page, watch = admin_on(playwright, url, "/vms/restored")
        page.get_by_role("tab", name="Backups", exact=True).click()  # kept across reloads
        for mode, action, added in (("discard_current", "Restore (Now is lost)", 1),
                                    ("checkpoint_first", "Checkpoint and Restore", 2)):
            before = wm.json("checkpoint", "list", "restored")
            page.get_by_label("Restore", exact=True).select_option(mode)
            page.get_by_role("button", name="Restore", exact=True).click()
            dialog = confirmation(page, "Restore into restored")
            assert dialog.locator("button.danger").inner_text() == action
            assert point["created_at"] not in dialog.inner_text()  # a local time instead
            expect(dialog).to_contain_text(f"backup point of {local_of(page, point)}")
            cancel(page, dialog)
            assert wm.json("checkpoint", "list", "restored") == before
            page.get_by_role("button", name="Restore", exact=True).click()
            reloaded(page, confirmation(page, "Restore into restored").get_by_role(
                "button", name=action).click)
            after = wm.json("checkpoint", "list", "restored")
            new = [c["name"] for c in after["checkpoints"]
                   if c["id"] not in {b["id"] for b in before["checkpoints"]}]
            assert len(new) == added, new
            assert any(n.startswith("Restored from") for n in new), new
        before = wm.json("checkpoint", "list", "restored")
        page.get_by_label("Restore", exact=True).select_option("as_new")  # loses nothing:
        page.get_by_label("New VM name").fill("restored-copy")  # no dialog
        reloaded(page, page.get_by_role("button", name="Restore", exact=True).click)
        assert wm.json("vm", "show", "restored-copy")["name"] == "restored-copy"
        assert wm.json("checkpoint", "list", "restored") == before
        finish(browser, watch)


def local_of(page: Any, point: dict[str, Any]) -> str:
    """The point's time as the page's script shows it (localTime)."""
    return str(page.evaluate("(iso) => localTime(iso)", point["created_at"]))


def test_prune_shows_what_it_would_remove_first(site: tuple[Waymark, str, Path]) -> None:
    """Prune sends a dry run first and lists the points it would remove; Cancel removes
    nothing; confirmed, exactly the listed point goes (not one the rules would remove only
    since the preview); rules that keep every point say so."""
    from playwright.sync_api import expect, sync_playwright

    wm, url, repos = site
    chain(wm, "pruned")
    for _ in range(2):
        wm("backup", "run", "pruned", "--repo", str(repos / "pruning"), "--full")
    points = wm.json("backup", "list", "pruned", "--repo", str(repos / "pruning"))
    older, newer = sorted(points, key=lambda p: p["created_at"])
    with sync_playwright() as playwright:
        browser, page, watch = admin_on(playwright, url, "/backups")
        form = page.get_by_role("form", name="Prune")
        form.get_by_label("Repository").select_option("pruning")
        form.get_by_label("Keep last").fill("5")
        form.get_by_role("button", name="Preview prune…").click()
        expect(page.locator("#notice")).to_have_text(
            "Nothing to prune: the keep rules keep every point.")
        form.get_by_label("Keep last").fill("1")
        form.get_by_role("button", name="Preview prune…").click()
        dialog = confirmation(page, "Prune Backup Points")
        expect(dialog.locator("ul.lost li")).to_have_count(1)
        expect(dialog.locator("ul.lost li")).to_contain_text("pruned: full point of")
        cancel(page, dialog)
        listed = wm.json("backup", "list", "pruned", "--repo", str(repos / "pruning"))
        assert {p["id"] for p in listed} == {older["id"], newer["id"]}
        form.get_by_role("button", name="Preview prune…").click()
        dialog = confirmation(page, "Prune Backup Points")
        # a point made while the dialog is open: the rules would now remove two points, but
        # confirming removes the one the dialog named, no other
        [newest] = [o["point"] for o in wm.json("backup", "run", "pruned", "--repo",
                                                 str(repos / "pruning"), "--full")]
        reloaded(page, dialog.get_by_role("button", name="Prune").click)
        listed = wm.json("backup", "list", "pruned", "--repo", str(repos / "pruning"))
        assert {p["id"] for p in listed} == {newer["id"], newest["id"]}
        finish(browser, watch)


def test_a_vm_is_deleted_only_after_its_dialog(site: tuple[Waymark, str, Path]) -> None:
    """Delete VM names the checkpoints and disks that go; Cancel keeps the VM; confirmed, the
    VM is gone and the portal is back at the VM list."""
    from playwright.sync_api import expect, sync_playwright

    wm, url, _ = site
    chain(wm, "doomed", "k1", "k2")
    with sync_playwright() as playwright:
        browser, page, watch = admin_on(playwright, url, "/vms/doomed")
        page.get_by_role("button", name="Delete VM…").click()
        dialog = confirmation(page, "Delete VM")
        lost = dialog.locator("ul.lost li").all_inner_texts()
        assert lost[:2] == ["Checkpoint k1", "Checkpoint k2"]
        assert re.fullmatch(r"Disk 1: 16\.0 MiB, 3 layer\(s\), .+ of its own", lost[2]), lost
        cancel(page, dialog)
        assert wm.json("vm", "show", "doomed")["name"] == "doomed"
        page.get_by_role("button", name="Delete VM…").click()
        with page.expect_navigation(url=f"{url}/vms"):
            confirmation(page, "Delete VM").get_by_role("button", name="Delete VM").click()
        expect(page.get_by_role("link", name="doomed")).to_have_count(0)
        assert "doomed" not in [v["name"] for v in wm.json("vm", "list")]
        finish(browser, watch)


def test_a_user_and_a_token_are_removed_only_after_their_dialogs(
        site: tuple[Waymark, str, Path]) -> None:
    """On /admin: Remove (a user) lists their grants and tokens, Revoke names the token;
    Cancel keeps them; confirmed, each goes and nothing else."""
    from playwright.sync_api import expect, sync_playwright

    wm, url, _ = site
    wm.run("user", "add", "leaver", "--role", "self-service", "--password-stdin",
           input="leaver-pass\n").ok()
    chain(wm, "granted")
    wm("user", "grant", "leaver", "--vm", "granted", "--permission", "start-stop")
    wm("token", "create", "laptop", "--user", "leaver")
    wm("token", "create", "ci", "--user", ADMIN)
    users = lambda: {u["name"] for u in wm.json("user", "list")}  # noqa: E731
    tokens = lambda: {t["name"] for t in wm.json("token", "list")}  # noqa: E731
    with sync_playwright() as playwright:
        browser, page, watch = admin_on(playwright, url, "/admin")
        revoke = page.get_by_role("row").filter(has_text="ci").get_by_role("button")
        revoke.click()
        dialog = confirmation(page, "Revoke API Token")
        expect(dialog.locator("ul.lost li")).to_contain_text("API token ci")
        cancel(page, dialog)
        assert "ci" in tokens()
        revoke.click()
        reloaded(page, confirmation(page, "Revoke API Token").get_by_role(
            "button", name="Revoke ci").click)
        assert "ci" not in tokens() and "laptop" in tokens()

        page.get_by_role("table", name="Users").get_by_role("row").filter(
            has_text="leaver").get_by_role("button", name="Remove").click()
        dialog = confirmation(page, "Remove User")
        assert dialog.locator("ul.lost li").all_inner_texts() == [
            "Grant: vm granted: start-stop", f"API token laptop ({tokens_of(wm, 'leaver')})"]
        cancel(page, dialog, escape=True)
        assert "leaver" in users()
        page.get_by_role("table", name="Users").get_by_role("row").filter(
            has_text="leaver").get_by_role("button", name="Remove").click()
        reloaded(page, confirmation(page, "Remove User").get_by_role(
            "button", name="Remove leaver").click)
        assert "leaver" not in users() and ADMIN in users()
        finish(browser, watch)


def tokens_of(wm: Waymark, user: str) -> str:
    [token] = wm.json("token", "list", "--user", user)
    return str(token["id"])


def test_times_are_local_with_the_iso_form_on_hover(site: tuple[Waymark, str, Path]) -> None:
    """A checkpoint's time shows in the browser's time zone (here UTC+05:30), its ISO form
    (UTC, as stored) as the title."""
    from playwright.sync_api import sync_playwright

    wm, url, _ = site
    chain(wm, "clock", "tick")
    [made] = wm.json("checkpoint", "list", "clock")["checkpoints"]
    local = datetime.fromisoformat(made["created_at"]).astimezone(ZoneInfo(ZONE))
    with sync_playwright() as playwright:
        browser, page, watch = admin_on(playwright, url, "/vms/clock", timezone_id=ZONE,
                                        locale="en-GB")
        shown = page.locator(f'[data-ckpt="{made["id"]}"] time')
        assert shown.get_attribute("title") == made["created_at"]
        assert shown.get_attribute("datetime") == made["created_at"]
        text = shown.inner_text()
        assert local.strftime("%H:%M:%S") in text and str(local.year) in text, text
        finish(browser, watch)


def test_the_tree_menu_and_a_dialog_work_by_keyboard_alone(
        site: tuple[Waymark, str, Path]) -> None:
    """Arrows move in the tree, Shift+F10 opens the menu, arrows and Enter choose Delete; the
    dialog holds the focus (Tab stays in it, on Cancel first); Escape closes it with nothing
    done and the focus back in the tree."""
    from playwright.sync_api import expect, sync_playwright

    wm, url, _ = site
    made = chain(wm, "keys", "k1", "k2")
    before = wm.json("checkpoint", "list", "keys")
    with sync_playwright() as playwright:
        browser, page, watch = admin_on(playwright, url, "/vms/keys")
        page.locator(f'[data-ckpt="{made["k1"]}"]').focus()
        page.keyboard.press("ArrowDown")
        assert page.evaluate("document.activeElement.dataset.ckpt") == made["k2"]
        page.keyboard.press("Shift+F10")
        expect(page.get_by_role("menu")).to_be_visible()
        entries = page.get_by_role("menuitem").all_inner_texts()  # Settings first (Hyper-V's order)
        for _ in range(entries.index("Delete Checkpoint…")):
            page.keyboard.press("ArrowDown")
        assert page.evaluate("document.activeElement.textContent") == "Delete Checkpoint…"
        page.keyboard.press("Enter")
        dialog = confirmation(page, "Delete Checkpoint")
        for _ in range(3):  # the page behind the modal dialog is inert: never focused
            page.keyboard.press("Tab")
            assert page.evaluate("!document.getElementById('vm').contains(document.activeElement)")
        page.keyboard.press("Escape")
        expect(dialog).to_have_count(0)
        assert page.evaluate("document.activeElement.dataset.ckpt") == made["k2"]
        assert wm.json("checkpoint", "list", "keys") == before
        finish(browser, watch)


def test_a_vm_without_checkpoints_says_so(site: tuple[Waymark, str, Path]) -> None:
    """No checkpoints: the tree holds Now alone, the space chart says how to take one and what
    Now's disks hold, not an empty table."""
    from playwright.sync_api import expect, sync_playwright

    wm, url, _ = site
    chain(wm, "fresh")
    with sync_playwright() as playwright:
        browser, page, watch = admin_on(playwright, url, "/vms/fresh")
        assert tree_rows(page) == [(1, "Now")]
        space = page.locator("section.space")
        expect(space.get_by_role("table")).to_have_count(0)
        text = " ".join(space.locator("p.empty").inner_text().split())
        assert re.fullmatch(r"No checkpoints yet: take one with the Checkpoint button above .* "
                            r"beside Now's \(now [0-9.]+ \w+ on its disks\)\..*", text), text
        finish(browser, watch)
