"""The freeze guard (``guard.frozen`` and its process, :mod:`waymark.guest.freezer`) against a
fake guest agent: it freezes, thaws when the body ends, thaws by itself when Waymark's pipe
closes, reports an agent that refuses or is absent, and starts without Waymark's imports."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from waymark.guest import freezer, guard


class FakeAgent:
    """Answers the agent's sync (after 0xFF and a stale line, as a real agent may leave one),
    freeze (``frozen`` file systems, or an error with ``refuse``) and thaw; remembers what it
    was asked, in order."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.asked: list[str] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"return": "stale"}\n')
        while line := await reader.readline():
            message = json.loads(line)
            name = message["execute"]
            self.asked.append(name)
            if name == "guest-sync-delimited":
                writer.write(b"\xff" + json.dumps({"return": message["arguments"]["id"]}).encode()
                             + b"\n")
            elif name == "guest-fsfreeze-freeze" and self.refuse:
                writer.write(b'{"error": {"class": "GenericError", "desc": "no way"}}\n')
            else:
                writer.write(b'{"return": 2}\n')
        writer.close()


async def _freeze_and_thaw(agent: FakeAgent, socket: Path) -> guard.Frozen:
    async with await asyncio.start_unix_server(agent.serve, str(socket)), \
            guard.frozen(socket, "vm") as held:
        assert agent.asked == ["guest-sync-delimited", "guest-fsfreeze-freeze"]
    return held


def test_freezes_for_the_body_and_thaws_after_it(tmp_path: Path) -> None:
    agent = FakeAgent()
    held = asyncio.run(_freeze_and_thaw(agent, tmp_path / "qga.sock"))
    assert agent.asked == ["guest-sync-delimited", "guest-fsfreeze-freeze",
                           "guest-fsfreeze-thaw"]
    assert held.seconds is not None and held.seconds > 0


def test_a_refused_freeze_fails_and_is_thawed(tmp_path: Path) -> None:
    agent = FakeAgent(refuse=True)
    with pytest.raises(guard.FreezeFailed, match="refused guest-fsfreeze-freeze: no way"):
        asyncio.run(_freeze_and_thaw(agent, tmp_path / "qga.sock"))
    assert agent.asked[-1] == "guest-fsfreeze-thaw"  # a half-done freeze is undone


def test_no_agent_socket_is_unavailable(tmp_path: Path) -> None:
    async def freeze() -> None:
        async with guard.frozen(tmp_path / "qga.sock", "vm"):
            pass

    with pytest.raises(guard.FreezeFailed, match="cannot reach the guest agent socket of vm"):
        asyncio.run(freeze())


def test_the_guard_thaws_by_itself_when_waymark_goes(tmp_path: Path) -> None:
    """Waymark's end of the pipe closes while frozen (it died): the guard thaws and exits."""
    agent = FakeAgent()
    socket = tmp_path / "qga.sock"

    async def run() -> None:
        async with await asyncio.start_unix_server(agent.serve, str(socket)):
            process = await asyncio.create_subprocess_exec(
                *guard.GUARD, str(socket), "vm", "10", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE)
            assert process.stdin is not None and process.stdout is not None
            assert await process.stdout.readline() == b"ready\n"
            process.stdin.write(b"freeze\n")
            assert await process.stdout.readline() == b"frozen 2\n"
            process.stdin.close()  # no "thaw": the pipe just ends
            assert await asyncio.wait_for(process.stdout.readline(), 5.0) == b"thawed\n"
            assert await asyncio.wait_for(process.wait(), 5.0) == 0

    asyncio.run(run())
    assert agent.asked[-1] == "guest-fsfreeze-thaw"


def test_the_guard_process_runs_on_the_standard_library_alone() -> None:
    """What keeps its start-up short: no site packages, no asyncio, nothing of Waymark."""
    probe = ("import json, runpy, sys; "
             f"runpy.run_path({str(Path(freezer.__file__))!r}, run_name='probe'); "
             "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([*guard.GUARD[:-1], "-c", probe], capture_output=True,
                                       text=True, check=True, timeout=60).stdout)
    assert "freezer" not in loaded and "site" not in loaded
    assert not [m for m in loaded if m.startswith(("waymark", "qemu", "asyncio"))], loaded
