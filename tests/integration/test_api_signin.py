"""Signing in, transport and credentials, attacked through a real ``waymark serve``.

- the sign-in limiter: 40 parallel wrong guesses reach the password check at most 5 times
  (the rest are 429); ``X-Forwarded-For`` from loopback is ignored unless the proxy is named
  with ``--trusted-proxy``; an attacker's failures from one address (a second loopback address,
  127.0.0.2) do not lock the user out from another, and an administrator can clear them;
- login CSRF: a sign-in form posted from a page of another site (its ``Origin`` or
  ``Referer``) is refused and signs no one in; the same form from the site works;
- ``--listen`` on a non-loopback address without TLS is refused unless ``--insecure-http``;
  every response carries the security headers, HSTS only under TLS; ``/api/docs`` is gone,
  ``/api/openapi.json`` stays;
- changing one's own password needs the current one (API and ``waymark --server ... user
  passwd``), an administrator resets another's without it; a password change revokes the
  user's API tokens (unless ``keep_tokens``); tokens may expire.
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.helpers import Waymark, free_port, query, serve_process
from tests.integration.test_catalog_migrations import downgrade

ADMIN, ADMIN_PASSWORD = "admin", "admin-password-1"
ALICE, ALICE_PASSWORD = "alice", "alice-password-1"
COOKIE = "waymark_session"


def make_home(base: Path) -> Waymark:
    wm = Waymark(base / "home")
    for name, role, password in ((ADMIN, "administrator", ADMIN_PASSWORD),
                                 (ALICE, "self-service", ALICE_PASSWORD)):
        wm.run("user", "add", name, "--role", role, "--password-stdin",
               input=password + "\n").ok()
    return wm


@pytest.fixture
def home(tmp_path: Path) -> Waymark:
    return make_home(tmp_path)


def client(url: str, source: str = "127.0.0.1", token: str | None = None) -> httpx.Client:
    """A client whose connections come from ``source`` (any 127.x.y.z reaches the server)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, timeout=60, headers=headers,
                        transport=httpx.HTTPTransport(local_address=source))


def login(http: httpx.Client, name: str, password: str,
          headers: dict[str, str] | None = None) -> httpx.Response:
    return http.post("/api/auth/login", json={"name": name, "password": password},
                     headers=headers)


def password_hash(wm: Waymark, name: str) -> str:
    [(found,)] = query(wm.home, "SELECT password_hash FROM users WHERE name = ?", name)
    return str(found)


def sessions(wm: Waymark) -> int:
    return int(query(wm.home, "SELECT count(*) FROM web_sessions")[0][0])


# --- 11: the sign-in limiter ------------------------------------------------------------------

def test_parallel_guesses_reach_the_password_check_at_most_five_times(home: Waymark) -> None:
    with serve_process(home) as url, client(url) as http, ThreadPoolExecutor(40) as pool:
        statuses = Counter(pool.map(
            lambda i: login(http, ALICE, f"guess-{i}").status_code, range(40)))
        assert set(statuses) <= {401, 429} and statuses[401] <= 5, statuses
        assert login(http, ALICE, ALICE_PASSWORD).status_code == 429  # still refused
    assert sessions(home) == 0


def test_a_forged_forwarded_for_from_loopback_is_ignored(home: Waymark) -> None:
    """Without --trusted-proxy each forged address is still 127.0.0.1: the address's limit
    (20 failures, whatever the names) holds, and the audit log names the real peer."""
    with serve_process(home) as url, client(url) as http:
        answers = [login(http, f"user-{i}", "wrong-password",
                         {"X-Forwarded-For": f"10.9.{i}.1"}).status_code for i in range(21)]
        assert answers == [401] * 20 + [429], answers
        forged = login(http, ALICE, ALICE_PASSWORD, {"X-Forwarded-For": "10.9.99.1"})
        assert forged.status_code == 429
    clients = {c for (c,) in query(home.home, "SELECT client FROM audit")}
    assert clients == {"127.0.0.1"}, clients


def test_a_trusted_proxy_names_the_client(home: Waymark) -> None:
    """With --trusted-proxy 127.0.0.1 its X-Forwarded-For is the client: the failures of one
    forwarded address do not count against another."""
    with serve_process(home, options=("--trusted-proxy", "127.0.0.1")) as url, \
            client(url) as proxy:
        via = {"X-Forwarded-For": "192.0.2.7"}
        answers = [login(proxy, ALICE, f"wrong-{i}", via).status_code for i in range(6)]
        assert answers == [401] * 5 + [429]
        other = login(proxy, ALICE, ALICE_PASSWORD, {"X-Forwarded-For": "192.0.2.8"})
        assert other.status_code == 200, other.text
    assert ("192.0.2.7",) in query(home.home, "SELECT client FROM audit")


def test_an_attackers_failures_do_not_lock_the_user_out_elsewhere(home: Waymark) -> None:
    with serve_process(home) as url, client(url, "127.0.0.2") as attacker, \
            client(url, "127.0.0.1") as user, client(url, "127.0.0.3") as sprayer:
        answers = [login(attacker, ALICE, f"wrong-{i}").status_code for i in range(8)]
        assert answers == [401] * 5 + [429] * 3
        assert login(attacker, ALICE, ALICE_PASSWORD).status_code == 429
        assert login(user, ALICE, ALICE_PASSWORD).status_code == 200  # from her address
        # one address guessing many names is limited too (and only that address)
        sprayed = [login(sprayer, f"name-{i}", "wrong-password").status_code
                   for i in range(21)]
        assert sprayed == [401] * 20 + [429]
        assert login(user, ADMIN, ADMIN_PASSWORD).status_code == 200
        # the way out from the attacker's address (a shared NAT): an administrator clears it
        admin_cookie = login(user, ADMIN, ADMIN_PASSWORD)
        csrf = admin_cookie.json()["csrf_token"]
        refused = attacker.delete(f"/api/users/{ALICE}/sign-in-failures")
        assert refused.status_code == 401
        cleared = user.delete(f"/api/users/{ALICE}/sign-in-failures",
                              headers={"X-CSRF-Token": csrf,
                                       "Cookie": f"{COOKIE}={admin_cookie.cookies[COOKIE]}"})
        assert cleared.status_code == 200, cleared.text
        assert cleared.json() == {"user_name": ALICE, "cleared_addresses": 1}
        assert login(attacker, ALICE, ALICE_PASSWORD).status_code == 200
        # the same through the CLI (the counts are the server's: it goes through --server)
        for attempt in range(6):
            login(attacker, ALICE, f"wrong-again-{attempt}")
        assert login(attacker, ALICE, ALICE_PASSWORD).status_code == 429
        local = home.run("user", "unlock", ALICE)
        assert local.returncode == 2 and "--server" in local.stderr
        remote = home.run("user", "unlock", ALICE, env=home.env(
            WAYMARK_SERVER=url, WAYMARK_TOKEN=token(home, ADMIN)))
        assert remote.returncode == 0 and "1 address(es)" in remote.stdout, remote.stderr
        assert login(attacker, ALICE, ALICE_PASSWORD).status_code == 200


# --- 13: login CSRF on the portal's sign-in form ----------------------------------------------

def test_a_sign_in_form_from_another_site_is_refused(home: Waymark) -> None:
    form = {"name": ALICE, "password": ALICE_PASSWORD, "next": "/vms"}
    with serve_process(home) as url, client(url) as http:
        for forged in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                       {"Referer": "http://evil.example/page"},
                       {"Origin": url.replace("127.0.0.1", "localhost")}):
            resp = http.post("/login", data=form, headers=forged, follow_redirects=False)
            assert resp.status_code == 403, (forged, resp.status_code)
            assert COOKIE not in resp.cookies and "another site" in resp.text
            assert http.post("/logout", headers=forged).status_code == 403
        assert sessions(home) == 0
        same = http.post("/login", data=form, headers={"Origin": url,
                                                       "Referer": f"{url}/login"},
                         follow_redirects=False)
        assert same.status_code == 303 and same.headers["location"] == "/vms"
        assert COOKIE in same.cookies
    assert sessions(home) == 1


# --- 14: transport and headers ----------------------------------------------------------------

def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def serving(wm: Waymark, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``waymark serve ARGS``, stopped at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "waymark", "serve", "--no-schedules", *args],
                            env=wm.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(15)


def test_plain_http_beyond_loopback_needs_insecure_http(home: Waymark) -> None:
    port = free_port()
    for listen in (f"0.0.0.0:{port}", f"[::]:{port}", f"example.org:{port}"):
        with serving(home, "--listen", listen) as proc:
            assert proc.wait(60) == 2
            assert proc.stdout is not None
            said = proc.stdout.read().decode()
            assert "without TLS" in said and "--insecure-http" in said, said
            assert "Traceback" not in said
    assert not listening(port)
    with serving(home, "--listen", f"0.0.0.0:{port}", "--insecure-http") as proc:
        deadline = time.monotonic() + 30
        while not listening(port):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/api/openapi.json").status_code == 200
    with serving(home, "--listen", f"127.0.0.1:{port}", "--trusted-proxy", "proxy.lan") as proc:
        assert proc.wait(60) == 2


SECURITY_HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff",
                    "referrer-policy": "same-origin"}


def check_headers(resp: httpx.Response, hsts: bool) -> None:
    where = f"{resp.request.method} {resp.url} ({resp.status_code})"
    for name, value in SECURITY_HEADERS.items():
        assert resp.headers.get(name) == value, where
    policy = resp.headers["content-security-policy"]
    for part in ("script-src 'self'", "frame-ancestors 'none'", "default-src 'none'"):
        assert part in policy, where
    assert "unsafe-inline" not in policy
    assert ("strict-transport-security" in resp.headers) is hsts, where


def test_every_response_has_the_security_headers(home: Waymark) -> None:
    with serve_process(home) as url, client(url) as http:
        answers = [http.get("/login"), http.get("/"), http.get("/static/app.js"),
                   http.get("/api/openapi.json"), http.get("/api/vms"),
                   http.get("/no/such/page"), login(http, ALICE, "wrong-password"),
                   http.post("/api/auth/login", content=b"{")]
        for resp in answers:
            check_headers(resp, hsts=False)
        assert http.get("/api/docs").status_code == 404  # no explorer that needs a CDN
        assert http.get("/api/openapi.json").json()["info"]["title"] == "Waymark"
    with serve_process(home, options=("--trusted-proxy", "127.0.0.1")) as url, \
            client(url) as proxy:  # TLS ended at a trusted proxy
        check_headers(proxy.get("/login", headers={"X-Forwarded-Proto": "https"}), hsts=True)
        check_headers(proxy.get("/login"), hsts=False)


def test_hsts_under_tls(home: Waymark, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    port = free_port()
    with serving(home, "--listen", f"0.0.0.0:{port}", "--cert", str(cert), "--key", str(key)
                 ) as proc:
        deadline = time.monotonic() + 30
        while not listening(port):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=False) as https:
            check_headers(https.get("/login"), hsts=True)
            check_headers(https.get("/api/vms"), hsts=True)


# --- 16: passwords and tokens -----------------------------------------------------------------

def token(wm: Waymark, user: str, *args: str) -> str:
    return str(wm.json("token", "create", "script", "--user", user, *args)["token"])


def me(url: str, token: str) -> int:
    with client(url, token=token) as http:
        return http.get("/api/auth/me").status_code


def test_changing_ones_own_password_needs_the_current_one(home: Waymark) -> None:
    alice = token(home, ALICE)
    before = password_hash(home, ALICE)
    with serve_process(home) as url, client(url, token=alice) as http:
        path = f"/api/users/{ALICE}/password"
        missing = http.put(path, json={"password": "stolen-password-1"})
        assert missing.status_code == 400, missing.text
        assert "current password" in missing.json()["error"]["message"]
        wrong = http.put(path, json={"password": "stolen-password-1",
                                     "current_password": "not-her-password"})
        assert wrong.status_code == 403, wrong.text
        assert password_hash(home, ALICE) == before and me(url, alice) == 200
        # wrong current passwords count as failed sign-ins
        for attempt in range(4):
            http.put(path, json={"password": "stolen-password-1",
                                 "current_password": f"guess-{attempt}"})
        limited = http.put(path, json={"password": "stolen-password-1",
                                       "current_password": ALICE_PASSWORD})
        assert limited.status_code == 429
        assert password_hash(home, ALICE) == before
    with serve_process(home) as url, client(url, token=alice) as http:  # (a fresh limiter)
        right = http.put(f"/api/users/{ALICE}/password",
                         json={"password": "new-password-1", "current_password": ALICE_PASSWORD})
        assert right.status_code == 200, right.text
        [(alice_id,)] = query(home.home, "SELECT id FROM users WHERE name = ?", ALICE)
        assert right.json() == {"id": alice_id, "name": ALICE, "sessions_ended": True,
                                "tokens_revoked": 1}
        assert me(url, alice) == 401  # the token made with the old password is gone
        assert login(http, ALICE, "new-password-1").status_code == 200


def test_an_administrator_resets_without_it_and_may_keep_tokens(home: Waymark) -> None:
    admin, alice = token(home, ADMIN), token(home, ALICE)
    with serve_process(home) as url, client(url, token=admin) as http:
        kept = http.put(f"/api/users/{ALICE}/password",
                        json={"password": "reset-password-1", "keep_tokens": True})
        assert kept.json()["tokens_revoked"] == 0 and me(url, alice) == 200
        reset = http.put(f"/api/users/{ALICE}/password", json={"password": "reset-password-2"})
        assert reset.json()["tokens_revoked"] == 1 and me(url, alice) == 401
        assert me(url, admin) == 200
        own = http.put(f"/api/users/{ADMIN}/password", json={"password": "admin-password-2"})
        assert own.status_code == 400  # administrators too give their own current password


def test_the_cli_through_server_asks_for_the_current_password(home: Waymark) -> None:
    alice = token(home, ALICE)
    before = password_hash(home, ALICE)
    with serve_process(home) as url:
        env = home.env(WAYMARK_SERVER=url, WAYMARK_TOKEN=alice)
        wrong = home.run("user", "passwd", ALICE, "--password-stdin", env=env,
                         input="not-her-password\nstolen-password-1\n")
        assert wrong.returncode == 77, wrong.stderr
        assert "current password is wrong" in wrong.stderr
        assert password_hash(home, ALICE) == before
        right = home.run("user", "passwd", ALICE, "--password-stdin", "--keep-tokens", env=env,
                         input=f"{ALICE_PASSWORD}\nnew-password-1\n")
        assert right.returncode == 0, right.stderr
        assert password_hash(home, ALICE) != before and me(url, alice) == 200
    local = home.run("user", "passwd", ALICE, "--password-stdin", input="host-password-1\n")
    assert local.returncode == 0 and "1 API token(s) revoked" in local.stdout, local.stdout


def test_tokens_made_before_expiry_existed_never_expire(home: Waymark) -> None:
    made = home.json("token", "create", "old", "--user", ALICE)
    downgrade(home.home, "0010")
    assert "expires_at" not in {c for (_, c, *_) in query(home.home,
                                                          "PRAGMA table_info(api_tokens)")}
    [listed] = home.json("token", "list")  # migrates to the head
    assert (listed["id"], listed["expires_at"]) == (made["id"], None)
    with serve_process(home) as url:
        assert me(url, made["token"]) == 200


def test_tokens_may_expire(home: Waymark) -> None:
    made = home.json("token", "create", "short", "--user", ALICE, "--expires-in", "1h")
    assert made["expires_at"] is not None
    lasting = token(home, ALICE)
    bad = home.run("token", "create", "bad", "--user", ALICE, "--expires-in", "0d")
    assert bad.returncode == 2 and "--expires-in" in bad.stderr
    assert len(home.json("token", "list")) == 2
    with serve_process(home) as url:
        assert me(url, made["token"]) == 200
        with sqlite3.connect(home.home / "catalog.db") as db:  # an hour later
            db.execute("UPDATE api_tokens SET expires_at = '2000-01-01 00:00:00.000000' "
                       "WHERE id = ?", (made["id"],))
        with client(url, token=made["token"]) as http:
            expired = http.get("/api/auth/me")
            assert expired.status_code == 401 and "expired" in expired.text
        with client(url, token=lasting) as http:
            via_api = http.post("/api/tokens", json={"name": "api", "expires_in": "30m"})
            assert via_api.status_code == 201 and via_api.json()["expires_at"], via_api.text
            refused = http.post("/api/tokens", json={"name": "api", "expires_in": "forever"})
            assert refused.status_code == 400
            listed = {t["name"]: t["expires_at"] for t in http.get("/api/tokens").json()}
            assert listed["script"] is None and listed["api"] is not None
        assert me(url, lasting) == 200
