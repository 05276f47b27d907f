"""``waymark serve``: the REST API (:mod:`waymark.api`), the backup schedules, and recovery of
what dead commands left (done when the home is opened)."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from waymark import failpoints, modes
from waymark.cli.main import face
from waymark.errors import Conflict, InvalidInput, WaymarkError
from waymark.http.limits import (
    MAX_CONNECTIONS,
    MAX_STREAMS,
    MAX_WEBSOCKET_MESSAGE,
    STREAM_LIFETIME,
    Limits,
)
from waymark.model.units import parse_size

if TYPE_CHECKING:
    from waymark.engine.context import Context

log = logging.getLogger(__name__)
SCHEDULE_EVERY = 30.0
# an API request waits this long for a VM another request or command holds, then gets 409
API_LOCK_TIMEOUT = 2.0
MIN_BODY = 64 * 1024
BACKLOG = 2048  # uvicorn's own


UNIX = "unix:"  # --listen unix:PATH: a Unix socket (for a reverse proxy on this host)


def _address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidInput(f"--listen {listen!r} is not HOST:PORT.",
                           hint="For example --listen 127.0.0.1:8080 (or [::1]:8080, or "
                                "unix:/run/waymark.sock).")
    return host.strip("[]"), int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _check_transport(host: str, tls: bool, insecure_http: bool) -> None:
    """Plain HTTP only on loopback, unless asked for by name: passwords, session cookies and
    tokens would cross the network in the clear."""
    if tls or insecure_http or _loopback(host):
        return
    raise InvalidInput(f"--listen {host} is reachable from other hosts, and without TLS "
                       "passwords, session cookies and tokens would cross the network in "
                       "the clear.",
                       hint="Give --cert and --key, or serve on 127.0.0.1 behind a TLS reverse "
                            "proxy (--trusted-proxy 127.0.0.1); --insecure-http if you must.")


def _bound(host: str, port: int, listen: str) -> socket.socket:
    """The socket the server serves on, bound here before anything starts (uvicorn would only
    log why it cannot and exit 3, the exit code of NotFound), listening only once the home is
    open (:func:`serve`): IPv6 when the host has a colon, SO_REUSEADDR as uvicorn sets it.
    Port 0 takes a free port (the URL printed names it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise Conflict(f"cannot listen on {listen}: {err.strerror}.",
                       hint=_listen_hint(err.errno, port)) from err
    return sock


def _bound_unix(path: Path) -> socket.socket:
    """A Unix socket bound at ``path`` (owner-only, as every file the server makes); a socket
    file nobody listens on any more (a server that died) is replaced."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if path.is_socket() and sock.connect_ex(str(path)) != 0:
            path.unlink()  # stale: its server is gone
        sock.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
    except OSError as err:
        sock.close()
        raise Conflict(f"cannot listen on {UNIX}{path}: {err.strerror}.",
                       hint="Another waymark serve may listen there, or the file is no "
                            "socket: choose another path, or remove it.") from err
    return sock


def _url(sock: socket.socket, tls: bool) -> str:
    """The portal's address as a browser (or curl) reaches it."""
    scheme = "https" if tls else "http"
    if sock.family == socket.AF_UNIX:
        return f"unix socket {sock.getsockname()} (curl --unix-socket {sock.getsockname()} " \
               f"{scheme}://localhost/)"
    host, port = sock.getsockname()[:2]
    if ipaddress.ip_address(host).is_unspecified:  # every address of this host
        host = socket.gethostname()
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}/"


def _listen_hint(errno_: int | None, port: int) -> str:
    if errno_ == errno.EADDRINUSE:
        return (f"Another program (or another waymark serve) listens there (ss -ltnp "
                f"'sport = :{port}'): stop it, or serve on another port with --listen.")
    if errno_ == errno.EACCES:
        return "Ports below 1024 need root: serve on another port with --listen."
    return "Give an address of this host to --listen (ip -brief address lists them)."


def _proxies(given: tuple[str, ...]) -> list[str]:
    """The proxies whose ``X-Forwarded-For``/``-Proto`` are believed (addresses or networks)."""
    for proxy in given:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise InvalidInput(f"--trusted-proxy {proxy!r} is not an IP address or network.",
                               hint="For example --trusted-proxy 127.0.0.1 or "
                                    "--trusted-proxy 10.0.0.0/24.") from None
    return list(given)
def _body_limit(text: str) -> int:
    size = parse_size(text, what="--max-body")
    if size < MIN_BODY:
        raise InvalidInput(f"--max-body {text!r} is too small: sign-ins and settings need at "
                           f"least {MIN_BODY // 1024} KiB.", hint="For example --max-body 1M.")
    return size


def _schedules(ctx: Context, stop: threading.Event, every: float) -> None:
    """Run due backup schedules every ``every`` seconds until ``stop``; nothing one look raises
    ends the thread (each run records its own failure, see
    :mod:`waymark.usecases.backups.schedules`)."""
    from waymark.usecases.backups import schedules

    while not stop.wait(every):
        try:
            for run in schedules.run_due(ctx):
                log.log(logging.WARNING if run.get("error") else logging.INFO,
                        "schedule %s ran: %s", run["schedule"], run)
        except WaymarkError as err:
            log.warning("backup schedules: %s", err.message)
        except Exception:
            log.exception("backup schedules failed; looking again in %s s", every)


@click.command()
@click.option("--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
              help="Address to serve on (loopback by default).")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TLS certificate (PEM); with --key, the API is served over HTTPS.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TLS private key (PEM).")
@click.option("--insecure-http", is_flag=True,
              help="Allow plain HTTP on an address other hosts reach (not advised).")
@click.option("--trusted-proxy", "trusted_proxies", multiple=True, metavar="ADDR",
              help="A reverse proxy (IP address or network) whose X-Forwarded-For and "
                   "X-Forwarded-Proto are believed; repeatable. Default: none.")
@click.option("--no-schedules", is_flag=True, help="Do not run backup schedules here.")
@click.option("--schedule-every", type=click.FloatRange(1, 3600), default=SCHEDULE_EVERY,
              show_default=True, metavar="SECONDS",
              help="How often to look for due backup schedules.")
@click.option("--max-body", default="1M", show_default=True, metavar="SIZE",
              help="The largest request body taken (larger: 413).")
@click.option("--max-connections", type=click.IntRange(1, 100000), default=MAX_CONNECTIONS,
              show_default=True, help="Open connections at once (more: 503).")
@click.option("--max-streams", type=click.IntRange(1, 10000), default=MAX_STREAMS,
              show_default=True, help="Event streams one user may have open at once "
                                      "(more: 429).")
@click.option("--stream-lifetime", type=click.FloatRange(1, 86400), default=STREAM_LIFETIME,
              show_default=True, metavar="SECONDS",
              help="An event stream ends after this long (its client reconnects).")
def serve(listen: str, cert: Path | None, key: Path | None, insecure_http: bool,
          trusted_proxies: tuple[str, ...], no_schedules: bool, schedule_every: float,
          max_body: str, max_connections: int, max_streams: int, stream_lifetime: float) -> None:
    """Serve the REST API (OpenAPI at /api/openapi.json) and run the backup schedules."""
    import uvicorn

    from waymark.api.app import create_app

    modes.restrict_process()  # the server's files (and QEMU's) are owner-only too
    unix = Path(listen.removeprefix(UNIX)) if listen.startswith(UNIX) else None
    host, port = _address(listen) if unix is None else ("localhost", 0)
    if (cert is None) != (key is None):
        raise InvalidInput("--cert and --key go together.", hint="Give both, or neither.")
    _check_transport(host, cert is not None, insecure_http)  # a Unix socket: this host only
    proxies = _proxies(trusted_proxies)
    if failpoints.armed():
        raise InvalidInput(f"a server never runs with test failpoints, and {failpoints.KILL} or "
                           f"{failpoints.TRACE} arms them.",
                           hint=f"Unset them (and {failpoints.SUITE_KEY}), then serve again.")
    limits = Limits(_body_limit(max_body), max_connections, max_streams, stream_lifetime)
    sock = _bound(host, port, listen) if unix is None else _bound_unix(unix.absolute())
    ctx = face().ctx
    if "WAYMARK_LOCK_TIMEOUT" not in os.environ:
        ctx.settings = dataclasses.replace(ctx.settings, lock_timeout=API_LOCK_TIMEOUT)
    stop = threading.Event()
    if not no_schedules:
        threading.Thread(target=_schedules, args=(ctx, stop, schedule_every), name="schedules",
                         daemon=True).start()
    config = uvicorn.Config(create_app(ctx, limits), log_level="warning",
                            proxy_headers=bool(proxies), forwarded_allow_ips=proxies,
                            limit_concurrency=limits.max_connections,
                            ws_max_size=MAX_WEBSOCKET_MESSAGE,
                            ssl_certfile=str(cert) if cert else None,
                            ssl_keyfile=str(key) if key else None)
    sock.listen(BACKLOG)  # the home is open and settled: a browser pointed at the URL now is
    # answered once the app has started (a moment later), not refused
    click.echo(f"Waymark portal on {_url(sock, cert is not None)} (the API under /api; "
               f"home {ctx.home})", err=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        stop.set()
        sock.close()
        if unix is not None:
            unix.absolute().unlink(missing_ok=True)
