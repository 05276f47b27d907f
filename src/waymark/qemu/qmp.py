"""The QMP facade: one connection to a running QEMU, through the QEMU project's ``qemu.qmp``.

Errors become :class:`~waymark.errors.ToolError` with QEMU's own message; waiting is done on
QMP events with a timeout, never by polling.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError, Runstate

from waymark.errors import ToolError, WaymarkError
from waymark.qemu import sockets

if TYPE_CHECKING:
    import subprocess

log = logging.getLogger(__name__)
T = TypeVar("T")
# qemu.qmp logs a warning for every connection it could not make; Waymark retries some and
# reports the ones that matter as its own errors, so the library speaks up only for errors.
logging.getLogger("qemu.qmp").setLevel(logging.ERROR)


class Qmp:
    def __init__(self, client: QMPClient, label: str) -> None:
        self.client = client
        self.label = label

    async def command(self, name: str, /, **arguments: Any) -> Any:
        log.debug("qmp %s: %s %s", self.label, name, arguments)
        try:
            return await self.client.execute(name, arguments or None)
        except ExecuteError as err:
            desc = err.error.error.desc
            raise ToolError(f"QEMU refused {name} for {self.label}: {desc}") from err
        except QMPError as err:
            raise ToolError(f"lost the QMP connection to {self.label} during {name}: {err}") \
                from err

    async def send_fd(self, name: str, fd: int) -> None:
        """Hand ``fd`` to QEMU under ``name`` (SCM_RIGHTS + ``getfd``)."""
        self.client.send_fd_scm(fd)
        await self.command("getfd", fdname=name)

    @asynccontextmanager
    async def events(self, *names: str) -> AsyncIterator[EventListener]:
        with self.client.listener(names) as listener:
            yield listener

    async def wait_event(self, listener: EventListener, timeout: float, what: str,
                         match: Any = None) -> dict[str, Any]:
        """The next event of ``listener`` for which ``match(event)`` holds, within ``timeout``.

        Fails at once if QEMU closes the connection (it exited) instead of waiting it out.
        """
        async def first() -> dict[str, Any]:
            while True:
                event = dict(await listener.get())
                if match is None or match(event):
                    return event

        async def closed() -> None:
            while self.client.runstate == Runstate.RUNNING:
                await self.client.runstate_changed()

        waiter, watcher = asyncio.ensure_future(first()), asyncio.ensure_future(closed())
        done, pending = await asyncio.wait({waiter, watcher}, timeout=timeout,
                                           return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if waiter in done:
            return waiter.result()
        if watcher in done:
            raise ToolError(f"QEMU of {self.label} exited before {what}.")
        raise ToolError(f"{self.label}: {what} did not happen within {timeout:g} s.")


def run_sync(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` to its end from synchronous code, even inside a running event loop (recovery
    runs wherever a VM lock is taken, async commands included): then on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work).result()


def event_time(event: dict[str, Any]) -> float:
    """An event's own timestamp (seconds since the epoch, from QEMU's clock)."""
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


# How long one connection to a QEMU just started waits for its greeting before it is made again
GREETING_TIMEOUT = 1.0
# How often the QMP socket of a QEMU just started is looked for (it appears 30-100 ms after the
# start: a coarser poll adds half of itself to every start on average)
SOCKET_POLL = 0.005


@asynccontextmanager
async def greeted(started: subprocess.Popen[bytes], socket: Path, label: str, *,
                  timeout: float, exited: Callable[[], WaymarkError]) -> AsyncIterator[Qmp]:
    """The first QMP session to a QEMU (or ``qemu-storage-daemon``) just ``started``: it has
    started once it greets. The session that got the greeting is the one to use: no probe
    connection comes first, since QEMU's monitor serves one client at a time and may drop the
    connection that follows a client's hang-up. A connection that gets no greeting within
    :data:`GREETING_TIMEOUT` is dropped and made again (QEMU may take one before its monitor
    is attached); both were seen on a loaded host. ``exited``: the error when the process
    exits first; ToolError when no greeting came within ``timeout`` seconds."""
    async with AsyncExitStack() as stack:
        yield await _first_session(stack, started, socket, label, timeout, exited)


async def _first_session(stack: AsyncExitStack, started: subprocess.Popen[bytes], socket: Path,
                         label: str, timeout: float, exited: Callable[[], WaymarkError]) -> Qmp:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if started.poll() is not None:
            raise exited()
        if socket.exists():
            try:
                return await stack.enter_async_context(connect(socket, label, GREETING_TIMEOUT))
            except ToolError as err:
                if loop.time() > deadline:
                    raise ToolError(f"QEMU of {label} did not answer on QMP within "
                                    f"{timeout:g} s: {err.message}") from None
        elif loop.time() > deadline:
            raise ToolError(f"QEMU of {label} did not open its QMP socket within {timeout:g} s.")
        await asyncio.sleep(SOCKET_POLL)


@contextmanager
def _library_silent(silent: bool) -> Iterator[None]:
    """``qemu.qmp``'s own error log muted for the block, when ``silent``."""
    library = logging.getLogger("qemu.qmp")
    before = library.level
    if silent:
        library.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        library.setLevel(before)


@asynccontextmanager
async def connect(socket: Path, label: str, timeout: float = 5.0, *,
                  may_be_exiting: bool = False) -> AsyncIterator[Qmp]:
    """A QMP session to the QEMU listening on ``socket``. ``may_be_exiting``: a QEMU that may
    be exiting on its own (one whose incoming migration failed exits by itself), whose
    refused connection is expected: the library logs nothing about it (the caller gets the
    ToolError either way)."""
    client = QMPClient(label)
    try:
        with sockets.address(socket) as where, _library_silent(may_be_exiting):
            await asyncio.wait_for(client.connect(where), timeout)
    except (ConnectError, OSError, TimeoutError) as err:
        raise ToolError(f"cannot reach QEMU of {label} at {socket}: {err}") from err
    try:
        yield Qmp(client, label)
    finally:
        # disconnect() re-raises what ended the connection (EOF after ``quit``, a guest that
        # powered off): the session is over either way
        with suppress(QMPError, EOFError, OSError):
            await client.disconnect()
