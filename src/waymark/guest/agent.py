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
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, Message, QMPClient, QMPError

from waymark.errors import ToolError
from waymark.qemu import cmdline, qmp, sockets

log = logging.getLogger(__name__)
CLOCK_TIMEOUT = 2.0  # the whole of a clock correction: an agent slower than this is skipped
# The whole of a status probe (connect, sync, ping). A running agent answers in a few ms; under
# TCG on a loaded 2-core host its first sync after a reconnect was seen to take up to ~110 ms:
# 0.5 s leaves it ~5x that. A guest without an agent costs no wait at all (:func:`port_open`).
PROBE_TIMEOUT = 0.5
HELD_GRACE = 0.5  # a client that just left: QEMU notices its hang-up within this


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
    """An agent session, synchronised; AgentUnavailable when nothing answers in time."""
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
    from a memory state or stood paused: its clock stopped meanwhile. Best effort within
    ``timeout`` in all: an agent that does not answer or refuses is skipped (False), logged,
    and never fails what called it."""
    try:
        async with asyncio.timeout(timeout), connect(socket, label, timeout) as guest:
            await guest.command("guest-set-time", timeout, time=time.time_ns())
    except (ToolError, TimeoutError) as err:
        log.info("the clock of %s was not set: %s", label,
                 err.message if isinstance(err, ToolError) else f"no answer in {timeout:g} s")
        return False
    log.info("the clock of %s was set to the host's", label)
    return True


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
