"""An exception no handler expects, in a real ``waymark serve``: the one error envelope, logged
and audited.

The server runs with ``WAYMARK_FAILPOINT_RAISE=commit`` (:mod:`waymark.failpoints`): every
journal commit raises a plain RuntimeError, as a defect would. Checked: a checkpoint asked for
through the API answers 500 with the envelope (code ``internal``, kind ``WaymarkError``, exit code
1, an incident id in ``details`` and in the message), as JSON with the security headers, and with
no traceback, no exception text and no host path in it; the server's log has the traceback under
the same incident id; the audit log's newest entry is that request (status 500, ``failed``, the
exception and the incident in its message); the server goes on answering; and the CLI with
``--server`` exits 1 printing the envelope (code ``internal``, the incident in its message) with
``--json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ERROR_KEYS, Waymark, serve_process

PASSWORD = "admin-password-1"


@dataclass
class Server:
    wm: Waymark
    url: str
    token: str
    log: Path

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, timeout=60,
                             headers={"Authorization": f"Bearer {self.token}"}, **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("api-unexpected")
    wm = Waymark(base / "home")
    wm.run("user", "add", "admin", "--role", "administrator", "--password-stdin",
           input=PASSWORD + "\n").ok()
    token: str = wm.json("token", "create", "t", "--user", "admin")["token"]
    wm("vm", "create", "u", "--disk", "1M", "--memory", "128M")
    log = base / "serve.log"
    with serve_process(wm, log=log, env={"WAYMARK_FAILPOINT_RAISE": "commit"}) as url:
        yield Server(wm, url, token, log)


def internal(body: dict[str, Any]) -> str:
    """The envelope of an unexpected failure; its incident id (named in the message)."""
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert (error["code"], error["kind"], error["exit_code"]) == \
        ("internal", "WaymarkError", 1), error
    named = re.search(r"\(incident ([0-9a-f]{8})\)", error["message"])
    assert named is not None, error
    assert error["hint"] and "administrator" in error["hint"], error
    return named[1]


def test_an_unexpected_exception_is_the_envelope_logged_and_audited(server: Server) -> None:
    resp = server.call("POST", "/api/vms/u/checkpoints", json={"name": "boom"})
    assert resp.status_code == 500, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["x-content-type-options"] == "nosniff"  # the security headers too
    incident = internal(resp.json())
    assert resp.json()["error"]["details"] == {"incident": incident}
    for secret in ("Traceback", "RuntimeError", "failpoint", str(server.wm.home), ".py"):
        assert secret not in resp.text, resp.text

    log = server.log.read_text()
    assert f"incident {incident}" in log and "Traceback" in log, log
    assert "RuntimeError: failpoint 'commit' raised" in log, log

    newest = server.call("GET", "/api/audit", params={"limit": 1}).json()[0]
    assert (newest["action"], newest["status"], newest["outcome"], newest["user_name"]) == \
        ("POST /api/vms/{vm}/checkpoints", 500, "failed", "admin"), newest
    assert "RuntimeError" in newest["message"] and incident in newest["message"], newest

    assert server.call("GET", "/api/vms").status_code == 200  # the server goes on


def test_the_cli_through_the_server_prints_the_same_envelope(server: Server) -> None:
    result = server.wm.run("--server", server.url, "--token", server.token, "checkpoint",
                           "create", "u", "--name", "boom2", "--json")
    assert result.returncode == 1, result
    internal(json.loads(result.stdout))
    assert "failed unexpectedly" in result.stderr, result
