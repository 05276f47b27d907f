"""The serial console on a terminal: raw mode, both directions, Ctrl-] detaches.

When the input ends (a pipe, ``printf 'ls\n' | waymark vm console VM``), the console stays
connected until QEMU has read every byte of it (QEMU drops what it has not read when the client
hangs up, and its serial port takes a few bytes at a time, as fast as the guest reads them),
then prints the guest's output until the guest has been quiet for ``--linger`` seconds (at most
:data:`LINGER_MAX` in all), then detaches.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import sys
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path

from waymark.errors import ToolError
from waymark.qemu import sockets

DETACH = b"\x1d"  # Ctrl-]
LINGER = 2.0  # after the input ends: the guest's output is printed until it is this quiet
LINGER_MAX = 60.0  # ... and never longer than this after the input ended
POLL = 0.05


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


class _Output:
    """The guest's output to the terminal; ``last``: when some last came (monotonic)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    async def pump(self, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(4096):
            os.write(sys.stdout.fileno(), data)
            self.last = time.monotonic()


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


async def _pump_in(writer: asyncio.StreamWriter) -> bool:
    """The terminal's input to the console until Ctrl-] (False) or its end (True)."""
    fd = sys.stdin.fileno()
    while True:
        await _readable(fd)
        data = os.read(fd, 1024)
        writer.write(data.split(DETACH)[0])
        await writer.drain()
        if not data or DETACH in data:
            return not data


def _unread(writer: asyncio.StreamWriter) -> int:
    """Bytes sent that the other end (QEMU) has not read yet (``SIOCOUTQ``)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return 0
    count = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, count)
    except OSError:
        return 0
    return count[0]


async def _linger(writer: asyncio.StreamWriter, output: _Output, out: asyncio.Task[None],
                  quiet: float) -> None:
    """After the input ended: wait until QEMU has read all of it, then until the guest's
    output has been ``quiet`` for that long; at most :data:`LINGER_MAX` in all, or until the
    console closes (the VM stopped)."""
    ended = time.monotonic()
    while not out.done() and time.monotonic() - ended < LINGER_MAX:
        if _unread(writer):
            output.last = time.monotonic()  # the guest has not even read it yet
        elif time.monotonic() - output.last >= quiet:
            return
        await asyncio.wait({out}, timeout=POLL)


async def attach(socket: Path, label: str, linger: float = LINGER) -> None:
    """Connect the terminal to the VM's serial console until Ctrl-] or the VM stops; when the
    input ends, until the guest has read it and then been quiet for ``linger`` seconds."""
    try:
        with sockets.address(socket) as where:
            reader, writer = await asyncio.open_unix_connection(where)
    except OSError as err:
        raise ToolError(f"cannot reach the console of {label}: {err.strerror}.",
                        hint=f"Is it running? waymark vm status {label}") from err
    sys.stderr.write(f"Connected to the console of {label}; detach with Ctrl-].\r\n")
    output = _Output()
    with _raw(sys.stdin.fileno()):
        out = asyncio.ensure_future(output.pump(reader))
        typed = asyncio.ensure_future(_pump_in(writer))
        await asyncio.wait({out, typed}, return_when=asyncio.FIRST_COMPLETED)
        if typed.done() and not typed.cancelled() and typed.exception() is None \
                and typed.result():
            await _linger(writer, output, out, linger)
        for task in (out, typed):
            task.cancel()
    writer.close()
    sys.stderr.write("\r\nDetached.\n")
