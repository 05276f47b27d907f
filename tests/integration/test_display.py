"""The graphical console without a guest: the refusals of ``vm screenshot`` and
``vm console --vnc`` (a VM that is off), and of the display WebSocket against a real
``waymark serve`` (no ``start-stop``: 403; another site's page: 403; a VM that is off: 409),
each in the audit log; the portal's console page without noVNC says what to install.
(The console working end to end, with a booted guest: tests/guest/test_display.py; its
command line: tests/unit/test_cmdline.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.helpers import Waymark, served

USER, PASSWORD = "viewer", "viewer-password-1"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Waymark, str, str]]:
    wm = Waymark(tmp_path_factory.mktemp("display") / "home")
    wm("vm", "create", "box", "--disk", "4M")
    wm.run("user", "add", USER, "--role", "self-service", "--password-stdin",
           input=f"{PASSWORD}\n").ok()
    wm("user", "grant", USER, "--vm", "box", "--permission", "checkpoint-restore-only")
    with served(wm) as (url, token):
        yield wm, url, token


def test_screenshot_of_a_vm_that_is_off_is_a_clear_error(tmp_path: Any, site: Any) -> None:
    wm, _, _ = site
    target = tmp_path / "screen.png"
    result = wm.run("vm", "screenshot", "box", str(target))
    assert result.returncode == 5, result.stderr  # Conflict
    assert "is not running (off)" in result.stderr
    assert "waymark vm start box" in result.stderr
    assert not target.exists()
    vnc = wm.run("vm", "console", "--vnc", "box")
    assert vnc.returncode == 5 and "is not running" in vnc.stderr
    missing = wm.run("vm", "screenshot", "nosuch", str(target))
    assert missing.returncode == 3 and "nosuch" in missing.stderr


def _websocket(url: str, **headers: str) -> Any:
    address = url.replace("http://", "ws://") + "/api/vms/box/display"
    origin = headers.pop("Origin", None)
    return connect(address, additional_headers=headers, origin=origin,  # type: ignore[arg-type]
                   open_timeout=20)


def _refused(url: str, **headers: str) -> int:
    with pytest.raises(InvalidStatus) as refusal:
        _websocket(url, **headers).close()
    return int(refusal.value.response.status_code)


def _session(url: str, name: str, password: str) -> str:
    with httpx.Client(base_url=url) as http:
        resp = http.post("/api/auth/login", json={"name": name, "password": password})
        assert resp.status_code == 200, resp.text
        return str(resp.cookies["waymark_session"])


def _audit(url: str, token: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
        resp = http.get("/api/audit", params={"limit": 10})
    assert resp.status_code == 200, resp.text
    return [e for e in resp.json() if e["action"] == "WS /api/vms/{vm}/display"]


def test_the_display_websocket_refuses_before_it_opens(site: Any) -> None:
    _, url, token = site
    viewer = _session(url, USER, PASSWORD)
    own_origin = url
    # no start-stop permission on the VM (the serial console's rule): 403, audited as denied
    assert _refused(url, Cookie=f"waymark_session={viewer}", Origin=own_origin) == 403
    entry = _audit(url, token)[0]
    assert (entry["user_name"], entry["outcome"], entry["status"]) == (USER, "denied", 403)
    assert entry["target"] == {"vm": "box"} and "vm.power" in entry["message"]
    # an administrator's cookie, sent by a page of another site (cross-site WebSocket
    # hijacking): 403, whatever the permission
    admin = _session(url, "root-admin", "test-password")
    assert _refused(url, Cookie=f"waymark_session={admin}", Origin="http://evil.example") == 403
    entry = _audit(url, token)[0]
    assert (entry["user_name"], entry["outcome"]) == ("root-admin", "denied")
    assert "another site" in entry["message"]
    # the cookie without an Origin (not a browser): refused too; a token may leave it out
    assert _refused(url, Cookie=f"waymark_session={admin}") == 403
    # nobody signed in: 401
    assert _refused(url, Origin=own_origin) == 401
    # allowed, but the VM is off: 409 with the hint
    assert _refused(url, Authorization=f"Bearer {token}") == 409
    entry = _audit(url, token)[0]
    assert (entry["outcome"], entry["status"]) == ("failed", 409)
    assert "is not running" in entry["message"]


def test_the_display_page_needs_start_stop_and_names_the_websocket_origin(site: Any) -> None:
    _, url, _ = site
    with httpx.Client(base_url=url) as http:
        http.post("/api/auth/login", json={"name": USER, "password": PASSWORD})
        assert http.get("/vms/box/display").status_code == 403
    with httpx.Client(base_url=url) as http:
        http.post("/api/auth/login", json={"name": "root-admin", "password": "test-password"})
        page = http.get("/vms/box/display")
        assert page.status_code == 200
        assert "start it to see its screen" in page.text
        host = url.removeprefix("http://")
        assert f"connect-src 'self' ws://{host};" in page.headers["content-security-policy"]
        rfb = http.get("/static/novnc/core/rfb.js")  # Debian's novnc, served as it is
        assert rfb.status_code == 200 and "export default class RFB" in rfb.text
        pako = http.get("/static/novnc/vendor/pako/lib/zlib/inflate.js")
        assert pako.status_code == 200
        assert http.get("/static/novnc/vnc.html").status_code == 404  # only what the page uses
