"""A running VM's serial console over HTTP: its output as server-sent events (read from the
serial log QEMU writes), and lines of input sent to its console socket. Connecting needs the
``start-stop`` permission (administrators: always)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from waymark.api import logfeed, schemas, streams
from waymark.catalog.models import Vm
from waymark.engine.context import Context
from waymark.engine.running import presence
from waymark.errors import Conflict, NotFound
from waymark.http.security import CallerDep, ContextDep, require_vm, vm_for
from waymark.model.policy import Principal
from waymark.qemu import sockets

router = APIRouter(tags=["console"], route_class=schemas.Route)
TAIL = 8192  # bytes of earlier output a new reader gets
QUIET, LONGEST = 3.0, 20.0
WAKE = 1.0  # s at most between two checks of the caller while the log is quiet


async def _output(watch: streams.Watch, feeds: logfeed.LogFeeds, path: Path,
                  offset: int | None) -> AsyncIterator[str]:
    """``output`` events with the log's new text; ``end`` (with the offset to go on from)
    after :data:`QUIET` s without output or :data:`LONGEST` s in all, so no stream is left
    open: the page asks again from that offset. The text comes from the log's one reader
    (:class:`waymark.api.logfeed.LogFeeds`, woken by the kernel when the log is written);
    the stream reads the file itself only to catch up to where that reader had got. The
    caller is checked again as every stream's is (:mod:`waymark.api.streams`)."""
    sub = feeds.subscribe(path)
    try:
        at = max(sub.start - TAIL, 0) if offset is None else min(offset, sub.start)
        for piece in await asyncio.to_thread(list, logfeed.read(path, at, sub.start)):
            at += len(piece)
            yield _text(piece, at)
        started = last = time.monotonic()
        while (left := min(QUIET - (time.monotonic() - last),
                           LONGEST - (time.monotonic() - started))) > 0:
            await watch.current()
            try:
                begin, piece = await asyncio.wait_for(sub.queue.get(), min(left, WAKE))
            except TimeoutError:
                continue
            fresh = piece[max(at - begin, 0):]
            if fresh:
                at, last = begin + len(piece), time.monotonic()
                yield _text(fresh, at)
        yield f"event: end\ndata: {json.dumps({'offset': at})}\n\n"
    finally:
        feeds.leave(sub)


def _text(piece: bytes, at: int) -> str:
    text = piece.decode(errors="replace").replace("\r", "")
    return f"event: output\ndata: {json.dumps({'text': text, 'offset': at})}\n\n"


@router.get("/vms/{vm}/console/events", response_class=StreamingResponse,
            responses=schemas.EVENT_STREAM)
def console_events(vm: str, request: Request, caller: CallerDep, ctx: ContextDep,
                   offset: int | None = None) -> StreamingResponse:
    """The serial console's output from ``offset`` (default: its last 8 KiB); ``revoked``
    ends it when the caller may no longer use the console."""
    row = vm_for(ctx, caller.who, "vm.power", vm)
    log = presence.run_files(ctx, row.id).serial_log
    feeds = request.app.state.streams.consoles
    return streams.open_stream(request, caller.who,
                               lambda watch: _output(watch, feeds, log, offset),
                               scope=lambda who: may_still(ctx, who, row.id))


def may_still(ctx: Context, who: Principal, vm_id: str) -> None:
    """The console's check, again: the VM is still there and the caller may still use it."""
    with ctx.catalog.session() as session:
        row = session.get(Vm, vm_id)
        if row is None:
            raise NotFound("the VM is gone.")
        session.expunge(row)
    require_vm(who, row, "vm.power")


class Line(BaseModel):
    text: str = Field(max_length=4096, description="Sent as typed; add \\n to end a line.")


@router.post("/vms/{vm}/console/input", response_model=schemas.ConsoleSent)
def console_input(vm: str, body: Line, caller: CallerDep, ctx: ContextDep) -> dict[str, int]:
    """Type into the serial console (refused while someone is attached to it)."""
    row = vm_for(ctx, caller.who, "vm.power", vm)
    if presence.observed_state(ctx, row.id, row.state) not in presence.LIVE_STATES:
        raise Conflict(f"VM {row.name!r} is not running: its console is closed.")
    path = presence.run_files(ctx, row.id).console
    try:
        with socket.socket(socket.AF_UNIX) as sock, sockets.address(path) as where:
            sock.settimeout(5.0)
            sock.connect(where)
            sock.sendall(body.text.encode())
    except OSError as err:
        raise Conflict(f"cannot reach the console of {row.name!r}: {err.strerror or err}.",
                       hint="Someone may be attached to it (waymark vm console).") from err
    return {"sent": len(body.text.encode())}
