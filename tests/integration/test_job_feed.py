"""The reader the API's job streams share (:class:`waymark.api.streams.JobFeed`), on a real
catalog: a job the server's own process writes wakes it at once (an in-process notification,
:data:`waymark.engine.jobs.CHANGES`), with its look at the catalog an hour apart, so nothing
else could have; a job another process changes (the CLI, in a process of its own) is seen at
its next look, which reads the catalog only when something was committed: while nothing
changes, it reads nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Waymark
from waymark import wiring
from waymark.api.streams import JobFeed
from waymark.config import Settings
from waymark.engine import jobs
from waymark.engine.context import Context

HOUR = 3600.0
PATIENCE = 60.0  # s a reading may take on a loaded machine (never near the hour)


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[tuple[Waymark, Context, str]]:
    wm = Waymark(tmp_path / "home")
    vm_id = wm.json("vm", "create", "v", "--disk", "1M")["id"]
    ctx = wiring.open_context(Settings(home=wm.home))
    try:
        yield wm, ctx, vm_id
    finally:
        ctx.catalog.close()


def job_rows(feed: JobFeed) -> dict[str, dict[str, Any]]:
    assert feed.latest is not None
    return {job["id"]: job for job in feed.latest.jobs}


async def next_reading(feed: JobFeed, wake: asyncio.Event) -> dict[str, dict[str, Any]]:
    await asyncio.wait_for(wake.wait(), PATIENCE)
    wake.clear()
    return job_rows(feed)


def test_a_job_the_server_writes_wakes_the_streams_at_once(
        opened: tuple[Waymark, Context, str]) -> None:
    _, ctx, vm_id = opened
    feed = JobFeed(ctx, poll=HOUR)

    async def scenario() -> dict[str, dict[str, Any]]:
        wake = asyncio.Event()
        feed.listen(wake)
        try:
            assert await next_reading(feed, wake) == {}
            job_id = await asyncio.to_thread(jobs.submit, ctx, vm_id, "merge", {},
                                             run_here=False, user="test")
            rows = await next_reading(feed, wake)
            assert list(rows) == [job_id]
            await asyncio.to_thread(jobs.cancel, ctx, job_id)
            return await next_reading(feed, wake)
        finally:
            feed.leave(wake)

    (job,) = asyncio.run(scenario()).values()
    assert job["status"] == "cancelled"


def test_another_process_s_change_is_seen_and_nothing_is_read_while_nothing_changes(
        opened: tuple[Waymark, Context, str], monkeypatch: pytest.MonkeyPatch) -> None:
    wm, ctx, vm_id = opened
    job_id = jobs.submit(ctx, vm_id, "merge", {}, run_here=False, user="test")
    feed = JobFeed(ctx, poll=0.05)
    readings: list[int] = []
    read = feed._read

    def counted() -> Any:
        readings.append(1)
        return read()

    monkeypatch.setattr(feed, "_read", counted)

    async def scenario() -> dict[str, dict[str, Any]]:
        wake = asyncio.Event()
        feed.listen(wake)
        try:
            assert (await next_reading(feed, wake))[job_id]["status"] == "queued"
            await asyncio.sleep(1.0)  # 20 looks at the catalog, no change
            assert len(readings) == 1, "the feed read the catalog while nothing changed"
            written = jobs.CHANGES.count
            cancelled = await asyncio.to_thread(wm.run, "job", "cancel", job_id, "--json",
                                                separate=True)
            assert cancelled.returncode == 0, cancelled
            rows = await next_reading(feed, wake)
            assert jobs.CHANGES.count == written  # not this process's write: the look saw it
            return rows
        finally:
            feed.leave(wake)

    assert asyncio.run(scenario())[job_id]["status"] == "cancelled"
