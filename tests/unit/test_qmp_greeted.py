"""``qmp.greeted``: the first QMP session to a QEMU just started, against a fake monitor that
serves one client at a time as QEMU's does: the session that got the greeting is the one used
(no probe connection before it), a connection left without a greeting is made again, and a
process that exits first is its own error."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from waymark.errors import ToolError
from waymark.qemu import qmp

GREETING = {"QMP": {"version": {"qemu": {"major": 9, "minor": 0, "micro": 0}, "package": ""},
                    "capabilities": []}}


class FakeMonitor:
    """Counts the connections it takes; greets all but the first ``silent`` of them; answers
    every command with an empty return; remembers the commands of each connection."""

    def __init__(self, silent: int = 0) -> None:
        self.silent = silent
        self.sessions: list[list[str]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        commands: list[str] = []
        self.sessions.append(commands)
        if len(self.sessions) <= self.silent:
            await reader.read()  # say nothing until the client gives up
            writer.close()
            return
        writer.write(json.dumps(GREETING).encode() + b"\r\n")
        pending = ""
        while chunk := await reader.read(4096):  # commands come as a JSON stream, no newlines
            pending += chunk.decode()
            while pending.strip():
                message, end = json.JSONDecoder().raw_decode(pending.lstrip())
                pending = pending.lstrip()[end:]
                commands.append(message["execute"])
                writer.write(json.dumps({"return": {}, "id": message.get("id")}).encode()
                             + b"\r\n")
        writer.close()


@pytest.fixture
def started() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


async def _use(monitor: FakeMonitor, socket: Path, started: subprocess.Popen[bytes],
               timeout: float = 10.0) -> None:
    server = await asyncio.start_unix_server(monitor.serve, str(socket))
    async with server, qmp.greeted(started, socket, "vm", timeout=timeout,
                           exited=lambda: ToolError("exited")) as machine:
        await machine.command("query-status")


def test_the_greeted_session_is_the_one_used(tmp_path: Path,
                                             started: subprocess.Popen[bytes]) -> None:
    monitor = FakeMonitor()
    asyncio.run(_use(monitor, tmp_path / "qmp.sock", started))
    assert monitor.sessions == [["qmp_capabilities", "query-status"]]


def test_a_connection_left_without_a_greeting_is_made_again(
        tmp_path: Path, started: subprocess.Popen[bytes]) -> None:
    monitor = FakeMonitor(silent=1)
    asyncio.run(_use(monitor, tmp_path / "qmp.sock", started))
    assert monitor.sessions == [[], ["qmp_capabilities", "query-status"]]


def test_a_process_that_exits_first_is_its_error(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(ToolError, match=r"^exited$"):
        asyncio.run(_use(FakeMonitor(silent=100), tmp_path / "qmp.sock", gone))


def test_no_greeting_within_the_time_is_an_error(tmp_path: Path,
                                                 started: subprocess.Popen[bytes]) -> None:
    with pytest.raises(ToolError, match=r"did not answer on QMP within 1\.5 s"):
        asyncio.run(_use(FakeMonitor(silent=100), tmp_path / "qmp.sock", started, 1.5))
