"""The freeze guard's process (:mod:`waymark.guest.guard` starts it and says why it exists).

It runs as a script with the standard library only (``python -I -S freezer.py SOCKET LABEL
HOLD_LIMIT``): no site packages, no asyncio, no QMP library, so it is ready to freeze in the
time of a bare interpreter's start-up, where importing Waymark's agent client took most of a
production checkpoint's time. It speaks the guest agent's protocol itself: a
``guest-sync-delimited`` first (its reply follows a 0xFF byte, after anything an earlier
client left unread), then one JSON command and one JSON reply a line.

Its pipe to Waymark carries one line each way::

    guard: ready | unavailable <why>          (it reached the agent, or not)
    waymark: freeze
    guard: frozen <count> | failed <why>
    waymark: thaw          (or the pipe closes: Waymark died)
    guard: thawed

It thaws when told, when its pipe closes, or ``HOLD_LIMIT`` seconds after the freeze began,
whichever comes first, and retries the thaw until the agent confirms it.

The same script sets a guest's clock to the host's without Waymark waiting for the answer
(``python -I -S freezer.py --set-clock FD LABEL TIMEOUT``, see
:func:`waymark.guest.agent.set_clock`): Waymark connects to the agent's socket itself (so
every later client of the socket is served after this one) and hands the connection over as
descriptor FD; the script syncs and sends ``guest-set-time`` with the host's time at that
moment, each answer awaited at most TIMEOUT seconds, and exits: 0 when the agent confirmed, 1
otherwise.
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import sys
import time
from typing import Any

CONNECT_TIMEOUT = 3.0  # connect and sync: the agent of a busy guest
THAW_TIMEOUT = 5.0
THAW_RETRY = 0.5


class Unavailable(Exception):
    """The agent did not answer, or refused (the message says which)."""


class AgentLine:
    """A session with the guest agent on its socket: one command, one reply."""

    def __init__(self, path: str, label: str, connected: int | None = None) -> None:
        """A session on the agent's socket ``path``, or on the descriptor ``connected`` (a
        connection to it made by the caller)."""
        self.label = label
        self.pending = b""
        if connected is not None:
            self.sock = socket.socket(fileno=connected)
            return
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(CONNECT_TIMEOUT)
            self.sock.connect(path)
        except OSError as err:
            raise Unavailable(f"cannot reach the guest agent socket of {label}: {err}") from err

    def sync(self, timeout: float) -> None:
        token = random.randrange(1, 2**31)
        self._send("guest-sync-delimited", {"id": token})
        deadline = time.monotonic() + timeout
        while b"\xff" not in self.pending:  # whatever an earlier client left comes first
            self._fill("guest-sync-delimited", deadline, timeout)
        self.pending = self.pending[self.pending.rindex(b"\xff") + 1:]
        if self._reply("guest-sync-delimited", deadline, timeout) != token:
            raise Unavailable(f"the guest agent of {self.label} answered out of turn.")

    def command(self, name: str, timeout: float, arguments: dict[str, Any] | None = None
                ) -> Any:
        self._send(name, arguments)
        return self._reply(name, time.monotonic() + timeout, timeout)

    def _send(self, name: str, arguments: dict[str, Any] | None) -> None:
        message: dict[str, Any] = {"execute": name}
        if arguments is not None:
            message["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as err:
            raise Unavailable(f"the guest agent of {self.label} did not take {name}: "
                              f"{err}") from err

    def _fill(self, name: str, deadline: float, timeout: float) -> None:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
        except OSError as err:  # TimeoutError included
            raise Unavailable(f"the guest agent of {self.label} did not answer {name} within "
                              f"{timeout:g} s.") from err
        if not data:
            raise Unavailable(f"the guest agent of {self.label} closed its socket during "
                              f"{name}.")
        self.pending += data

    def _reply(self, name: str, deadline: float, timeout: float) -> Any:
        while True:
            while b"\n" not in self.pending:
                self._fill(name, deadline, timeout)
            line, _, self.pending = self.pending.partition(b"\n")
            if not line.strip():
                continue
            reply = json.loads(line)
            if "error" in reply:
                raise Unavailable(f"the guest agent of {self.label} refused {name}: "
                                  f"{reply['error'].get('desc', reply['error'])}")
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.sock.close()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _line(timeout: float | None) -> bytes:
    """Waymark's next line ("" when the pipe closed, or nothing came within ``timeout``); read
    unbuffered, a byte at a time, so nothing after the line waits in a buffer select cannot
    see."""
    fd = sys.stdin.fileno()
    ready, _, _ = select.select([fd], [], [], timeout)
    line = b""
    while ready and not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line.strip()


def _thaw(agent: AgentLine, deadline: float) -> None:
    """Thaw until the agent confirms (a thaw of a thawed guest is harmless; a late answer to
    an earlier thaw is its confirmation)."""
    while True:
        try:
            agent.command("guest-fsfreeze-thaw", THAW_TIMEOUT)
            return
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(THAW_RETRY)


def guard(path: str, label: str, hold_limit: float) -> int:
    try:
        agent = AgentLine(path, label)
        agent.sync(CONNECT_TIMEOUT)
    except Unavailable as err:
        _say(f"unavailable {err}")
        return 0
    _say("ready")
    if _line(None) != b"freeze":
        return 0  # Waymark changed its mind, or died before asking
    began = time.monotonic()
    try:
        count = agent.command("guest-fsfreeze-freeze", hold_limit)
    except Unavailable as err:
        _say(f"failed {err}")
        _thaw(agent, began + 2 * hold_limit)  # a half-done freeze
        return 0
    _say(f"frozen {count}")
    _line(max(0.0, hold_limit - (time.monotonic() - began)))  # "thaw", EOF, or the limit
    _thaw(agent, began + 2 * hold_limit)
    _say("thawed")
    return 0


def set_clock(connected: int, label: str, timeout: float) -> int:
    """The guest's clock set to the host's through the agent connection ``connected`` (the
    module docstring says how); 0 when done."""
    agent = AgentLine("", label, connected)
    try:
        agent.sync(timeout)
        agent.command("guest-set-time", timeout, {"time": time.time_ns()})
    except Unavailable:
        return 1
    finally:
        agent.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--set-clock":
        sys.exit(set_clock(int(sys.argv[2]), sys.argv[3], float(sys.argv[4])))
    sys.exit(guard(sys.argv[1], sys.argv[2], float(sys.argv[3])))
