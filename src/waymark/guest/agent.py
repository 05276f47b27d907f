"""The QEMU guest agent, through the same ``qemu.qmp`` client as QMP.

The agent speaks QMP without a greeting or capabilities negotiation; a session starts with
``guest-sync-delimited`` so that a reply left over from an earlier client is never taken for
ours.

QEMU's agent socket takes one client at a time: while another program holds it, a connect
still succeeds (the kernel queues it) but nothing ever answers. :func:`held_elsewhere` tells
that apart from a silent agent through QMP (``query-chardev``: a chardev with a client has no
``disconnected:`` prefix), so the reason given names the real cause.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket as stdlib_socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, Message, QMPClient, QMPError

from waymark.errors import ToolError
from waymark.guest import freezer
from waymark.qemu import cmdline, qmp, sockets

log = logging.getLogger(__name__)
CLOCK_TIMEOUT = 2.0  # the whole of a clock correction: an agent slower than this is skipped
# The whole of a status probe (connect, sync, ping). A running agent answers in a few ms; under
# TCG on a loaded 2-core host its first sync after a reconnect was seen to take up to ~110 ms:
# 0.5 s leaves it ~5x that. A guest without an agent costs no wait at all (:func:`port_open`).
PROBE_TIMEOUT = 0.5
HELD_GRACE = 0.5  # a client that just left: QEMU notices its hang-up within this
# the detached clock setter: the freeze guard's script (standard library only, isolated)
CLOCK_SETTER = (sys.executable, "-I", "-S", str(Path(freezer.__file__)), "--set-clock")
SETTER_POLL = 0.02


class _AgentClient(QMPClient):
    """QMP framing, minus the 0xFF sentinel the agent sends before a ``guest-sync-delimited``
    reply (it marks where stale output ends; ``qemu.qmp`` would take it for bad JSON)."""

    async def _do_recv(self) -> Message:
        line = await self._readline()
        return Message(line.lstrip(b"\xff"), eager=True)


class AgentUnavailable(ToolError):
    """The guest agent did not answer (not installed, not started, or the guest is busy)."""


class Agent:
    def __init__(self, client: QMPClient, label: str) -> None:
        self.client = client
        self.label = label

    async def command(self, name: str, timeout: float, **arguments: Any) -> Any:
        log.debug("agent %s: %s %s", self.label, name, arguments)
        try:
            return await asyncio.wait_for(self.client.execute(name, arguments or None), timeout)
        except ExecuteError as err:
            raise ToolError(f"the guest agent of {self.label} refused {name}: "
                            f"{err.error.error.desc}") from err
        except (QMPError, TimeoutError, OSError) as err:
            raise AgentUnavailable(f"the guest agent of {self.label} did not answer {name} "
                                   f"within {timeout:g} s.") from err

    async def sync(self, timeout: float) -> None:
        token = random.randrange(1, 2**31)
        got = await self.command("guest-sync-delimited", timeout, id=token)
        if got != token:
            raise AgentUnavailable(f"the guest agent of {self.label} answered out of turn.")

    async def ping(self, timeout: float = 2.0) -> None:
        await self.command("guest-ping", timeout)

    async def shutdown(self) -> None:
        """Ask the guest to power off. The agent never answers a successful shutdown."""
        with suppress(AgentUnavailable):
            await self.command("guest-shutdown", 2.0, mode="powerdown")


@asynccontextmanager
async def connect(socket: Path, label: str, timeout: float = 3.0) -> AsyncIterator[Agent]:
    """An agent session, synchronised; AgentUnavailable when nothing answers in time. A clock
    setter still at work is waited for first (:func:`set_clock`)."""
    await after_clock_setter(socket)
    client = _AgentClient(f"{label}-agent")
    client.await_greeting = False
    client.negotiate = False
    try:
        with sockets.address(socket) as where:
            await asyncio.wait_for(client.connect(where), timeout)
    except (ConnectError, OSError, TimeoutError) as err:
        raise AgentUnavailable(f"cannot reach the guest agent socket of {label}: {err}") from err
    try:
        agent = Agent(client, label)
        await agent.sync(timeout)
        yield agent
    finally:
        # disconnect() re-raises what ended the connection (EOF after ``quit``, a guest that
        # powered off): the session is over either way
        with suppress(QMPError, EOFError, OSError):
            await client.disconnect()


async def set_clock(socket: Path, label: str, timeout: float = CLOCK_TIMEOUT) -> bool:
    """Set the guest's clock to the host's (``guest-set-time`` with the host's time in ns, as
    libvirt's ``domtime --sync`` and Hyper-V's time synchronisation do), after the guest ran
    from a memory state or stood paused: its clock stopped meanwhile.

    Without waiting for the guest's answer (a guest just resumed under TCG took 0.2-0.9 s to
    answer): the connection to the agent's socket is made here, so every later client of the
    socket (which takes one at a time) is served after it, and handed to a process of its own
    (:data:`CLOCK_SETTER`) that sets the clock and exits; Waymark's own clients wait for it to
    end first (:func:`after_clock_setter`). Best effort: False (logged) when the socket takes
    no connection; the setter gives up after ``timeout`` a step (an agent that does not answer
    or refuses is skipped), and nothing fails what called it."""
    await after_clock_setter(socket)
    line = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        line.settimeout(timeout)
        with sockets.address(socket) as where:
            line.connect(where)
        line.setblocking(True)  # the setter sets its own timeouts
        setter = subprocess.Popen([*CLOCK_SETTER, str(line.fileno()), label, f"{timeout:g}"],
                                  pass_fds=(line.fileno(),), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
    except OSError as err:
        log.info("the clock of %s was not set: %s", label, err)
        return False
    finally:
        line.close()  # the setter holds the connection now
    cmdline.clock_setter_of(socket).write_text(str(setter.pid))
    return True


def _setter_running(socket: Path) -> bool:
    """Whether the clock setter last started for ``socket`` still runs: a process whose command
    line is the setter's, or is still empty (the kernel shows none for a moment after
    ``subprocess.Popen`` returns, while the new program is set up: seen on this machine), and
    that is no zombie. A pid since taken by another program has another command line; one taken
    by a kernel thread (empty too) is waited for at most :func:`after_clock_setter`'s bound."""
    try:
        pid = int(cmdline.clock_setter_of(socket).read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return False
    return state not in ("Z", "X") and (not command or b"--set-clock" in command)


async def after_clock_setter(socket: Path, timeout: float = 2 * CLOCK_TIMEOUT + 1) -> None:
    """Wait (at most ``timeout``) until no clock setter holds the agent's ``socket``."""
    deadline = time.monotonic() + timeout
    while _setter_running(socket) and time.monotonic() < deadline:
        await asyncio.sleep(SETTER_POLL)


async def port_open(machine: qmp.Qmp) -> bool:
    """Whether a program in the guest holds the agent's virtio-serial port open
    (``query-chardev``'s ``frontend-open``, which QEMU sets when the guest opens the port and
    clears when it closes it): False for a guest that runs no agent, so nobody waits for an
    answer that cannot come. A VM whose QEMU lists no agent chardev is given the benefit of the
    doubt (True: ask the agent)."""
    return cmdline.agent_port_open(await machine.command("query-chardev"))


async def answers(machine: qmp.Qmp, socket: Path, label: str,
                  timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the guest agent answers a ping within ``timeout`` seconds in all (connect, sync,
    ping); at once False when no program in the guest has its port open (:func:`port_open`)."""
    if not await port_open(machine):
        return False
    await after_clock_setter(socket)  # not counted in ``timeout``: it ends in seconds
    try:
        async with asyncio.timeout(timeout), connect(socket, label, timeout) as guest:
            await guest.ping(timeout)
    except (ToolError, TimeoutError):
        return False
    return True


async def held_elsewhere(machine: qmp.Qmp) -> bool:
    """Whether a client is connected to the VM's agent socket now (ask before connecting:
    then it is another program), allowing a client that just left :data:`HELD_GRACE`."""
    deadline = time.monotonic() + HELD_GRACE
    while True:
        chardevs = await machine.command("query-chardev")
        found = next((c for c in chardevs if c.get("label") == cmdline.AGENT_CHARDEV), None)
        if found is None or str(found.get("filename", "")).startswith("disconnected:"):
            return False
        if time.monotonic() > deadline:
            return True
        await asyncio.sleep(0.1)


def held_reason(socket: Path) -> str:
    return (f"another program is connected to the guest agent's socket {socket} (it takes one "
            "client at a time); disconnect it")
