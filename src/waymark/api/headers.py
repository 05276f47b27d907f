"""Security headers on every response, the API's, the portal's and the static files'.

The portal loads its script and style sheet from ``/static`` only, with no inline script, no
inline event handler and no ``style`` attribute, so the Content-Security-Policy allows
nothing else: a string that slipped into a page unescaped still runs no script. No page may be
framed (clickjacking), no response is sniffed into another type, no path leaves the site in a
Referer; ``Strict-Transport-Security`` only on HTTPS (``--cert``, or a trusted proxy saying
``X-Forwarded-Proto: https``): a browser remembers it, so sending it over plain HTTP would
break a later plain-HTTP server on the same name.

``connect-src`` names this server's own WebSocket origin besides ``'self'`` (the graphical
console's ``ws://HOST``/``wss://HOST``: browsers that follow CSP level 2 do not count a
``ws:`` URL as ``'self'``), taken from the request's ``Host`` when it is a plain host name or
address and port (anything else: ``'self'`` alone).
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
ALWAYS = (
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
HSTS = (b"strict-transport-security", b"max-age=31536000")


def content_security_policy(scope: Scope) -> bytes:
    """:data:`CONTENT_SECURITY_POLICY` with this server's WebSocket origin in ``connect-src``."""
    host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
    if not _HOST.fullmatch(host):
        return CONTENT_SECURITY_POLICY.encode()
    websocket = "wss" if scope.get("scheme") == "https" else "ws"
    return CONTENT_SECURITY_POLICY.replace(
        "connect-src 'self'", f"connect-src 'self' {websocket}://{host}").encode()


class SecurityHeaders:
    """ASGI middleware: the Content-Security-Policy and :data:`ALWAYS` on every HTTP response,
    and :data:`HSTS` on HTTPS."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = ((b"content-security-policy", content_security_policy(scope)), *ALWAYS,
                 *((HSTS,) if scope.get("scheme") == "https" else ()))

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *(h for h in added if h[0] not in present)]
            await send(message)

        await self.app(scope, receive, with_headers)
