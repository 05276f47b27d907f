"""The serial console on a terminal: raw mode, both directions, Ctrl-] detaches."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path

from waymark.errors import ToolError
from waymark.qemu import sockets

DETACH = b"\x1d"  # Ctrl-]


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _pump_out(reader: asyncio.StreamReader) -> None:
    while data := await reader.read(4096):
        os.write(sys.stdout.fileno(), data)


async def _readable(fd: int) -> None:
    """Wait until ``fd`` has input, on the event loop itself: a reader thread blocked in
    ``os.read`` would keep ``asyncio.run`` from returning after the VM stopped, until a key was
    pressed. A regular file cannot be polled and never blocks, so it is ready at once."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    try:
        loop.add_reader(fd, wake)
    except PermissionError:  # epoll refuses regular files
        return
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _pump_in(writer: asyncio.StreamWriter) -> None:
    fd = sys.stdin.fileno()
    while True:
        await _readable(fd)
        data = os.read(fd, 1024)
        if not data or DETACH in data:
            writer.write(data.split(DETACH)[0])
            return
        writer.write(data)
        await writer.drain()


async def attach(socket: Path, label: str) -> None:
    """Connect the terminal to the VM's serial console until Ctrl-] or the VM stops."""
    try:
        with sockets.address(socket) as where:
            reader, writer = await asyncio.open_unix_connection(where)
    except OSError as err:
        raise ToolError(f"cannot reach the console of {label}: {err.strerror}.",
                        hint=f"Is it running? waymark vm status {label}") from err
    sys.stderr.write(f"Connected to the console of {label}; detach with Ctrl-].\r\n")
    with _raw(sys.stdin.fileno()):
        tasks = {asyncio.ensure_future(_pump_out(reader)),
                 asyncio.ensure_future(_pump_in(writer))}
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
    writer.close()
    sys.stderr.write("\r\nDetached.\n")
