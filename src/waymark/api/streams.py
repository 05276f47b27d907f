"""Server-sent event streams that end when access does (docs/api.md, "Event streams").

Every stream (all jobs, one job, a VM's console):

- takes one of its user's slots: at most ``max_streams`` open at once per user, more are 429;
- re-checks its caller every :data:`RECHECK` s, as a new request would be checked (the session
  or token, the user, and the stream's own scope check): once that fails, it sends ``revoked``
  (``{"message"}``: do not reconnect) and ends;
- ends after ``lifetime`` s with ``expired`` (``{"reconnect": true}``); an EventSource reconnects
  by itself (after the ``retry`` it was sent), other clients ask again.

The consoles' streams share one reader per serial log, woken by the kernel when it is written
(:class:`waymark.api.logfeed.LogFeeds`). The jobs' streams share one reader of the catalog
(:class:`JobFeed`): while any stream listens, a thread reads the jobs and the VMs' owners
when they may have changed, and wakes the streams when what it read did change; each stream
filters the latest reading by its caller's scope, so a stream costs the server no catalog
reads of its own between re-checks. The server's own job
writes (a job submitted or cancelled through the API: :data:`waymark.engine.jobs.CHANGES`) wake
the reader at once; writes of other processes (a job's worker, the CLI) are noticed by a look
every :data:`POLL` s that reads no table (:meth:`waymark.catalog.db.Catalog.watch`): the
catalog is read again only after something was committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from waymark.api import logfeed
from waymark.engine import jobs
from waymark.engine.context import Context
from waymark.errors import TooManyStreams, WaymarkError
from waymark.http import security
from waymark.model.policy import Principal

log = logging.getLogger(__name__)
POLL = 0.2  # s between two looks for other processes' writes (one reader for every stream)
RECHECK = 5.0  # s between two checks of a stream's caller
RETRY_MS = 1000  # how soon an EventSource reconnects after ``expired``
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


class StreamEnds(Exception):
    """The stream ends with ``text`` (its last event)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def revoked(err: WaymarkError) -> StreamEnds:
    """The end of a stream whose caller may no longer see what it shows."""
    return StreamEnds(event("revoked", {"message": err.message}))


@dataclass(frozen=True)
class Reading:
    """One reading of the catalog: the jobs (unfinished and the last finished) and each VM's
    owner."""

    number: int
    jobs: list[dict[str, Any]]
    owners: dict[str, str | None]


class JobFeed:
    """One thread that reads the jobs while any stream listens, when this process wrote a job
    or the catalog changed (looked at every ``poll`` s), and wakes the listening streams when
    what it read changed (between changes they sleep)."""

    def __init__(self, ctx: Context, poll: float = POLL) -> None:
        self.ctx, self.poll = ctx, poll
        self._lock = threading.Lock()
        self._listeners: dict[asyncio.Event, asyncio.AbstractEventLoop] = {}
        self._reader: threading.Thread | None = None
        self.latest: Reading | None = None

    def listen(self, wake: asyncio.Event) -> None:
        """Set ``wake`` (an event of the running loop) at each new reading."""
        with self._lock:
            self._listeners[wake] = asyncio.get_running_loop()
            if self._reader is None:
                self._reader = threading.Thread(target=self._run, name="job-feed", daemon=True)
                self._reader.start()

    def leave(self, wake: asyncio.Event) -> None:
        with self._lock:
            self._listeners.pop(wake, None)

    def _run(self) -> None:
        number, last, stale, seen = 0, None, True, jobs.CHANGES.count
        with contextlib.closing(self.ctx.catalog.watch()) as catalog:
            while self._listening():
                if catalog.changed() or stale:  # (this process's writes change it too)
                    now = self._read()
                    stale = now is None  # a failed reading is tried again at the next look
                    if now is not None and now != last:
                        number, last = number + 1, now
                        self.latest = Reading(number, *now)
                        self._wake()
                seen = jobs.CHANGES.wait(seen, self.poll)

    def _listening(self) -> bool:
        """Whether any stream listens; when none does, the reader ends (the next listener
        starts another)."""
        with self._lock:
            if not self._listeners:
                self._reader, self.latest = None, None
            return bool(self._listeners)

    def _read(self) -> tuple[list[dict[str, Any]], dict[str, str | None]] | None:
        try:
            return jobs.listing(self.ctx), jobs.vm_owners(self.ctx)
        except Exception as err:  # (the one reader must outlive a bad reading)
            log.warning("reading the jobs for the event streams failed: %s", err)
            return None

    def _wake(self) -> None:
        with self._lock:
            listening = list(self._listeners.items())
        for wake, loop in listening:
            with contextlib.suppress(RuntimeError):  # its loop is closed: it is leaving
                loop.call_soon_threadsafe(wake.set)


class Streams:
    """The open event streams: slots per user, their lifetime, and the shared job feed."""

    def __init__(self, ctx: Context, max_streams: int, lifetime: float) -> None:
        self.max_streams, self.lifetime = max_streams, lifetime
        self.feed = JobFeed(ctx)
        self.consoles = logfeed.LogFeeds()
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, who: Principal) -> Callable[[], None]:
        """A slot of ``who``'s, or 429; returns what gives it back."""
        with self._lock:
            count = self._open.get(who.user_id, 0)
            if count >= self.max_streams:
                raise TooManyStreams(
                    f"{who.name} has {count} event streams open, the most one user may have.",
                    hint="Close one (another tab or client), then connect again.")
            self._open[who.user_id] = count + 1
        given = threading.Event()

        def give_back() -> None:
            if given.is_set():
                return
            given.set()
            with self._lock:
                self._open[who.user_id] -= 1

        return give_back


@dataclass
class Watch:
    """A stream's caller, checked again every :data:`RECHECK` s (``scope``: the stream's own
    check, which raises when the caller may no longer see what it shows), until the stream's
    lifetime is over."""

    request: Request
    who: Principal
    lifetime: float
    scope: Callable[[Principal], object] = lambda who: None
    started: float = field(default_factory=time.monotonic)
    # the first check comes at a random moment, so that streams opened together (a reconnecting
    # crowd) are not all checked at once
    checked: float = field(default_factory=lambda: time.monotonic() - random.uniform(0, RECHECK))

    async def current(self) -> Principal:
        """The caller as now allowed; raises :class:`StreamEnds` when the stream is over."""
        moment = time.monotonic()
        if moment - self.started >= self.lifetime:
            raise StreamEnds(f"retry: {RETRY_MS}\n" + event("expired", {
                "reconnect": True, "lifetime_seconds": self.lifetime}))
        if moment - self.checked >= RECHECK:
            self.checked = moment
            try:
                self.who = await run_in_threadpool(self._recheck)
            except WaymarkError as err:
                raise revoked(err) from None
        return self.who

    def _recheck(self) -> Principal:
        who = security.caller(self.request).who
        self.scope(who)
        return who


async def guarded(source: AsyncIterator[str]) -> AsyncIterator[str]:
    """``source``'s events, then the one that ended it early (expired, revoked)."""
    try:
        async for text in source:
            yield text
    except StreamEnds as end:
        yield end.text


class EventStream(StreamingResponse):
    """A stream of server-sent events that gives its user's slot back however it ends (also
    when it never started: the client left first)."""

    def __init__(self, source: AsyncIterator[str], give_back: Callable[[], None]) -> None:
        super().__init__(guarded(source), media_type="text/event-stream", headers=HEADERS)
        self.give_back = give_back

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.give_back()


def open_stream(request: Request, who: Principal, source: Callable[[Watch], AsyncIterator[str]],
                scope: Callable[[Principal], object] = lambda who: None) -> EventStream:
    """A stream of ``source``'s events in one of ``who``'s slots (429 when none is free)."""
    streams: Streams = request.app.state.streams
    give_back = streams.take(who)
    return EventStream(source(Watch(request, who, streams.lifetime, scope)), give_back)
