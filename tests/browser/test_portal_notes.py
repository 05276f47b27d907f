"""A checkpoint's notes in the portal, in a real browser (Playwright, Debian's Chromium, a real
``waymark serve``), round-trip with the CLI and the API:

- notes written by the CLI (with HTML in them) show in the tree as their first line, as text
  (no element made of them), the whole notes as the row's title;
- "Edit Notes…" in the checkpoint menu opens a dialog holding the server's notes; notes typed
  there (several lines, HTML) are what the CLI and the API then read, and the tree shows their
  first line without a reload; notes the CLI changes afterwards are what the page shows;
- notes with a control character are refused in the dialog (it stays open, naming the
  character and what to do), Cancel changes nothing; an empty text clears them;
- keyboard only: Shift+F10 on a tree item, the arrows to "Edit Notes…", Enter, type, Ctrl+Enter;
- no console errors and no failed requests but that refusal; a screenshot of the dialog in
  test-artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.browser.test_portal import (
    ADMIN,
    ADMIN_PASSWORD,
    ARTIFACTS,
    Watch,
    browser_page,
    menu_action,
    sign_in,
)
from tests.helpers import Waymark, served

FROM_CLI = 'Written by the CLI <img src=x onerror="document.title=1"> & "quotes"\nline two'
TYPED = "Written in the portal\n\tline two <script>document.title='x'</script>"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Waymark, str, str, str]]:
    wm = Waymark(tmp_path_factory.mktemp("portal-notes") / "home")
    wm("vm", "create", "web", "--disk", "1M")
    ckpt_id = wm.json("checkpoint", "create", "web", "--name", "base", "--notes", FROM_CLI)["id"]
    with served(wm) as (url, token):
        yield wm, url, token, ckpt_id


@dataclass
class Round:
    """One signed-in page of VM ``web`` and the checkpoint whose notes go round."""

    wm: Waymark
    api: httpx.Client
    page: Any
    watch: Watch
    ckpt_id: str
    url: str

    @property
    def item(self) -> str:
        return f'[role="treeitem"][data-ckpt="{self.ckpt_id}"]'

    @property
    def shown(self) -> Any:
        return self.page.locator(f"{self.item} > .notes")

    @property
    def dialog(self) -> Any:
        return self.page.get_by_role("dialog", name="Notes of base")

    @property
    def notes(self) -> Any:
        return self.dialog.get_by_label("Notes")

    def cli(self) -> Any:
        return self.wm.json("checkpoint", "show", "web", "base")["notes"]

    def api_notes(self) -> Any:
        return self.api.get(f"/vms/web/checkpoints/{self.ckpt_id}").json()["notes"]


def test_notes_round_trip_between_the_portal_the_cli_and_the_api(
        site: tuple[Waymark, str, str, str]) -> None:
    from playwright.sync_api import sync_playwright

    wm, url, token, ckpt_id = site
    with sync_playwright() as playwright, httpx.Client(
            base_url=f"{url}/api", headers={"Authorization": f"Bearer {token}"}) as api:
        browser, page = browser_page(playwright)
        watch = Watch(page)
        sign_in(page, url, ADMIN, ADMIN_PASSWORD)
        page.goto(f"{url}/vms/web")
        done = Round(wm, api, page, watch, ckpt_id, url)
        for step in (cli_notes_show_as_text, typed_notes_reach_the_cli_and_the_api,
                     hostile_notes_are_refused_in_the_dialog, the_keyboard_edits_notes,
                     empty_notes_clear_them):
            step(done)
        browser.close()
    assert watch.problems == [], watch.problems


def cli_notes_show_as_text(done: Round) -> None:
    from playwright.sync_api import expect

    expect(done.shown).to_have_text('Written by the CLI <img src=x onerror="document.title=1"> '
                                    '& "quotes" …')
    assert done.shown.get_attribute("title") == FROM_CLI
    expect(done.page.locator(f"{done.item} img")).to_have_count(0)


def typed_notes_reach_the_cli_and_the_api(done: Round) -> None:
    from playwright.sync_api import expect

    menu_action(done.page, done.ckpt_id, "Edit Notes…")
    expect(done.notes).to_have_value(FROM_CLI)
    expect(done.notes).to_be_focused()
    done.notes.fill(TYPED)
    ARTIFACTS.mkdir(exist_ok=True)
    done.page.screenshot(path=str(ARTIFACTS / "checkpoint-notes-dialog.png"))
    done.dialog.get_by_role("button", name="Save").click()
    expect(done.dialog).to_be_hidden()
    expect(done.shown).to_have_text("Written in the portal …")  # no reload
    assert done.shown.get_attribute("title") == TYPED
    assert done.cli() == TYPED and done.api_notes() == TYPED
    assert done.page.title() != "x"
    expect(done.page.locator(f"{done.item} script")).to_have_count(0)

    done.wm("checkpoint", "notes", "web", "base", "Changed by the CLI")
    done.page.reload()
    expect(done.shown).to_have_text("Changed by the CLI")


def hostile_notes_are_refused_in_the_dialog(done: Round) -> None:
    from playwright.sync_api import expect

    menu_action(done.page, done.ckpt_id, "Edit Notes…")
    expect(done.notes).to_have_value("Changed by the CLI")
    done.watch.allowed.add(f"{done.url}/api/vms/web/checkpoints/{done.ckpt_id}")  # a 400 here
    done.notes.fill("bad \x1b[2J")
    done.dialog.get_by_role("button", name="Save").click()
    alert = done.dialog.get_by_role("alert")
    expect(alert).to_contain_text("U+001B")
    expect(alert).to_contain_text("Write printable text")
    expect(done.dialog).to_be_visible()
    done.dialog.get_by_role("button", name="Cancel").click()
    expect(done.dialog).to_be_hidden()
    assert done.cli() == "Changed by the CLI"


def the_keyboard_edits_notes(done: Round) -> None:
    from playwright.sync_api import expect

    page = done.page
    page.locator(f"{done.item} > .row .label").click()
    page.keyboard.press("Shift+F10")
    expect(page.get_by_role("menu", name="Checkpoint actions")).to_be_visible()
    while page.evaluate("document.activeElement.textContent") != "Edit Notes…":
        page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    expect(done.notes).to_be_focused()
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type("Typed with the keyboard")
    page.keyboard.press("Enter")
    page.keyboard.type("second line")
    page.keyboard.press("Control+Enter")
    expect(done.dialog).to_be_hidden()
    expect(done.shown).to_have_text("Typed with the keyboard …")
    assert done.api_notes() == "Typed with the keyboard\nsecond line"


def empty_notes_clear_them(done: Round) -> None:
    from playwright.sync_api import expect

    menu_action(done.page, done.ckpt_id, "Edit Notes…")
    done.notes.fill("")
    done.dialog.get_by_role("button", name="Save").click()
    expect(done.shown).to_have_count(0)
    assert done.cli() is None
    expect(done.page.locator("#notice")).to_have_text("Cleared the notes of base.")
