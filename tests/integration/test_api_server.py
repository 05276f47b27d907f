"""The REST API as served: a real ``waymark serve`` process, then Schemathesis on its schema.

A real server (``python -m waymark serve`` on a free loopback port, driven with httpx) and what
only a real HTTP exchange shows:

- signing in sets an HttpOnly, SameSite=Strict session cookie; a request with the cookie works;
  a write with the cookie but without the session's ``X-CSRF-Token`` (or with a wrong one) is
  403 and changes nothing, and with it works; after signing out the same cookie gets 401;
- an API token made through the API works as ``Authorization: Bearer``, until revoked through
  ``DELETE /api/tokens/{id}``: then 401;
- after five wrong passwords the sixth attempt is 429, and so is the right password (a server
  of its own, as the limit also holds for the client's address);
- every error has one shape, ``{"error": {"code", "kind", "message", "hint", "exit_code",
  "details"}}``, on 400, 401, 403, 404, 405 and 409;
- malformed JSON, wrong types, out-of-range values and odd names are 400 (or 404), never 500;
- a VM whose lock another process holds refuses a checkpoint (409, busy), and nothing changes.

Then Schemathesis (``schemathesis.openapi.from_asgi``) on the app in this process, as an
administrator with a token, against a home with a VM whose kernel file is gone (a start fails
before QEMU runs: no guest boots) and a checkpoint: path parameters are sometimes that VM and
that checkpoint, so the generated bodies reach the operations, not only the 404s. Checked for
every response: no server error, and status, content type, headers and body as the OpenAPI
document says. Left out of the generated calls: ``POST /api/templates`` and ``POST
/api/locations``, whose bodies are host paths (a generated one would copy or register any file
or folder of this host); ``GET /api/jobs/events``, a stream that never ends; and the fixture's
VM as the path parameter of ``DELETE /api/vms/{vm}`` and of the checkpoint deletes (a
generated call would delete the fixture, leaving only 404s).

The OpenAPI document is checked to describe the errors the API sends (one shape) and no 422,
and every operation's success body with a schema that says something (``waymark.api.schemas``),
so the response check above holds the success bodies too, not only the errors.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
)

from tests.helpers import ERROR_KEYS, Waymark, serve_process
from waymark.api.app import create_app
from waymark.config import Settings
from waymark.engine import locks
from waymark.engine.context import Context
from waymark.wiring import open_context

PASSWORD = "admin-password-1"
READER_PASSWORD = "reader-password-1"
COOKIE = "waymark_session"


# --- a served home ----------------------------------------------------------------------------

@dataclass
class Served:
    url: str
    home: Path
    admin_token: str
    reader_token: str

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def admin(self) -> httpx.Client:
        return self.client(self.admin_token)

    def tree(self) -> dict[str, Any]:
        with self.admin() as http:
            resp = http.get("/api/vms/vm-x/checkpoints")
        assert resp.status_code == 200, resp.text
        found: dict[str, Any] = resp.json()
        return found


def make_home(wm: Waymark, base: Path) -> tuple[str, str]:
    """An administrator and a reader (read-only, every VM) with tokens; ``vm-x`` (off, 1 MiB)
    with a checkpoint; a repository registered as ``repo``. Returns the two tokens."""
    wm.run("user", "add", "admin", "--role", "administrator", "--password-stdin",
           input=PASSWORD + "\n").ok()
    wm.run("user", "add", "reader", "--role", "read-only", "--password-stdin",
           input=READER_PASSWORD + "\n").ok()
    wm("user", "grant", "reader", "--vm", "*")
    wm("vm", "create", "vm-x", "--disk", "1M", "--memory", "128M",
       "--automatic-checkpoints", "off")
    wm("checkpoint", "create", "vm-x", "--name", "c1")
    wm("backup", "repo", "init", str(base / "repo"))
    wm("location", "add", "repo", str(base / "repo"), "--kind", "repository")
    return (wm.json("token", "create", "tests", "--user", "admin")["token"],
            wm.json("token", "create", "tests", "--user", "reader")["token"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("api-served")
    wm = Waymark(base / "home")
    admin_token, reader_token = make_home(wm, base)
    with serve_process(wm) as url:
        yield Served(url, wm.home, admin_token, reader_token)
    log = (base / "serve.log").read_text()
    assert "Traceback" not in log, log  # no request ended in an unhandled exception


def error_of(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The one error shape, with ``status`` (and ``code``, when given)."""
    assert resp.status_code == status, f"{resp.request.method} {resp.request.url}: " \
                                       f"{resp.status_code} {resp.text[:500]}"
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == ERROR_KEYS, body
    assert isinstance(error["code"], str) and isinstance(error["details"], dict)
    assert isinstance(error["kind"], str) and isinstance(error["exit_code"], int), body
    assert error["hint"] is None or isinstance(error["hint"], str), body
    assert isinstance(error["message"], str) and error["message"].strip(), body
    assert code is None or error["code"] == code, body
    return error


def sign_in(served: Served, name: str = "admin", password: str = PASSWORD
            ) -> tuple[str, str, httpx.Response]:
    """(session cookie, CSRF token, the login response)."""
    with served.client() as http:
        resp = http.post("/api/auth/login", json={"name": name, "password": password})
    assert resp.status_code == 200, resp.text
    return resp.cookies[COOKIE], resp.json()["csrf_token"], resp


# --- sessions, CSRF, tokens -------------------------------------------------------------------

def test_session_cookie_csrf_and_logout(served: Served) -> None:
    cookie, csrf, resp = sign_in(served)
    attributes = [a.strip().lower() for a in resp.headers["set-cookie"].split(";")]
    assert attributes[0].startswith(f"{COOKIE}=") and "httponly" in attributes, attributes
    assert "samesite=strict" in attributes and "path=/" in attributes, attributes
    assert csrf and csrf != cookie
    jar = {"Cookie": f"{COOKIE}={cookie}"}
    with served.client() as http:
        shown = http.get("/api/auth/me", headers=jar)
        assert shown.status_code == 200, shown.text
        assert (shown.json()["name"], shown.json()["via"]) == ("admin", "session")
        assert shown.json()["csrf_token"] == csrf

        before = served.tree()
        for headers in (jar, {**jar, "X-CSRF-Token": "not-the-token"},
                        {**jar, "X-CSRF-Token": ""}):
            refused = http.post("/api/vms/vm-x/checkpoints", json={"name": "by-cookie"},
                                headers=headers)
            assert "CSRF" in error_of(refused, 403)["message"]
            error_of(http.patch("/api/vms/vm-x", json={"cpus": 3}, headers=headers), 403)
        assert served.tree() == before
        with served.admin() as admin:
            assert admin.get("/api/vms/vm-x").json()["cpus"] == 1

        made = http.post("/api/vms/vm-x/checkpoints", json={"name": "by-cookie"},
                         headers={**jar, "X-CSRF-Token": csrf})
        assert made.status_code == 201, made.text
        assert made.json()["name"] == "by-cookie"
        assert made.json()["id"] in {c["id"] for c in served.tree()["checkpoints"]}

        error_of(http.post("/api/auth/logout", headers=jar), 403)  # a write: CSRF too
        out = http.post("/api/auth/logout", headers={**jar, "X-CSRF-Token": csrf})
        assert out.status_code == 200, out.text
        assert out.json() == {"id": shown.json()["id"], "name": "admin", "signed_out": True}
        assert f"{COOKIE}=" in out.headers["set-cookie"]  # the browser is told to drop it
        error_of(http.get("/api/auth/me", headers=jar), 401)
        error_of(http.post("/api/vms/vm-x/checkpoints", json={"name": "after-logout"},
                           headers={**jar, "X-CSRF-Token": csrf}), 401)
    assert "after-logout" not in {c["name"] for c in served.tree()["checkpoints"]}


def test_the_portal_shows_what_the_answers_name(served: Served) -> None:
    """The portal's pages read the use cases' answers (docs/api.md, "The JSON vocabulary"):
    each VM's ``checkpoint_count``, a token's and an audit entry's ``user_name``, the
    schedule's ``repository`` chosen in its form (a name the page no longer reads would show
    as nothing, not fail)."""
    cookie, csrf, _ = sign_in(served)
    with served.admin() as admin:
        [row] = [r for r in admin.get("/api/vms").json() if r["name"] == "vm-x"]
        [token] = [t for t in admin.get("/api/tokens").json() if t["user_name"] == "reader"]
        made = admin.post("/api/schedules", json={"name": "portal-nightly", "vms": ["vm-x"],
                                                  "repository": "repo", "every": "daily",
                                                  "at": "03:00"})
        assert made.status_code == 201, made.text
    with served.client() as http:
        jar = {"Cookie": f"{COOKIE}={cookie}"}
        vms, admin_page, backups = (http.get(path, headers=jar).text
                                    for path in ("/vms", "/admin", "/backups"))
        http.delete("/api/schedules/portal-nightly", headers={**jar, "X-CSRF-Token": csrf})
    assert f'<td>{row["checkpoint_count"]}</td>' in vms, vms
    assert f"<tr><td>{token['id']}</td><td>reader</td><td>tests</td>" in admin_page, admin_page
    assert re.search(r'<td><time datetime="([0-9TZ:-]{20})">\1</time></td><td>admin</td>'
                     r'<td>127\.0\.0\.1</td>', admin_page), admin_page  # local time: the JS
    assert "<option selected>repo</option>" in backups, backups


def test_api_token_works_until_revoked(served: Served) -> None:
    with served.client(served.reader_token) as reader:
        made = reader.post("/api/tokens", json={"name": "script"})
        assert made.status_code == 201, made.text
        token, token_id = made.json()["token"], made.json()["id"]
        assert made.json()["user_name"] == "reader"
    with served.client(token) as script:
        shown = script.get("/api/auth/me")
        assert shown.status_code == 200, shown.text
        assert (shown.json()["name"], shown.json()["via"]) == ("reader", "token")
        assert script.get("/api/vms").status_code == 200
        revoked = script.delete(f"/api/tokens/{token_id}")
        assert revoked.status_code == 200, revoked.text
        assert revoked.json() == {"deleted": [{"kind": "token", "id": token_id,
                                               "name": "script"}]}
        error_of(script.get("/api/auth/me"), 401)
        error_of(script.get("/api/vms"), 401)
    with served.client(served.reader_token) as reader:
        assert token_id not in {t["id"] for t in reader.get("/api/tokens").json()}
    with served.client("wm_nosuchtoken_secret") as stranger:
        error_of(stranger.get("/api/auth/me"), 401)


def test_login_is_rate_limited(tmp_path: Path) -> None:
    """A server of its own: the limit also counts failures per client address, so this one
    would lock every other test's sign-in out."""
    wm = Waymark(tmp_path / "home")
    wm.run("user", "add", "admin", "--role", "administrator", "--password-stdin",
           input=PASSWORD + "\n").ok()
    with serve_process(wm) as url, httpx.Client(base_url=url, timeout=30) as http:
        for attempt in range(5):
            wrong = http.post("/api/auth/login", json={"name": "admin",
                                                       "password": f"wrong-{attempt}"})
            error_of(wrong, 401, "unauthenticated")
            assert COOKIE not in wrong.cookies
        sixth = http.post("/api/auth/login", json={"name": "admin", "password": "wrong-5"})
        error_of(sixth, 429, "too_many_attempts")
        right = http.post("/api/auth/login", json={"name": "admin", "password": PASSWORD})
        error_of(right, 429, "too_many_attempts")  # for a while, even the right password
        assert COOKIE not in right.cookies


# --- errors -----------------------------------------------------------------------------------

def test_one_error_shape(served: Served) -> None:
    with served.admin() as admin, served.client(served.reader_token) as reader, \
            served.client() as anonymous:
        error_of(admin.post("/api/vms/vm-x/checkpoints", json={"name": 5}), 400, "invalid_input")
        error_of(anonymous.get("/api/vms"), 401, "unauthenticated")
        error_of(reader.post("/api/vms/vm-x/checkpoints", json={"name": "no"}), 403, "forbidden")
        error_of(admin.get("/api/vms/no-such-vm"), 404, "not_found")
        error_of(admin.get("/api/no-such-route"), 404, "not_found")
        error_of(admin.put("/api/vms"), 405, "method_not_allowed")
        error_of(admin.post("/api/vms/vm-x/pause"), 409, "conflict")  # the VM is off


def bad(method: str, path: str, body: str | bytes | None, status: int = 400,
        bug: str | None = None) -> Any:
    """One malformed request and its status; ``bug``: a known server bug (strict xfail)."""
    marks = [pytest.mark.xfail(strict=True, reason=f"server bug: {bug}")] if bug else []
    return pytest.param(method, path, body, status, marks=marks,
                        id=f"{method} {path[:60]} {str(body)[:40]}")


BAD_INPUT = [
    # method, path, raw JSON body (status 400 unless given)
    bad("POST", "/api/vms/vm-x/checkpoints", "{not json"),
    bad("POST", "/api/vms/vm-x/checkpoints", b"\xff\xfe\x00garbage"),
    bad("POST", "/api/vms/vm-x/checkpoints", "[]"),
    bad("POST", "/api/vms/vm-x/checkpoints", '"a string"'),
    bad("POST", "/api/vms/vm-x/checkpoints", '{"name": 5}'),
    bad("POST", "/api/vms/vm-x/checkpoints", '{"name": ""}'),
    bad("POST", "/api/vms/vm-x/checkpoints", '{"name": "' + "n" * 200 + '"}'),
    bad("POST", "/api/vms/vm-x/checkpoints", '{"type": "bogus"}'),
    bad("POST", "/api/vms/vm-x/checkpoints", '{"name": {"nested": true}}'),
    bad("POST", "/api/vms/vm-x/checkpoints", "[" * 100_000 + "]" * 100_000),
    bad("POST", "/api/vms/vm-x/checkpoints/c1/apply", "{}"),
    bad("POST", "/api/vms/vm-x/checkpoints/c1/apply", '{"mode": "sideways"}'),
    bad("POST", "/api/vms/vm-x/checkpoints/c1/apply", "null"),
    bad("PATCH", "/api/vms/vm-x", '{"cpus": "many"}'),
    bad("PATCH", "/api/vms/vm-x", '{"cpus": 0}'),
    bad("PATCH", "/api/vms/vm-x", '{"cpus": 1e400}'),
    bad("PATCH", "/api/vms/vm-x", '{"cpus": 99999999999999999999999999}'),
    bad("PATCH", "/api/vms/vm-x", '{"memory": "lots"}'),
    bad("PATCH", "/api/vms/vm-x", '{"memory": "-5M"}'),
    bad("PATCH", "/api/vms/vm-x", '{"memory": "99999999999999T"}'),
    bad("PATCH", "/api/vms/vm-x", '{"max_checkpoints": -1}'),
    bad("PATCH", "/api/vms/vm-x", '{"checkpoint_type": "sometimes"}'),
    bad("POST", "/api/vms/vm-x/stop", '{"timeout": -1}'),
    bad("POST", "/api/vms/vm-x/stop", '{"timeout": "soon"}'),
    bad("POST", "/api/users", '{"name": "x", "role": "god", "password": "long-enough-1"}'),
    bad("POST", "/api/users", '{"name": "shorty", "role": "read-only", "password": "short"}'),
    bad("POST", "/api/users", '{"name": "bad name!", "role": "read-only", '
        '"password": "long-enough-1"}'),
    bad("POST", "/api/users/reader/grants", '{"vm": "vm-x", "permissions": ["everything"]}'),
    bad("POST", "/api/users/reader/grants", '{"permissions": []}'),
    bad("POST", "/api/auth/login", '{"name": "admin"}'),
    bad("POST", "/api/auth/login", '{"name": "", "password": ""}'),
    bad("POST", "/api/schedules", '{"name": "s", "vms": ["vm-x"], "repository": "repo", '
        '"every": "daily", "at": "25:99"}'),
    bad("POST", "/api/schedules", '{"name": "s", "vms": [], "repository": "repo", '
        '"every": "hourly", "at": "02:00"}'),
    bad("POST", "/api/backups/prune", '{"repository": "repo", "keep_last": -3}'),
    bad("POST", "/api/vms/vm-x/checkpoints/c1/export",
        '{"location": "repo", "folder": "../escape"}'),
    bad("DELETE", "/api/vms/vm-x?yes=maybe", None),
    bad("GET", "/api/jobs?everything=perhaps", None),
    bad("GET", "/api/vms/vm-x/backups", None),  # which repository?
    bad("GET", "/api/vms/%00", None, 404),
    bad("GET", "/api/vms/" + "v" * 5000, None, 404),
    bad("GET", "/api/vms/vm-x/checkpoints/%2e%2e", None, 404),
    bad("GET", "/api/templates/..%2f..%2fetc", None, 404),
    bad("DELETE", "/api/users/reader/grants?vm=%00", None, 404),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), BAD_INPUT)
def test_bad_input_is_a_client_error(served: Served, method: str, path: str,
                                     body: str | bytes | None, status: int) -> None:
    before = served.tree()
    with served.admin() as admin:
        resp = admin.request(method, path, content=body,
                             headers={"Content-Type": "application/json"} if body else {})
    assert resp.status_code < 500, f"{method} {path}: {resp.status_code} {resp.text[:500]}"
    error_of(resp, status)
    assert served.tree() == before


def test_a_json_body_needs_a_json_content_type(served: Served) -> None:
    with served.admin() as admin:
        resp = admin.post("/api/vms/vm-x/checkpoints", content='{"name": "as-text"}',
                          headers={"Content-Type": "text/plain"})
    assert resp.status_code < 500, resp.text
    error_of(resp, 400)


# --- a VM another process holds ---------------------------------------------------------------

@pytest.fixture(scope="module")
def busy_answer(served: Served) -> tuple[httpx.Response, dict[str, Any], dict[str, Any]]:
    """A checkpoint asked for while this process holds the VM's lock: (the answer, the tree
    before, the tree after the lock is released)."""
    before = served.tree()
    with served.admin() as admin, locks.held(served.home, before["vm_id"], timeout=5,
                                             label="the test"):
        started = time.monotonic()
        resp = admin.post("/api/vms/vm-x/checkpoints", json={"name": "while-busy"})
        assert time.monotonic() - started < 20
    return resp, before, served.tree()


def test_busy_vm_is_409_and_changes_nothing(
        busy_answer: tuple[httpx.Response, dict[str, Any], dict[str, Any]]) -> None:
    resp, before, after = busy_answer
    error = error_of(resp, 409, "busy")
    assert "busy" in error["message"], error
    assert after == before


# --- Schemathesis -----------------------------------------------------------------------------

# The app whose OpenAPI document Schemathesis reads when this module is collected; the fixture
# gives it its home (``app.state.ctx``) before any test calls it.
FUZZED_APP = create_app(cast(Context, None))
FUZZED: dict[str, str] = {}  # vm, checkpoint: the fixture's, for the hook below
# destructive for the fixture: a generated call would delete what the rest relies on
KEEP_VM = {("DELETE", "/api/vms/{vm}"), ("DELETE", "/api/vms/{vm}/checkpoints/{ckpt}"),
           ("DELETE", "/api/vms/{vm}/checkpoints")}
schema = schemathesis.openapi.from_asgi("/api/openapi.json", FUZZED_APP).exclude(
    method="POST", path="/api/templates").exclude(method="POST", path="/api/locations").exclude(
    method="GET", path="/api/jobs/events")


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """Half the time the fixture's VM and checkpoint (once it exists), so that bodies reach
    the operation, not only the VM lookup's 404."""
    operation = context.operation
    if not path_parameters or "vm" not in path_parameters or \
            (operation.method.upper(), operation.path) in KEEP_VM:
        return st.just(path_parameters)
    generated = dict(path_parameters)

    def aimed(real: bool) -> dict[str, Any]:
        if not real or not FUZZED:
            return generated
        return {**generated, "vm": FUZZED["vm"]} | (
            {"ckpt": FUZZED["checkpoint"]} if "ckpt" in generated else {})

    return st.booleans().map(aimed)


@schema.hook
def map_body(context: Any, body: Any) -> Any:
    """The fixture's VM keeps the (missing) kernel that stops every start before QEMU runs: a
    generated settings change never drops it (``no_kernel``, ``kernel: ""``; what those do:
    tests/integration/test_boot_settings.py)."""
    operation = context.operation
    if (operation.method.upper(), operation.path) != ("PATCH", "/api/vms/{vm}") or \
            not isinstance(body, dict):
        return body
    return {k: v for k, v in body.items() if k != "no_kernel" and (k, v) != ("kernel", "")}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The home Schemathesis runs against: an administrator (whose token is returned), and
    the VM ``sx-vm`` (off, its kernel file gone: a start fails before QEMU runs) with a
    checkpoint."""
    base = tmp_path_factory.mktemp("api-fuzzed")
    wm = Waymark(base / "home")
    wm.run("user", "add", "admin", "--role", "administrator", "--password-stdin",
           input=PASSWORD + "\n").ok()
    token: str = wm.json("token", "create", "fuzz", "--user", "admin")["token"]
    kernel = base / "vmlinuz"
    kernel.write_bytes(b"not a kernel\n")
    wm("vm", "create", "sx-vm", "--disk", "1M", "--memory", "128M", "--kernel", str(kernel),
       "--automatic-checkpoints", "off")
    kernel.unlink()
    FUZZED["vm"] = "sx-vm"
    FUZZED["checkpoint"] = wm.json("checkpoint", "create", "sx-vm", "--name", "sx-c1")["id"]
    FUZZED_APP.state.ctx = open_context(Settings(home=wm.home, lock_timeout=2.0))
    yield token
    # the serial log gets its first line just before QEMU is launched: none, no launch
    assert sorted(wm.home.glob("vms/*/run/serial.log")) == [], "a VM was launched"


@pytest.mark.single_process  # its cases share one node id, which xdist would collapse to one
@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_schemathesis(case: Any, fuzzed: str) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {fuzzed}"},
        checks=[not_a_server_error, response_schema_conformance, content_type_conformance,
                response_headers_conformance])


def test_openapi_documents_the_errors(served: Served) -> None:
    """Each operation documents its error answers (the one error shape), as Schemathesis's
    status-code check would need; and no 422, which the API never answers."""
    schema = httpx.get(f"{served.url}/api/openapi.json", timeout=10).json()
    wrong = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            if "422" in codes or not ({"400", "4XX", "default"} & codes):
                wrong.append(f"{method.upper()} {path}: {sorted(codes)}")
    assert wrong == []



def test_openapi_describes_every_success_body(served: Served) -> None:
    """Each operation documents its success answer with a schema that says something (an
    object with properties, a list of them; an event stream's events), so Schemathesis's
    response_schema_conformance checks the bodies above, not only the errors."""
    schema = httpx.get(f"{served.url}/api/openapi.json", timeout=10).json()
    components = schema["components"]["schemas"]

    def said(body: dict[str, Any]) -> bool:
        if "$ref" in body:
            return said(components[body["$ref"].rsplit("/", 1)[-1]])
        if "anyOf" in body:
            return all(said(one) for one in body["anyOf"])
        if body.get("type") == "array":
            return said(body["items"])
        return bool(body.get("properties"))

    wrong, count = [], 0
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            success = {c: r for c, r in operation["responses"].items() if c.startswith("2")}
            bodies = [m.get("schema", {}) for r in success.values()
                      for m in r.get("content", {}).values()]
            count += len(bodies)
            if not bodies or not all(said(b) for b in bodies):
                wrong.append(f"{method.upper()} {path}: {success}")
    assert wrong == []
    assert count >= 63, count
