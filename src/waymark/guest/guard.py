"""Freezing a guest's file systems so that nothing can leave them frozen.

A frozen guest stalls every write: Waymark must thaw it whatever happens to Waymark itself. So
the agent session that freezes is not Waymark's but a small guard process's
(:mod:`waymark.guest.freezer`, a standard-library script: it starts in the time of a bare
interpreter), in its own session so a Ctrl-C or a SIGKILL of Waymark does not reach it. It
talks to Waymark through a pipe, one line each way (its docstring has the protocol); it thaws
when told, when its pipe closes, or ``HOLD_LIMIT`` seconds after the freeze began, whichever
comes first, and retries the thaw until the agent confirms it. (The agent socket takes one
client at a time, which is why the guard, not Waymark, holds the session.)
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from waymark.errors import ToolError
from waymark.guest import agent, freezer
from waymark.qemu import qmp

HOLD_LIMIT = 10.0  # the longest a guest stays frozen, whatever happens to Waymark
FREEZE_TIMEOUT = 5.0  # the agent's answer to a freeze; a longer wait falls back
START_TIMEOUT = 10.0  # the guard's Python start-up and agent handshake, on a busy host
# the guard: the script alone, isolated (-I: no user site, no PYTHON* variables, not the
# caller's folder) and without site packages (-S): it needs none
GUARD = (sys.executable, "-I", "-S", str(Path(freezer.__file__)))


class FreezeFailed(ToolError):
    """The guest could not be frozen (no agent, no answer in time, or the freeze failed)."""


# --- Waymark's side ---------------------------------------------------------------------------

@dataclass
class Frozen:
    """An open freeze: ``began`` is when Waymark asked for it (monotonic seconds)."""

    began: float
    seconds: float | None = None  # freeze to thaw, once thawed


async def _expect(process: asyncio.subprocess.Process, word: str, timeout: float,
                  label: str) -> str:
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), timeout)).decode().strip()
    except TimeoutError as err:
        raise FreezeFailed(f"the guest agent of {label} did not answer within "
                           f"{timeout:g} s.") from err
    head, _, rest = line.partition(" ")
    if head != word:
        raise FreezeFailed(rest or f"the freeze guard of {label} stopped unexpectedly.")
    return rest


@asynccontextmanager
async def frozen(socket: Path, label: str, hold_limit: float = HOLD_LIMIT,
                 freeze_timeout: float = FREEZE_TIMEOUT,
                 machine: qmp.Qmp | None = None,
                 meanwhile: Callable[[], None] | None = None) -> AsyncIterator[Frozen]:
    """Freeze the guest's file systems for the body; thaw on the way out, whatever happens.
    ``meanwhile`` runs while the guard process starts (before anything is frozen).

    Raises :class:`FreezeFailed` (nothing frozen) when the agent is missing, slow or refuses,
    or (asked through ``machine``, the VM's QMP) another program holds its socket.
    """
    await agent.after_clock_setter(socket)  # Waymark's own client: it ends in seconds
    if machine is not None and await agent.held_elsewhere(machine):
        raise FreezeFailed(agent.held_reason(socket))
    process = await asyncio.create_subprocess_exec(
        *GUARD, str(socket), label, str(hold_limit),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    assert process.stdin is not None
    try:
        if meanwhile is not None:
            meanwhile()
        await _expect(process, "ready", START_TIMEOUT, label)
        state = Frozen(time.monotonic())
        process.stdin.write(b"freeze\n")
        await _expect(process, "frozen", freeze_timeout, label)
        try:
            yield state
        finally:
            process.stdin.write(b"thaw\n")
            await _expect(process, "thawed", 2 * hold_limit, label)
            state.seconds = time.monotonic() - state.began
    finally:
        with contextlib.suppress(OSError):
            process.stdin.close()  # the guard thaws on its own if anything above failed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 2 * hold_limit)
