"""QEMU's block jobs (commit, stream, backup) and block nodes as Waymark handles them: jobs are
followed by id, with progress, and cancelled cleanly when the caller gives up.

Jobs are started with ``auto-dismiss: false`` so their end (and error) can be read; they are
polled with ``query-jobs`` (``current-progress / total-progress``) every :data:`POLL` seconds.

A job that copies while the guest runs (a live merge) can yield to the guest's own writes
(:class:`GuestShare`): under TCG QEMU's main loop, its thread pool and the host's disk serve
both the job's copy and every disk's guest requests (no iothread), so a job copying at full
speed made a guest's ``dd conv=fsync`` 1.7-1.9x slower. While the guest writes, the job is
held to :data:`GUEST_SHARE_SPEED` (``block-job-set-speed``); once it has been quiet for
:data:`GUEST_QUIET` seconds the limit is lifted, so a merge under an idle guest copies at full
speed. The limit only paces the copy: what the job writes, and when it may be killed, are
unchanged.
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
GUEST_SHARE_SPEED = 96 * 1024 * 1024  # bytes/s a job copies while the guest writes
GUEST_BUSY_BYTES = 256 * 1024  # the guest wrote this much since the last poll: it is writing
GUEST_QUIET = 0.5  # seconds without guest writes before the job copies at full speed again
JobBytes = Callable[[str, int, int], None] | None  # (job id, bytes done, bytes in all)
Concluded = Callable[[dict[str, Any]], Awaitable[None]]


class GuestShare:
    """Whether a job should yield to the guest, from the bytes the guest's disks have written
    so far (pure: fed by :func:`follow`, which sets the job's speed when the answer changes).
    """

    def __init__(self) -> None:
        self.written: int | None = None
        self.busy_at = float("-inf")

    def yields(self, written: int, now: float) -> bool:
        """Given the guest's bytes written in all at ``now`` (seconds): whether it wrote at
        least :data:`GUEST_BUSY_BYTES` since the last call within the last :data:`GUEST_QUIET`
        seconds."""
        if self.written is not None and written - self.written >= GUEST_BUSY_BYTES:
            self.busy_at = now
        self.written = written
        return now - self.busy_at < GUEST_QUIET


async def guest_written(machine: qmp.Qmp) -> int:
    """Bytes the guest has written to all its disks (``query-blockstats`` of the devices: a
    job's own writes go through nodes no device names, so they are not counted)."""
    return sum(int(found.get("stats", {}).get("wr_bytes", 0))
               for found in await machine.command("query-blockstats"))


async def _share(machine: qmp.Qmp, job: str, share: GuestShare, speed: int | None) -> int:
    """The job's speed after this poll: :data:`GUEST_SHARE_SPEED` while the guest writes,
    0 (none) otherwise; ``speed`` None (unknown: a job resumed after Waymark died) is set."""
    wanted = GUEST_SHARE_SPEED if share.yields(await guest_written(machine),
                                               asyncio.get_running_loop().time()) else 0
    if wanted != speed:
        await machine.command("block-job-set-speed", device=job, speed=wanted)
    return wanted


async def find(machine: qmp.Qmp, job: str) -> dict[str, Any] | None:
    for found in await machine.command("query-jobs"):
        if found["id"] == job:
            return dict(found)
    return None


async def follow(machine: qmp.Qmp, job: str, on_progress: Progress,
                 before_complete: BeforeComplete = None, on_bytes: Bytes = None,
                 share: GuestShare | None = None, speed: int | None = 0) -> dict[str, Any]:
    """Until the job concludes: complete it when READY (``before_complete`` first), dismiss
    it, raise its error; the job as it concluded (``total-progress``: the bytes it had to
    copy). Its progress goes to ``on_progress`` (a fraction) and ``on_bytes`` (done, total).
    With ``share``, the job yields to the guest's writes while it runs (``speed``: its speed
    now, None if unknown). If either callback raises (a cancelled Waymark job), QEMU's job is
    cancelled first."""
    try:
        return await _follow(machine, job, on_progress, before_complete, on_bytes, share,
                             speed)
    except BaseException:
        await abandon(machine, job)
        raise


async def _follow(machine: qmp.Qmp, job: str, on_progress: Progress,
                  before_complete: BeforeComplete, on_bytes: Bytes = None,
                  share: GuestShare | None = None, speed: int | None = 0) -> dict[str, Any]:
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
        if share is not None and found["status"] == "running":
            speed = await _share(machine, job, share, speed)
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
