"""The guest's clock set without waiting for the guest (``agent.set_clock`` and its process in
:mod:`waymark.guest.freezer`) against a fake guest agent that answers slowly: the call returns
before the agent answered, the clock is set all the same, and Waymark's next client of the
socket is served after the setter, never before it."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from tests.unit import json_stream
from waymark.guest import agent

SLOW = 1.0  # seconds the fake agent takes to answer a sync (a guest just resumed under TCG)


class SlowAgent:
    """Answers every command, a sync only after :data:`SLOW` seconds; remembers what it was
    asked and the time each ``guest-set-time`` carried."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.set_to: list[int] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending = ""
        while chunk := await reader.read(4096):
            messages, pending = json_stream.messages(pending + chunk.decode())
            for message in messages:
                await self.answer(message, writer)
        writer.close()

    async def answer(self, message: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        self.asked.append(message["execute"])
        reply: dict[str, Any] = {"return": {}}
        if message["execute"] == "guest-sync-delimited":
            await asyncio.sleep(SLOW)
            writer.write(b"\xff")
            reply["return"] = message["arguments"]["id"]
        elif message["execute"] == "guest-set-time":
            self.set_to.append(message["arguments"]["time"])
        if "id" in message:  # a QMP client's own message id comes back with its reply
            reply["id"] = message["id"]
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()


def test_the_clock_is_set_without_waiting_and_the_next_client_comes_after(tmp_path: Path
                                                                          ) -> None:
    fake, socket = SlowAgent(), tmp_path / "qga.sock"

    async def run() -> tuple[bool, float, float, float]:
        async with await asyncio.start_unix_server(fake.serve, str(socket)):
            before = time.time()
            began = time.monotonic()
            done = await agent.set_clock(socket, "vm")
            returned = time.monotonic() - began
            async with agent.connect(socket, "vm", timeout=3 * SLOW) as guest:
                await guest.ping()
            return done, returned, before, time.time()

    done, returned, before, after = asyncio.run(run())
    assert done
    assert returned < SLOW / 2, f"set_clock waited {returned:.2f} s for the guest"
    assert fake.asked == ["guest-sync-delimited", "guest-set-time",
                          "guest-sync-delimited", "guest-ping"]
    assert len(fake.set_to) == 1 and before * 1e9 <= fake.set_to[0] <= after * 1e9


def test_no_agent_socket_leaves_the_clock_alone_without_failing(tmp_path: Path) -> None:
    assert asyncio.run(agent.set_clock(tmp_path / "qga.sock", "vm")) is False
