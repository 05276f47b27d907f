"""The graphical console without a guest: the refusals of ``vm screenshot`` and
``vm console --vnc`` (a VM that is off), and of the display WebSocket against a real
``waymark serve`` (no ``start-stop``: 403; another site's page: 403; a VM that is off: 409),
each in the audit log; the page's policy and noVNC's files. With a stand-in for QEMU's VNC
server (an echo): bytes both ways, closed when the VM stops (1000), on a message over 64 KiB
(1009) and when the session is signed out (1008); a socket that is not the VM's QEMU's is
never used; without Debian's novnc the page says what to install.
(The console working end to end, with a booted guest: tests/guest/test_display.py; its
command line: tests/unit/test_cmdline.py.)"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.guest.guests import wait_for
from tests.helpers import Waymark, served
from waymark.api.app import create_app
from waymark.config import Settings
from waymark.web import pages
from waymark.wiring import open_context

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


# --- the relay, with a stand-in for QEMU's VNC server (no guest) ------------------------------

FAKE_VNC = """
import os, socket, sys, threading
os.chdir(sys.argv[1] + "display")  # a relative name: the full path may pass 108 bytes
server = socket.socket(socket.AF_UNIX)
server.bind("vnc.sock")
server.listen()
def echo(conn):
    conn.sendall(b"RFB 003.008\\n")
    while data := conn.recv(65536):
        conn.sendall(data)
while True:
    threading.Thread(target=echo, args=(server.accept()[0],), daemon=True).start()
"""


@contextmanager
def pretend_running(wm: Waymark, vm: str, *, qemu_is_the_listener: bool = True
                    ) -> Iterator[subprocess.Popen[bytes]]:
    """The VM recorded running, its "QEMU" a process naming its run folder (as QEMU's command
    line does) that answers on the display socket by echoing; ``qemu_is_the_listener=False``:
    the socket is another process's (what a link planted in the folder would give)."""
    vm_id = wm.json("vm", "show", vm)["id"]
    run = wm.home / "vms" / vm_id / "run"
    (run / "display").mkdir(parents=True, exist_ok=True)
    listener = subprocess.Popen([sys.executable, "-c", FAKE_VNC, f"{run}/"])
    stand_in = listener if qemu_is_the_listener else subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", f"{run}/"])
    (run / "qemu.pid").write_text(str(stand_in.pid))
    _set_state(wm, vm_id, "running")
    try:
        wait_for("the stand-in's socket", (run / "display" / "vnc.sock").exists, 20)
        yield listener
    finally:
        for process in {listener, stand_in}:
            process.kill()
            process.wait()
        _set_state(wm, vm_id, "off")
        (run / "qemu.pid").unlink()
        shutil.rmtree(run / "display")


def _set_state(wm: Waymark, vm_id: str, state: str) -> None:
    with closing(sqlite3.connect(wm.home / "catalog.db")) as con, con:
        con.execute("UPDATE vms SET state = ? WHERE id = ?", (state, vm_id))


def _admin_socket(url: str) -> tuple[Any, str]:
    admin = _session(url, "root-admin", "test-password")
    return _websocket(url, Cookie=f"waymark_session={admin}", Origin=url), admin


def test_the_display_relays_bytes_both_ways_and_closes_when_the_vm_stops(site: Any) -> None:
    wm, url, token = site
    with pretend_running(wm, "box") as qemu:
        shown = wm.json("vm", "console", "--vnc", "box")
        assert shown["vnc_socket"].endswith("/run/display/vnc.sock")
        screen, _ = _admin_socket(url)
        with screen:
            assert screen.subprotocol is None  # (not asked for)
            assert screen.recv(timeout=20) == b"RFB 003.008\n"
            screen.send(b"\x00" * 20 + b"keys")
            assert screen.recv(timeout=20) == b"\x00" * 20 + b"keys"
            entry = _audit(url, token)[0]
            assert (entry["user_name"], entry["status"], entry["outcome"]) == \
                ("root-admin", 101, "ok")
            qemu.kill()  # the VM stops: its VNC server goes away
            with pytest.raises(ConnectionClosed) as closed:
                screen.recv(timeout=20)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


def test_the_display_closes_a_message_too_large_and_a_signed_out_session(site: Any) -> None:
    wm, url, _ = site
    with pretend_running(wm, "box"):
        screen, _ = _admin_socket(url)
        with screen:
            screen.recv(timeout=20)
            screen.send(b"x" * (64 * 1024 + 1))
            with pytest.raises(ConnectionClosed) as closed:
                screen.recv(timeout=20)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        screen, cookie = _admin_socket(url)
        with screen, httpx.Client(base_url=url, cookies={"waymark_session": cookie}) as http:
            screen.recv(timeout=20)
            csrf = http.get("/api/auth/me").json()["csrf_token"]
            signed_out = http.post("/api/auth/logout", headers={"X-CSRF-Token": csrf})
            assert signed_out.status_code == 200, signed_out.text
            with pytest.raises(ConnectionClosed) as closed:  # at the next check, within 5 s
                while True:
                    screen.recv(timeout=20)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_a_display_socket_that_is_not_the_vms_qemus_is_never_used(site: Any) -> None:
    """What answers on the socket is another process (a link QEMU's user planted would give
    that): Waymark connects, sees the peer is not the VM's QEMU, and sends nothing."""
    wm, url, token = site
    with pretend_running(wm, "box", qemu_is_the_listener=False):
        assert _refused(url, Authorization=f"Bearer {token}") == 409
        entry = _audit(url, token)[0]
        assert "is not its QEMU's" in entry["message"]


def test_the_serial_console_takes_no_json(site: Any) -> None:
    wm, _, _ = site
    result = wm.run("vm", "console", "box", "--json")
    assert result.returncode == 2 and "--json goes with --vnc" in result.stderr


def test_without_novnc_the_page_says_what_to_install(site: Any, monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """A server without Debian's novnc package: the page names it and loads no viewer (and
    nothing is mounted under /static/novnc/)."""
    wm, _, _ = site
    monkeypatch.setattr(pages, "NOVNC", wm.home / "no-novnc-here")
    app = create_app(open_context(Settings(home=wm.home, lock_timeout=10.0)))
    with TestClient(app) as http:
        signed = http.post("/api/auth/login", json={"name": "root-admin",
                                                    "password": "test-password"})
        assert signed.status_code == 200, signed.text
        page = http.get("/vms/box/display")
        assert page.status_code == 200
        assert "apt-get install novnc" in page.text and "display.js" not in page.text
        assert http.get("/static/novnc/core/rfb.js").status_code == 404
