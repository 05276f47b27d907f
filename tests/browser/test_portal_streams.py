"""The portal's live job status in a real browser against a ``waymark serve`` whose event
streams live 2 s (``--stream-lifetime 2``): the page's stream reconnects by itself after each
``expired`` and keeps showing the job; once the session is signed out (elsewhere), the stream
stops (``revoked``, or its reconnection refused) and the page says it no longer streams.

The job is a queued export of the VM that this test process "runs" (no worker adopts it), so
it stays unfinished and the page follows it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.browser.test_portal import Watch, browser_page, sign_in
from tests.helpers import Waymark, serve_process
from waymark.config import Settings
from waymark.engine import jobs
from waymark.usecases.access import users
from waymark.wiring import open_context

ADMIN, PASSWORD = "root-admin", "test-password"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    base = tmp_path_factory.mktemp("portal-streams")
    wm = Waymark(base / "home")
    wm("vm", "create", "web", "--disk", "1M")
    ctx = open_context(Settings(home=wm.home))
    users.add(ctx, ADMIN, "administrator", PASSWORD)
    vm_id = wm.json("vm", "show", "web")["id"]
    jobs.submit(ctx, vm_id, "export", {"vm_id": vm_id, "checkpoint_id": "none",
                                       "dest": str(base / "never")}, run_here=True,
                user="tests")
    with serve_process(wm, options=("--stream-lifetime", "2")) as url:
        yield url, vm_id


def test_the_page_reconnects_after_expiry_and_stops_when_signed_out(
        site: tuple[str, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, vm_id = site
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        watch = Watch(page)
        watch.allowed.add(f"{url}/api/jobs/events?until_idle=true")  # refused once signed out
        streams: list[Any] = []
        page.on("request", lambda r: "/api/jobs/events" in r.url and streams.append(r))
        sign_in(page, url, ADMIN, PASSWORD)
        status = page.locator(f'[data-vm-status="{vm_id}"]')
        expect(status).to_have_attribute("data-job-status", "queued")
        deadline = time.monotonic() + 30
        while len(streams) < 3 and time.monotonic() < deadline:  # two expiries, reconnected
            page.wait_for_timeout(250)
        assert len(streams) >= 3, streams
        expect(page.locator("body")).to_have_attribute("data-streaming", "1")
        expect(status).to_have_attribute("data-job-status", "queued")

        cookies = {c["name"]: c["value"] for c in page.context.cookies()}
        csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
        assert httpx.post(f"{url}/api/auth/logout", cookies=cookies,
                          headers={"X-CSRF-Token": csrf or ""}).status_code == 200
        expect(page.locator("body")).to_have_attribute("data-streaming", "0", timeout=20000)
        browser.close()
    assert [p for p in watch.problems if "/api/jobs/events" not in p] == [], watch.problems
