"""A running VM's graphical console over a WebSocket: the bytes of its VNC server (RFB), both
ways, for the portal's noVNC (``/vms/NAME/display``) or any RFB-over-WebSocket client.

Opening it is checked as every API call is (a session cookie or an API token), needs the
``start-stop`` permission on the VM (``vm.power``, as the serial console), and, for a browser,
the page's ``Origin`` must be this server's own (:func:`waymark.http.security.same_origin`:
a browser sends the cookie with a WebSocket any site opens). A refusal is answered before the
WebSocket is accepted: an HTTP error with the usual JSON envelope (a plain 403 where the server
cannot send a body). The audit log records every connection and every refusal.

Once open: a message from the client is at most :data:`MAX_MESSAGE` bytes (larger: closed
1009); the caller is checked again every :data:`RECHECK` s (a revoked session, a removed
grant: closed 1008); it takes one of its user's event-stream slots; it ends when the VM stops
(its VNC server goes away: closed 1000).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from waymark.api import console, streams
from waymark.engine.context import Context
from waymark.errors import TooLarge, WaymarkError, envelope
from waymark.http import limits, security
from waymark.usecases.access import audit
from waymark.usecases.vms import display

log = logging.getLogger(__name__)
router = APIRouter(tags=["console"])
ROUTE = "/vms/{vm}/display"
MAX_MESSAGE = limits.MAX_WEBSOCKET_MESSAGE
RECHECK = streams.RECHECK
CHUNK = 64 * 1024  # bytes read from the VNC server at once
POLICY, TOO_BIG, NORMAL = 1008, 1009, 1000  # WebSocket close codes


@dataclass(frozen=True)
class Opened:
    """An accepted display connection: the VM, its VNC server's socket, and what gives the
    caller's slot back."""

    ctx: Context
    vm_id: str
    vnc: socket.socket
    give_back: Callable[[], None]


@router.websocket(ROUTE)
async def display_socket(websocket: WebSocket, vm: str) -> None:
    """The VM's screen, keyboard and mouse: RFB (VNC) over this WebSocket, binary messages
    (the ``binary`` sub-protocol when asked)."""
    try:
        opened = await run_in_threadpool(_open, websocket, vm)
    except WaymarkError as err:
        await _refuse(websocket, vm, err)
        return
    await _record(websocket, vm, 101, None)
    try:
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol="binary" if "binary" in offered else None)
        code, reason = await _relay(websocket, opened)
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close(code=code, reason=reason)
    finally:
        opened.vnc.close()
        opened.give_back()


def _open(websocket: WebSocket, vm: str) -> Opened:
    """The checks, in order (each refusal an error): who calls, from where, on which VM, with
    which permission; then the connection to the VM's VNC server and a slot."""
    ctx: Context = websocket.app.state.ctx
    found = security.connection_caller(websocket)
    security.same_origin(websocket, found)
    row = security.vm_for(ctx, found.who, "vm.power", vm)
    registry: streams.Streams = websocket.app.state.streams
    give_back = registry.take(found.who)
    try:
        vnc = display.open_vnc(ctx, row.id)
    except BaseException:
        give_back()
        raise
    return Opened(ctx, row.id, vnc, give_back)


async def _refuse(websocket: WebSocket, vm: str, err: WaymarkError) -> None:
    """Answer a refused handshake with the error (before accepting), and audit it."""
    found = getattr(websocket.state, "caller", None)
    shown_message, shown_hint = err.message, err.hint
    if found is None or not found.who.admin:
        shown_message = security.hide_host_paths(err.message)
        shown_hint = err.hint and security.hide_host_paths(err.hint)
    await _record(websocket, vm, err.http_status, err.message,
                  refused=isinstance(err, security.OutOfScope))
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse(
            envelope(err, message=shown_message, hint=shown_hint), status_code=err.http_status))
    else:  # the server answers a close before accepting with a plain 403
        await websocket.close(code=POLICY, reason=shown_message[:120])


async def _record(websocket: WebSocket, vm: str, status: int, message: str | None, *,
                  refused: bool = False) -> None:
    found = getattr(websocket.state, "caller", None)
    entry = audit.Entry(
        method="WS", status=status, action=f"WS /api{ROUTE}", refused=refused,
        user=found.who.name if found else None, role=found.who.role if found else None,
        via=found.via if found else "none",
        client=websocket.client.host if websocket.client else None,
        target={"vm": vm}, message=message)
    try:
        await run_in_threadpool(websocket.app.state.audit.record, websocket.app.state.ctx,
                                entry, anonymous=found is None)
    except WaymarkError as err:  # the connection's outcome stands; say it was not recorded
        log.error("could not write the audit log: %s", err.message)


async def _relay(websocket: WebSocket, opened: Opened) -> tuple[int, str]:
    """Bytes both ways until one side ends or the caller may no longer use the console: the
    close code and reason to send."""
    reader, writer = await asyncio.open_unix_connection(sock=opened.vnc)
    tasks = {asyncio.ensure_future(_to_browser(websocket, reader)),
             asyncio.ensure_future(_to_vm(websocket, writer)),
             asyncio.ensure_future(_watch(websocket, opened))}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        writer.close()
    first = done.pop()
    if first.cancelled() or first.exception() is not None:
        error = None if first.cancelled() else first.exception()
        if isinstance(error, TooLarge):
            return TOO_BIG, error.message[:120]
        if isinstance(error, WaymarkError):
            return POLICY, security.hide_host_paths(error.message)[:120]
        return NORMAL, "the connection ended"
    code, reason = first.result()
    return code, reason


async def _to_browser(websocket: WebSocket, reader: asyncio.StreamReader) -> tuple[int, str]:
    while data := await reader.read(CHUNK):
        await websocket.send_bytes(data)
    return NORMAL, "the VM's display closed (the VM stopped)"


async def _to_vm(websocket: WebSocket, writer: asyncio.StreamWriter) -> tuple[int, str]:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return NORMAL, "the viewer left"
        data = message.get("bytes") or (message.get("text") or "").encode()
        if len(data) > MAX_MESSAGE:
            raise TooLarge(f"a message of {len(data)} bytes is more than the display takes "
                           f"({MAX_MESSAGE}).")
        writer.write(data)
        await writer.drain()


async def _watch(websocket: WebSocket, opened: Opened) -> tuple[int, str]:
    """Check the caller again every :data:`RECHECK` s, as a new request would be checked;
    raises the refusal when that fails."""
    while True:
        await asyncio.sleep(RECHECK)
        found = await run_in_threadpool(security.connection_caller, websocket)
        await run_in_threadpool(console.may_still, opened.ctx, found.who, opened.vm_id)
