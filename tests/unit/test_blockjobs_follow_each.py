"""``blockjobs.follow_each``: backup jobs followed by QEMU's JOB_STATUS_CHANGE events, against
a fake machine: each job handed over as it ends, in the order they end, dismissed first; a
job's error raised; the others' progress reported while no job ends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from waymark.errors import ToolError
from waymark.qemu import blockjobs


class FakeListener:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def conclude(self, job: str) -> None:
        self.queue.put_nowait({"event": "JOB_STATUS_CHANGE",
                               "data": {"id": job, "status": "concluded"}})

    async def get(self) -> dict[str, Any]:
        return await self.queue.get()


class FakeMachine:
    """QEMU's jobs as ``query-jobs`` shows them; remembers the commands it was sent."""

    label = "fake"

    def __init__(self, jobs: dict[str, dict[str, Any]]) -> None:
        self.jobs = jobs
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def command(self, name: str, /, **arguments: Any) -> Any:
        self.sent.append((name, arguments))
        if name == "query-jobs":
            return [{"id": job, **state} for job, state in self.jobs.items()]
        if name == "job-dismiss":
            del self.jobs[arguments["id"]]
        return {}


def job(status: str = "running", done: int = 0, total: int = 100, **more: Any
        ) -> dict[str, Any]:
    return {"status": status, "current-progress": done, "total-progress": total, **more}


async def follow(machine: FakeMachine, listener: FakeListener, jobs: list[str],
                 progress: list[tuple[str, int, int]] | None = None) -> list[str]:
    ended: list[str] = []

    async def concluded(found: dict[str, Any]) -> None:
        assert found["id"] not in machine.jobs  # dismissed before it is handed over
        ended.append(found["id"])

    await blockjobs.follow_each(machine, listener, jobs,  # type: ignore[arg-type]
                                concluded, on_bytes=None if progress is None
                                else lambda *p: progress.append(p))
    return ended


def test_each_job_is_handed_over_as_it_ends_in_the_order_they_end() -> None:
    machine = FakeMachine({"a": job("concluded", 100), "b": job("concluded", 100),
                           "other": job()})

    async def run() -> list[str]:
        listener = FakeListener()
        listener.conclude("other")  # not one of ours: ignored
        listener.conclude("b")
        listener.conclude("a")
        return await follow(machine, listener, ["a", "b"])

    assert asyncio.run(run()) == ["b", "a"]
    assert [a["id"] for n, a in machine.sent if n == "job-dismiss"] == ["b", "a"]
    assert "other" in machine.jobs


def test_a_job_that_failed_is_dismissed_and_raised() -> None:
    machine = FakeMachine({"a": job("concluded", 10, error="Input/output error")})

    async def run() -> list[str]:
        listener = FakeListener()
        listener.conclude("a")
        return await follow(machine, listener, ["a"])

    with pytest.raises(ToolError, match="Input/output error"):
        asyncio.run(run())
    assert machine.jobs == {}


def test_while_no_job_ends_the_others_progress_is_reported(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blockjobs, "REPORT_EVERY", 0.01)
    machine = FakeMachine({"a": job(done=30), "b": job(done=60)})
    progress: list[tuple[str, int, int]] = []

    async def run() -> list[str]:
        listener = FakeListener()

        async def later() -> None:
            await asyncio.sleep(0.05)
            machine.jobs["a"] = job("concluded", 100)
            listener.conclude("a")
            await asyncio.sleep(0.05)
            machine.jobs["b"] = job("concluded", 100)
            listener.conclude("b")

        ending = asyncio.ensure_future(later())
        ended = await follow(machine, listener, ["a", "b"], progress)
        await ending
        return ended

    assert asyncio.run(run()) == ["a", "b"]
    assert ("a", 30, 100) in progress and ("b", 60, 100) in progress
    after_a = progress[progress.index(("a", 30, 100)):]
    assert ("b", 60, 100) in after_a and progress[-1] == ("b", 60, 100)
