"""What strangers send is bounded where it is stored and harmless where it is printed; errors
show host paths to administrators only; test failpoints never arm outside the test suite.

Against a real ``waymark serve`` and the real CLI:

- the audit log: 40 requests without credentials from one address, each naming a VM by an
  8,000-character name (and more for a path no route matches), write at most
  ``ANONYMOUS_LIMIT`` entries, each text cut to its limit, while an administrator's requests in
  between are all recorded; an anonymous request whose path and sign-in name hold escape
  sequences (retitle the window, clear the screen, erase a line), a bidi override and a newline
  followed by a forged entry is printed by ``waymark audit`` with every control character shown
  as an escape, one line per entry, and the portal's audit log shows them so too;
- ``vm status`` of a VM whose QEMU died after the guest wrote escape sequences to its serial
  console shows them as escapes;
- a self-service user whose checkpoint fails on a missing disk file gets the error without the
  home's path (nothing is created), an administrator gets the path;
- ``waymark serve`` with ``WAYMARK_FAILPOINT`` set refuses to start (exit 2, nothing served); a
  command with ``WAYMARK_FAILPOINT`` but without the test suite's key is not killed.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import urllib.parse
from pathlib import Path

import httpx

from tests.helpers import Waymark, free_port, query, served
from waymark.usecases.access.audit import ANONYMOUS_LIMIT, MESSAGE_LIMIT, TEXT_LIMIT

ESC = "\x1b"
HOSTILE = f"{ESC}]0;pwned{chr(7)}{ESC}[2J{ESC}[2K\u202eevil\x9b1A"
SELF_PASSWORD = "alice-password-1"


def audit_rows(wm: Waymark) -> list[dict[str, object]]:
    return list(wm.json("audit", "--limit", "100000"))


def test_requests_without_credentials_are_bounded_in_the_audit_log(tmp_path: Path) -> None:
    wm = Waymark(tmp_path / "home")
    long_name = "A" * 8000
    with served(wm) as (url, token), httpx.Client(base_url=url, timeout=60) as http:
        before = len(audit_rows(wm))
        admin = {"Authorization": f"Bearer {token}"}
        for number in range(40):
            assert http.get(f"/api/vms/{long_name}").status_code == 401
            assert http.post(f"/api/{long_name}/{number}").status_code == 404
            if number % 10 == 0:  # an administrator's refusal in between: always recorded
                assert http.delete(f"/api/vms/nowhere{number}", headers=admin).status_code == 404
        written = audit_rows(wm)[: len(audit_rows(wm)) - before]
    anonymous = [e for e in written if e["user_name"] is None]
    assert len(anonymous) == ANONYMOUS_LIMIT, len(anonymous)
    assert sorted(str(e["target"].get("vm")) for e in written  # type: ignore[union-attr]
                  if e["user_name"] == "root-admin") == [f"nowhere{n}" for n in (0, 10, 20, 30)]
    for entry in anonymous:
        assert len(str(entry["action"])) <= TEXT_LIMIT
        assert all(len(str(v)) <= TEXT_LIMIT
                   for v in entry["target"].values())  # type: ignore[union-attr]
        assert len(str(entry["message"] or "")) <= MESSAGE_LIMIT
    ((longest,),) = query(wm.home, "SELECT max(length(action) + length(target) + "
                                   "coalesce(length(message), 0)) FROM audit")
    assert longest < 2 * TEXT_LIMIT + MESSAGE_LIMIT + 100


def test_audit_prints_what_strangers_sent_as_escapes(tmp_path: Path) -> None:
    wm = Waymark(tmp_path / "home")
    forged = "\n2026-01-01T00:00:00Z  root-admin       127.0.0.1       200 ok     DELETE everything"
    with served(wm) as (url, _token), httpx.Client(base_url=url, timeout=60) as http:
        quoted = urllib.parse.quote(HOSTILE + forged, safe="")
        assert http.get(f"/api/vms/{quoted}").status_code == 401
        assert http.post(f"/api/{quoted}").status_code == 404
        assert http.post("/api/auth/login", json={"name": HOSTILE + forged,
                                                  "password": "x"}).status_code in (400, 401)
        page = admin_page(http)
    assert ESC not in page and "\u202e" not in page and "\x9b" not in page
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in page and "\\u202eevil" in page  # the portal's log
    rows = audit_rows(wm)
    shown = wm("audit", "--limit", "100000").stdout
    assert ESC not in shown and "\u202e" not in shown and "\x9b" not in shown, repr(shown)
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in shown and "\\u202eevil" in shown
    assert len(shown.splitlines()) == len(rows), shown  # no forged line
    assert "\\x0a2026-01-01T00:00:00Z  root-admin" in shown


def admin_page(http: httpx.Client) -> str:
    """The portal's administration page (with its audit log) as root-admin sees it."""
    signed = http.post("/login", data={"name": "root-admin", "password": "test-password"},
                       headers={"Origin": str(http.base_url).rstrip("/")})
    assert signed.status_code in (200, 303), signed.text
    page = http.get("/admin")
    assert page.status_code == 200 and "Audit log" in page.text, page.text
    return page.text


def test_vm_status_shows_the_guests_serial_output_as_escapes(tmp_path: Path) -> None:
    """The VM's QEMU died (state running, no process): status records its exit with the tail of
    the serial log, where the guest wrote escape sequences."""
    wm = Waymark(tmp_path / "home")
    vm_id = wm.json("vm", "create", "v", "--disk", "1M", "--memory", "256M")["id"]
    run = wm.home / "vms" / vm_id / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "serial.log").write_bytes(f"booting\n{HOSTILE} owned\n".encode())
    con = sqlite3.connect(wm.home / "catalog.db")
    with con:
        con.execute("UPDATE vms SET state = 'running' WHERE id = ?", (vm_id,))
    con.close()
    shown = wm("vm", "status", "v").stdout
    assert ESC not in shown and "\u202e" not in shown and "\x9b" not in shown, repr(shown)
    assert "| \\x1b]0;pwned\\x07\\x1b[2J\\x1b[2K\\u202eevil\\x9b1A owned" in shown, shown
    assert json.loads(wm("vm", "status", "v", "--json").stdout)["last_exit"]["log"][-1] \
        .startswith(ESC)  # stored as the guest wrote it; only printing neutralises it


def test_errors_show_host_paths_to_administrators_only(tmp_path: Path) -> None:
    wm = Waymark(tmp_path / "home")
    vm_id = wm.json("vm", "create", "v", "--disk", "1M", "--memory", "256M")["id"]
    wm.run("user", "add", "alice", "--role", "self-service", "--password-stdin",
           input=SELF_PASSWORD + "\n").ok()
    wm("user", "grant", "alice", "--vm", "v", "--permission", "checkpoint")
    alice_token = wm.json("token", "create", "t", "--user", "alice")["token"]
    disk = Path(wm.json("vm", "show", "v")["disks"][0]["active_image"])
    disk.unlink()  # the storage lost the file
    before = query(wm.home, "SELECT count(*) FROM checkpoints")
    with served(wm) as (url, token), httpx.Client(base_url=url, timeout=60) as http:
        as_alice = http.post("/api/vms/v/checkpoints", json={"name": "c"},
                             headers={"Authorization": f"Bearer {alice_token}"})
        as_admin = http.post("/api/vms/v/checkpoints", json={"name": "c"},
                             headers={"Authorization": f"Bearer {token}"})
    assert as_alice.status_code >= 400 and as_alice.status_code == as_admin.status_code
    home = str(wm.home)
    assert home in as_admin.text, as_admin.text
    assert home not in as_alice.text and vm_id not in as_alice.text, as_alice.text
    assert "<host path>" in as_alice.json()["error"]["message"], as_alice.text
    assert query(wm.home, "SELECT count(*) FROM checkpoints") == before
    logged = [e for e in audit_rows(wm) if e["user_name"] == "alice"]
    assert home in str(logged[0]["message"])  # administrators read the whole message


def test_serve_refuses_to_run_with_failpoints(tmp_path: Path) -> None:
    wm = Waymark(tmp_path / "home")
    wm("vm", "list")
    port = free_port()
    served_with = subprocess.run(
        [sys.executable, "-m", "waymark", "serve", "--listen", f"127.0.0.1:{port}",
         "--no-schedules"], env=wm.env(WAYMARK_FAILPOINT="commit"), capture_output=True,
        text=True, timeout=60, check=False)
    assert served_with.returncode == 2, served_with
    assert "failpoint" in served_with.stderr and "Unset" in served_with.stderr


def test_failpoints_need_the_test_suites_key(tmp_path: Path) -> None:
    wm = Waymark(tmp_path / "home")
    outside = wm.run("vm", "create", "v", "--disk", "1M", "--memory", "256M",
                     env=wm.env(WAYMARK_FAILPOINT="0", WAYMARK_TEST_SUITE=""))
    assert outside.returncode == 0, outside
    assert "ignored" in outside.stderr and "test suite" in outside.stderr
    inside = wm.run("vm", "create", "w", "--disk", "1M", "--memory", "256M",
                    env=wm.env(WAYMARK_FAILPOINT="0"))
    assert inside.returncode == -9, inside  # the test suite's own kill still works
