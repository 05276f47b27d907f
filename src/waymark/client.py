"""A small typed client of the REST API (``httpx``): what ``waymark --server URL`` uses, and
the tests. Each method returns what the API returns, which is what the local CLI prints with
``--json``; an error answer (the one envelope) becomes the same
:class:`~waymark.errors.WaymarkError` class the server raised (so the CLI exits with the same
code as it would locally).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx

from waymark import errors
from waymark.errors import StorageError, WaymarkError

FINISHED = ("completed", "failed", "cancelled")


def _p(ref: str) -> str:
    return quote(ref, safe="")


class Client:
    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 3600.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/") + "/api", headers=headers,
                                 timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, Any] | None = None) -> Any:
        """One request; its JSON, or the server's error raised as a WaymarkError."""
        try:
            response = self.http.request(method, path, json=body, params=params)
        except httpx.HTTPError as err:
            raise StorageError(f"cannot reach the Waymark server {self.http.base_url}: {err}.",
                               hint="Check --server (or WAYMARK_SERVER) and that "
                                    "waymark serve runs there.") from err
        if response.is_success:
            return response.json()
        raise _error(response)

    # --- VMs ----------------------------------------------------------------------------------

    def vm_list(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/vms"))

    def vm_show(self, vm: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/vms/{_p(vm)}"))

    def vm_power(self, vm: str, action: str, **options: Any) -> dict[str, Any]:
        return dict(self.call("POST", f"/vms/{_p(vm)}/{action}", options or None))

    def vm_status(self, vm: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/vms/{_p(vm)}/status"))

    # --- checkpoints --------------------------------------------------------------------------

    def checkpoint_list(self, vm: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/vms/{_p(vm)}/checkpoints"))

    def checkpoint_create(self, vm: str, name: str | None = None, kind: str | None = None,
                          notes: str | None = None) -> dict[str, Any]:
        return dict(self.call("POST", f"/vms/{_p(vm)}/checkpoints",
                              {"name": name, "type": kind, "notes": notes}))

    def checkpoint_show(self, vm: str, ckpt: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/vms/{_p(vm)}/checkpoints/{_p(ckpt)}"))

    def checkpoint_apply(self, vm: str, ckpt: str, mode: str, start: bool = False
                         ) -> dict[str, Any]:
        return dict(self.call("POST", f"/vms/{_p(vm)}/checkpoints/{_p(ckpt)}/apply",
                              {"mode": mode, "start": start}))

    def checkpoint_revert(self, vm: str, mode: str, start: bool = False) -> dict[str, Any]:
        """Apply the VM's current checkpoint (Hyper-V's Revert)."""
        return dict(self.call("POST", f"/vms/{_p(vm)}/revert", {"mode": mode, "start": start}))

    def checkpoint_rename(self, vm: str, ckpt: str, name: str) -> dict[str, Any]:
        return dict(self.call("PATCH", f"/vms/{_p(vm)}/checkpoints/{_p(ckpt)}",
                              {"name": name}))

    def checkpoint_notes(self, vm: str, ckpt: str, notes: str) -> dict[str, Any]:
        """Set a checkpoint's notes ("" clears them)."""
        return dict(self.call("PATCH", f"/vms/{_p(vm)}/checkpoints/{_p(ckpt)}",
                              {"notes": notes}))

    def checkpoint_delete(self, vm: str, match: str, subtree: bool = False, yes: bool = False
                          ) -> dict[str, Any]:
        """Delete what ``match`` names (a name, id prefix or glob); its merge job runs on."""
        return dict(self.call("DELETE", f"/vms/{_p(vm)}/checkpoints",
                              params={"match": match, "subtree": subtree, "yes": yes}))

    # --- accounts -----------------------------------------------------------------------------

    def me(self) -> dict[str, Any]:
        return dict(self.call("GET", "/auth/me"))

    def set_password(self, user: str, password: str, current: str | None = None,
                     keep_tokens: bool = False) -> dict[str, Any]:
        return dict(self.call("PUT", f"/users/{_p(user)}/password",
                              {"password": password, "current_password": current,
                               "keep_tokens": keep_tokens}))

    def forget_sign_in_failures(self, user: str) -> dict[str, Any]:
        return dict(self.call("DELETE", f"/users/{_p(user)}/sign-in-failures"))

    # --- jobs ---------------------------------------------------------------------------------

    def job_list(self, everything: bool = False) -> list[dict[str, Any]]:
        return list(self.call("GET", "/jobs", params={"everything": everything}))

    def job_show(self, job: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/jobs/{_p(job)}"))

    def job_cancel(self, job: str) -> dict[str, Any]:
        return dict(self.call("POST", f"/jobs/{_p(job)}/cancel"))

    def job_events(self, job: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's server-sent events, (kind, data) each, until ``end`` (or the stream's
        ``expired`` or ``revoked``)."""
        with self.http.stream("GET", f"/jobs/{_p(job)}/events") as response:
            if not response.is_success:
                response.read()
                raise _error(response)
            kind = "message"
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    yield kind, json.loads(line[5:])
                    if kind in ("end", "expired", "revoked"):
                        return

    def job_wait(self, job: str, on_progress: Callable[[dict[str, Any]], None] | None = None
                 ) -> dict[str, Any]:
        """Follow the job's events until it ends (again after each stream's lifetime); its
        final description."""
        last: dict[str, Any] | None = None
        expired = True
        while expired:
            expired = False
            for kind, data in self.job_events(job):
                if kind == "job":
                    last = data
                    if on_progress is not None:
                        on_progress(data)
                expired = kind == "expired"
        if last is None or last["status"] not in FINISHED:  # the stream broke: ask once more
            time.sleep(0.1)
            last = self.job_show(job)
        return last


def _error(response: httpx.Response) -> WaymarkError:
    """The server's error envelope as the error it describes (:func:`errors.from_envelope`)."""
    try:
        return errors.from_envelope(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return WaymarkError(f"the server answered {response.status_code}: "
                            f"{response.text[:200]}")
