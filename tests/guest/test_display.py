"""The graphical console end to end (VMConnect in the browser), with ONE booted test guest:
Playwright driving Debian's Chromium against ``waymark serve``.

The guest's screen (tty1 on the standard VGA) says ``WAYMARK SCREEN <boot-id>`` and echoes
each line typed there to the serial port as ``TYPED <line>`` (waymark.testguest.scripts).
Checked: QEMU's VNC server listens on the Unix socket ``vm console --vnc`` names, not on TCP;
``vm screenshot`` writes a PNG of a screen that is not blank (text on a background, the text
at the top where the guest wrote it); the portal's Screen page connects (its canvas is drawn),
keys typed on the page's keyboard and with "Type clipboard text" reach the guest (its serial
log), the screenshot after typing shows the echoed line; Ctrl+Alt+Del reaches the guest's
kernel (its init says so), Full screen shows the screen alone;
when the VM stops the page says it was disconnected. No console errors and no failed
requests. The page is saved under test-artifacts/.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.browser.test_portal import (
    ADMIN,
    ADMIN_PASSWORD,
    ARTIFACTS,
    Watch,
    browser_page,
    sign_in,
)
from tests.guest.guests import Guest, create, wait_for
from tests.guest.screens import lit_rows, png_pixels
from tests.helpers import Waymark, served


def screenshot(wm: Waymark, vm: str, dest: Path) -> tuple[int, int, list[int]]:
    """``vm screenshot``: (width, height, rows with text) of the PNG it wrote. (In a process of
    its own: Playwright's event loop runs in this one.)"""
    done = wm.run("vm", "screenshot", vm, str(dest), "--json", separate=True).ok().json()
    assert done["file"] == str(dest) and dest.stat().st_size == done["bytes"]
    width, height, rows = png_pixels(dest.read_bytes())
    return width, height, lit_rows(rows)


def test_the_screen_in_the_portal_shows_the_guest_and_types_into_it(
        home: Waymark, image: dict[str, str], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    wm = home
    vm = create(wm, "screen", image)
    mark = vm.boot()
    vnc_listens_on_its_unix_socket_only(wm, vm)
    width, height, lit = wait_for("the banner on the screen", lambda: _banner(wm, tmp_path), 60)
    assert (width, height) == (720, 400), "the VGA text mode"
    assert lit and max(lit) < height // 4, f"text only at the top of a blank screen: {lit}"
    with served(wm) as (url, _), sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        watch = Watch(page)
        sign_in(page, url, ADMIN, ADMIN_PASSWORD)
        page.locator('tr:has(a:text-is("screen")) >> role=link[name="Screen"]').click()
        page.wait_for_url(f"{url}/vms/screen/display")
        expect(page.locator("#display")).to_have_attribute("data-connected", "1", timeout=30000)
        page.wait_for_function(CANVAS_DRAWN, timeout=30000)
        _, _, same_moment = screenshot(wm, "screen", tmp_path / "same.png")
        assert same_moment and max(same_moment) < height // 4
        page.locator("#display-screen canvas").click()
        page.keyboard.type("hello 42")
        page.keyboard.press("Enter")
        wait_for("the typed line in the serial log",
                 lambda: "TYPED hello 42" in vm.since(mark), 30)
        page.get_by_label("Text to type").fill("pasted 7\n")
        page.get_by_role("button", name="Type clipboard text").click()
        wait_for("the pasted line in the serial log",
                 lambda: "TYPED pasted 7" in vm.since(mark), 30)
        expect(page.get_by_role("status").last).to_contain_text("Typed 9 characters")
        _, _, after = screenshot(wm, "screen", tmp_path / "after.png")
        assert max(after) > max(lit), "the echoed lines are on the screen below the banner"
        page.get_by_role("button", name="Ctrl+Alt+Del").click()
        wait_for("Ctrl+Alt+Del in the guest", lambda: "CTRL-ALT-DEL" in vm.since(mark), 30)
        page.get_by_role("button", name="Full screen").click()
        page.wait_for_function("() => document.fullscreenElement?.id === 'display-screen'")
        page.evaluate("() => document.exitFullscreen()")  # (Esc: the browser's, not the page's)
        page.screenshot(path=str(_artifact("portal-display.png")))
        wm.run("vm", "stop", vm.name, "--force", separate=True).ok()
        expect(page.locator("#display-status")).to_contain_text("Disconnected", timeout=30000)
        browser.close()
        assert watch.problems == [], "\n".join(watch.problems)


CANVAS_DRAWN = """() => {
  const canvas = document.querySelector('#display-screen canvas');
  if (!canvas || canvas.width < 100) return false;
  const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const seen = new Set();
  for (let i = 0; i < pixels.length; i += 4) {
    seen.add((pixels[i] << 16) | (pixels[i + 1] << 8) | pixels[i + 2]);
    if (seen.size > 1) return true;
  }
  return false;
}"""


def vnc_listens_on_its_unix_socket_only(wm: Waymark, vm: Guest) -> None:
    """``vm console --vnc`` names the socket; QEMU says its VNC server is that Unix socket."""
    told = wm.json("vm", "console", "--vnc", vm.name)
    socket_path = Path(told["vnc_socket"])
    assert socket_path == vm.run_dir / "display" / "vnc.sock" and socket_path.is_socket()
    shown = wm.run("vm", "console", "--vnc", vm.name).ok().stdout
    assert str(socket_path) in shown and "ssh -L" in shown
    vnc = vm.qmp_command("query-vnc")
    assert (vnc["enabled"], vnc["family"]) == (True, "unix"), vnc
    assert vnc["service"].endswith("/vnc.sock"), vnc
    pid = vm.status()["pid"]
    assert tcp_listeners(pid) == [], "QEMU listens on TCP"


def tcp_listeners(pid: int) -> list[str]:
    """The TCP sockets process ``pid`` listens on (its descriptors' socket inodes in the
    LISTEN state of /proc/net/tcp and tcp6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(f"{table} {fields[1]}")
    return found


def _banner(wm: Waymark, folder: Path) -> tuple[int, int, list[int]] | None:
    """The first screenshot with text on it (the guest's banner, two lines at the top)."""
    width, height, lit = screenshot(wm, "screen", folder / "before.png")
    return (width, height, lit) if lit else None


def _artifact(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name
