"""A few QMP queries asked synchronously over the standard library's ``socket``: what a command
that only looks at a running VM (``waymark vm status``) asks QEMU, without the asyncio QMP
stack (:mod:`waymark.qemu.qmp`, the QEMU project's ``qemu.qmp``) that commands acting on a
VM use. It sends queries only: nothing here changes the VM.

QMP is one JSON object a line: QEMU greets, the client sends ``qmp_capabilities``, then each
command gets one ``return`` or ``error`` object; events may come in between and are skipped.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from waymark.errors import ToolError
from waymark.qemu import sockets

TIMEOUT = 2.0  # s for the whole exchange (QEMU's monitor takes one client at a time)


def ask(path: Path, label: str, *commands: str, timeout: float = TIMEOUT) -> list[Any]:
    """The answers of QEMU listening on ``path`` to ``commands`` (argument-less queries, in
    order), within ``timeout`` seconds in all; :class:`~waymark.errors.ToolError` when it
    cannot be reached, refuses one or does not answer in time."""
    return _exchange(path, label, [(name, {}) for name in commands], timeout)


def query(path: Path, label: str, name: str, *, timeout: float = TIMEOUT,
          **arguments: Any) -> Any:
    """The answer of QEMU listening on ``path`` to the query ``name`` with ``arguments`` (as
    :func:`ask`)."""
    return _exchange(path, label, [(name, arguments)], timeout)[0]


def _exchange(path: Path, label: str, commands: list[tuple[str, dict[str, Any]]],
              timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            with sockets.address(path) as where:
                conn.connect(where)
            lines = _Lines(conn, deadline)
            lines.next_object()  # the greeting
            return [_answer(lines, conn, name, arguments, label)
                    for name, arguments in [("qmp_capabilities", {}), *commands]][1:]
    except (OSError, ValueError) as err:
        raise ToolError(f"cannot ask QEMU of {label} at {path}: {err}") from err


def _answer(lines: _Lines, conn: socket.socket, name: str, arguments: dict[str, Any],
            label: str) -> Any:
    message: dict[str, Any] = {"execute": name}
    if arguments:
        message["arguments"] = arguments
    conn.sendall(json.dumps(message).encode() + b"\n")
    while True:
        answer = lines.next_object()
        if "return" in answer:
            return answer["return"]
        if "error" in answer:
            error = answer["error"]
            raise ToolError(f"QEMU refused {name} for {label}: "
                            f"{error.get('desc', error) if isinstance(error, dict) else error}")
        # anything else is an event: not an answer


class _Lines:
    """The JSON objects a connection receives, one a line, until a deadline."""

    def __init__(self, conn: socket.socket, deadline: float) -> None:
        self.conn, self.deadline, self.buffer = conn, deadline, b""

    def next_object(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer in time")
            self.conn.settimeout(left)
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ConnectionError("QEMU closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        found = json.loads(line)
        if not isinstance(found, dict):
            raise ValueError(f"not a QMP message: {line[:80]!r}")
        return found
