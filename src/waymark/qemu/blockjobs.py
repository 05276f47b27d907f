"""QEMU's block jobs (commit, stream, backup) and block nodes as Waymark handles them: jobs are
followed by id, with progress, and cancelled cleanly when the caller gives up.

Jobs are started with ``auto-dismiss: false`` so their end (and error) can be read; they are
polled with ``query-jobs`` (``current-progress / total-progress``) every :data:`POLL` seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from qemu.qmp import EventListener

from waymark.errors import ToolError, tool_failed
from waymark.qemu import qmp

POLL = 0.05
REPORT_EVERY = 0.25  # progress of jobs followed by their events (:func:`follow_each`)
JOB_TIMEOUT = 24 * 3600.0
Progress = Callable[[float], None] | None
Bytes = Callable[[int, int], None] | None  # (bytes done, bytes in all) of a job, as QEMU counts
BeforeComplete = Callable[[], Awaitable[None]] | None
JobBytes = Callable[[str, int, int], None] | None  # (job id, bytes done, bytes in all)
Concluded = Callable[[dict[str, Any]], Awaitable[None]]


async def find(machine: qmp.Qmp, job: str) -> dict[str, Any] | None:
    for found in await machine.command("query-jobs"):
        if found["id"] == job:
            return dict(found)
    return None


async def follow(machine: qmp.Qmp, job: str, on_progress: Progress,
                 before_complete: BeforeComplete = None, on_bytes: Bytes = None
                 ) -> dict[str, Any]:
    """Until the job concludes: complete it when READY (``before_complete`` first), dismiss
    it, raise its error; the job as it concluded (``total-progress``: the bytes it had to
    copy). Its progress goes to ``on_progress`` (a fraction) and ``on_bytes`` (done, total).
    If either raises (a cancelled Waymark job), QEMU's job is cancelled first."""
    try:
        return await _follow(machine, job, on_progress, before_complete, on_bytes)
    except BaseException:
        await abandon(machine, job)
        raise


async def _follow(machine: qmp.Qmp, job: str, on_progress: Progress,
                  before_complete: BeforeComplete, on_bytes: Bytes = None) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + JOB_TIMEOUT
    while loop.time() < deadline:
        found = await find(machine, job)
        if found is None:
            raise ToolError(f"QEMU's job {job} of {machine.label} vanished.")
        if found["status"] != "concluded" and found.get("total-progress"):
            # (a concluded job is done: no cancel point)
            if on_progress is not None:
                on_progress(found["current-progress"] / found["total-progress"])
            if on_bytes is not None:
                on_bytes(int(found["current-progress"]), int(found["total-progress"]))
        if found["status"] == "ready":
            if before_complete is not None:
                await before_complete()
            await machine.command("job-complete", id=job)
        elif found["status"] == "concluded":
            await machine.command("job-dismiss", id=job)
            if found.get("error"):
                raise tool_failed(f"QEMU's {job} of {machine.label} failed: {found['error']}")
            return found
        await asyncio.sleep(POLL)
    raise ToolError(f"QEMU's job {job} of {machine.label} did not end.")


async def follow_each(machine: qmp.Qmp, listener: EventListener, jobs: Collection[str],
                      on_concluded: Concluded, on_bytes: JobBytes = None) -> None:
    """Until every one of ``jobs`` (which never become READY: backups) has concluded, each
    handed to ``on_concluded`` as it ends, in the order they end, dismissed (its error raised
    first): woken by QEMU's ``JOB_STATUS_CHANGE`` events on ``listener``, which the caller
    opened before starting the jobs (so no end is missed), rather than polled, so a short job
    costs no wait. Meanwhile the progress of the others goes to ``on_bytes`` every
    :data:`REPORT_EVERY` seconds. Jobs left unfinished by an error are the caller's to
    :func:`abandon`."""
    waiting = set(jobs)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + JOB_TIMEOUT
    while waiting:
        ended = await _next_end(listener, waiting, REPORT_EVERY)
        if ended is None:
            if loop.time() > deadline:
                raise ToolError(f"QEMU's jobs {', '.join(sorted(waiting))} of {machine.label} "
                                "did not end.")
            await _report(machine, waiting, on_bytes)  # (fails if QEMU is gone)
            continue
        waiting.discard(ended)
        found = await find(machine, ended)
        if found is None:
            raise ToolError(f"QEMU's job {ended} of {machine.label} vanished.")
        await machine.command("job-dismiss", id=ended)
        if found.get("error"):
            raise tool_failed(f"QEMU's {ended} of {machine.label} failed: {found['error']}")
        await on_concluded(found)


async def _next_end(listener: EventListener, jobs: Collection[str], timeout: float
                    ) -> str | None:
    """The id of the next of ``jobs`` to conclude, or None after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    until = loop.time() + timeout
    while (left := until - loop.time()) > 0:
        try:
            event = await asyncio.wait_for(listener.get(), left)
        except TimeoutError:
            return None
        data = dict(event).get("data")
        if isinstance(data, dict) and data.get("status") == "concluded" and data.get("id") in jobs:
            return str(data["id"])
    return None


async def _report(machine: qmp.Qmp, jobs: Collection[str], on_bytes: JobBytes) -> None:
    for found in await machine.command("query-jobs"):
        if (found["id"] in jobs and on_bytes is not None and found["status"] != "concluded"
                and found.get("total-progress")):
            on_bytes(found["id"], int(found["current-progress"]), int(found["total-progress"]))


async def abandon(machine: qmp.Qmp, job: str) -> None:
    """Cancel QEMU's job and dismiss it; nothing to do when QEMU is gone."""
    try:
        found = await find(machine, job)
        if found is None:
            return
        if found["status"] != "concluded":
            await machine.command("job-cancel", id=job)
        while (found := await find(machine, job)) is not None and found["status"] != "concluded":
            await asyncio.sleep(POLL)
        if found is not None:
            await machine.command("job-dismiss", id=job)
    except ToolError:
        pass


async def delete_nodes(machine: qmp.Qmp, names: list[str]) -> None:
    """``blockdev-del`` the format nodes of ``names`` that QEMU still has (a node added with an
    inline file node takes that one with it)."""
    nodes = {n["node-name"] for n in await machine.command("query-named-block-nodes", flat=True)}
    for name in names:
        if name in nodes:
            await machine.command("blockdev-del", **{"node-name": name})
