"""QEMU's block jobs (commit, stream, backup) and block nodes as Waymark handles them: jobs are
followed by id, with progress, and cancelled cleanly when the caller gives up.

Jobs are started with ``auto-dismiss: false`` so their end (and error) can be read; they are
polled with ``query-jobs`` (``current-progress / total-progress``) every :data:`POLL` seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from waymark.errors import ToolError, tool_failed
from waymark.qemu import qmp

POLL = 0.05
JOB_TIMEOUT = 24 * 3600.0
Progress = Callable[[float], None] | None
Bytes = Callable[[int, int], None] | None  # (bytes done, bytes in all) of a job, as QEMU counts
BeforeComplete = Callable[[], Awaitable[None]] | None


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
