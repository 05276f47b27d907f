"""``GET /api/vms`` keeps the catalog's rows between requests
(:class:`waymark.usecases.views.VmEntries`) and reads them again only after a commit: a change
another process makes (the CLI) shows in the very next answer; while nothing changes, a listing
reads nothing; each caller still sees only the VMs in their scope."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import Waymark, served
from waymark import wiring
from waymark.catalog.reads import Reader
from waymark.config import Settings
from waymark.engine.reading import Source
from waymark.usecases import views


def names(http: httpx.Client) -> dict[str, tuple[str, int]]:
    resp = http.get("/api/vms")
    assert resp.status_code == 200, resp.text
    return {vm["name"]: (vm["state"], vm["checkpoint_count"]) for vm in resp.json()}


def test_the_listing_shows_another_processs_change_in_the_next_answer(tmp_path: Path) -> None:
    wm = Waymark(tmp_path / "home")
    wm("vm", "create", "a", "--disk", "1M")
    with served(wm) as (url, token), httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        assert names(http) == {"a": ("off", 0)}
        assert names(http) == {"a": ("off", 0)}  # (kept)
        wm("vm", "create", "b", "--disk", "1M")
        assert names(http) == {"a": ("off", 0), "b": ("off", 0)}
        wm("checkpoint", "create", "b", "--name", "one")
        assert names(http) == {"a": ("off", 0), "b": ("off", 1)}
        wm("vm", "rename", "a", "c")
        assert names(http) == {"b": ("off", 1), "c": ("off", 0)}
        wm("vm", "delete", "b", "--yes")
        assert names(http) == {"c": ("off", 0)}

        # a self-service user sees their scope only, from the same kept rows
        wm.run("user", "add", "sam", "--role", "self-service", "--password-stdin",
               input="sam-password-1\n").ok()
        wm("user", "grant", "sam", "--vm", "c", "--permission", "checkpoint")
        own = wm.json("token", "create", "t", "--user", "sam")["token"]
        wm("vm", "create", "d", "--disk", "1M")
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {own}"},
                          timeout=60) as sams:
            assert names(sams) == {"c": ("off", 0)}
        assert names(http) == {"c": ("off", 0), "d": ("off", 0)}


class Counted:
    """A source whose snapshots are counted."""

    def __init__(self, source: Source) -> None:
        self.source, self.snapshots = source, 0

    @property
    def home(self) -> Path:
        return self.source.home

    def reading(self) -> AbstractContextManager[Reader]:
        self.snapshots += 1
        return self.source.reading()


def test_kept_rows_are_read_again_only_after_a_commit(tmp_path: Path) -> None:
    wm = Waymark(tmp_path / "home")
    wm("vm", "create", "a", "--disk", "1M")
    ctx = wiring.open_context(Settings(home=wm.home))
    watch = ctx.catalog.watch()
    try:
        source = Counted(ctx)
        entries = views.VmEntries(source, watch.changed)
        listed: list[list[dict[str, Any]]] = [views.vm_list(source, entries=entries)
                                              for _ in range(5)]
        assert source.snapshots == 1 and [r["name"] for r in listed[-1]] == ["a"]
        wm("vm", "create", "b", "--disk", "1M")
        assert [r["name"] for r in views.vm_list(source, entries=entries)] == ["a", "b"]
        assert source.snapshots == 2
        assert views.vm_list(source, lambda row: row.name == "b", entries)[0]["name"] == "b"
        assert source.snapshots == 2
    finally:
        watch.close()
        ctx.catalog.close()
