"""What one request and one user may cost the server: the largest request body, the open event
streams per user and their lifetime (``waymark serve`` options; docs/api.md, "Limits").

The body limit is an ASGI middleware outside everything else: a body declared larger
(``Content-Length``) is refused with 413 before a byte of it is read, and a body sent without a
length (chunked) is read only up to the limit, then refused the same way; the app behind it
(sign-in, the audit log, JSON parsing) never sees either. A refused connection is closed, so the
rest of the body is never read. Every body the API takes is a small JSON document or form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from waymark.errors import TooLarge, WaymarkError

if TYPE_CHECKING:  # (the CLI reads the defaults without loading the web stack)
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY = 1024 * 1024
MAX_CONNECTIONS = 256
MAX_STREAMS = 8
STREAM_LIFETIME = 300.0
# bytes of one WebSocket message from a client (uvicorn's ws_max_size: it refuses a larger one
# before reading it whole); a VNC viewer's messages are a few bytes each (keys, the mouse)
MAX_WEBSOCKET_MESSAGE = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """``max_body``: bytes of one request body; ``max_connections``: open connections (more are
    answered 503 by the server, :mod:`waymark.cli.serve`); ``max_streams``: event streams one
    user may have open at once (more are 429); ``stream_lifetime``: seconds after which a
    stream ends with an ``expired`` event (an EventSource reconnects by itself)."""

    max_body: int = MAX_BODY
    max_connections: int = MAX_CONNECTIONS
    max_streams: int = MAX_STREAMS
    stream_lifetime: float = STREAM_LIFETIME


class BodyLimit:
    """Refuse request bodies over ``max_body`` bytes (413, the connection closed), reading at
    most that much of any body; ``render`` makes the error's JSON (the API's one shape)."""

    def __init__(self, app: ASGIApp, max_body: int,
                 render: Callable[[WaymarkError], dict[str, Any]]) -> None:
        self.app, self.max_body, self.render = app, max_body, render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        first = None if declared is not None and declared > self.max_body \
            else await _read(receive, self.max_body)
        if first is None:
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, _replay(first, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        from starlette.responses import JSONResponse

        err = TooLarge(f"the request body is larger than this server takes ({self.max_body} "
                       "bytes).", hint="Send less: API requests are small JSON documents "
                                       "(the limit is waymark serve --max-body).")
        response = JSONResponse(self.render(err), status_code=err.http_status,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _read(receive: Receive, limit: int) -> Message | None:
    """The whole body as one message (or the disconnect that cut it short), or None once it
    grows over ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return message
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return {"type": "http.request", "body": b"".join(parts), "more_body": False}


def _replay(first: Message, receive: Receive) -> Receive:
    """``receive`` that answers ``first`` once, then passes on (a disconnect, later)."""
    pending = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
