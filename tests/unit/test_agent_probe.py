"""``agent.answers``, the guest agent probe of ``vm status``: against a fake QEMU monitor that
reports whether the guest holds the agent's port open (``query-chardev``'s ``frontend-open``)
and a fake agent that answers after a delay. A guest without an agent costs no wait; an agent
that answers within the probe's timeout, however slowly, is reported as answering."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tests.unit import json_stream
from waymark.guest import agent
from waymark.qemu import cmdline, qmp

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                    "capabilities": []}}


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 answer: dict[str, object], greeting: bytes, delay: float) -> None:
    """Answer every command from ``answer`` (by name; the agent's sync echoes its id, after
    0xFF as the real agent does), each after ``delay`` seconds."""
    writer.write(greeting)
    pending = ""
    while chunk := await reader.read(4096):
        messages, pending = json_stream.messages(pending + chunk.decode())
        for message in messages:
            await asyncio.sleep(delay)
            name = str(message["execute"])
            if name == "guest-sync-delimited":
                arguments = message["arguments"]
                assert isinstance(arguments, dict)
                reply = b"\xff" + json.dumps({"return": arguments["id"],
                                               "id": message.get("id")}).encode()
            else:
                reply = json.dumps({"return": answer.get(name, {}),
                                    "id": message.get("id")}).encode()
            writer.write(reply + b"\n")
    writer.close()


class Fakes:
    """A fake monitor and a fake agent; ``agent_sessions`` counts connections to the agent."""

    def __init__(self, folder: Path, port_open: bool, agent_delay: float) -> None:
        self.qmp, self.agent = folder / "qmp.sock", folder / "qga.sock"
        self.port_open, self.agent_delay = port_open, agent_delay
        self.agent_sessions = 0

    async def monitor(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chardevs = [{"label": "qmp0", "frontend-open": True, "filename": "unix:q"},
                    {"label": cmdline.AGENT_CHARDEV, "frontend-open": self.port_open,
                     "filename": "disconnected:unix:a"}]
        await _serve(reader, writer, {"query-chardev": chardevs},
                     json.dumps(GREETING).encode() + b"\r\n", 0.0)

    async def guest(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.agent_sessions += 1
        await _serve(reader, writer, {}, b"", self.agent_delay)

    async def probe(self, timeout: float = agent.PROBE_TIMEOUT) -> tuple[bool, float]:
        async with await asyncio.start_unix_server(self.monitor, str(self.qmp)), \
                await asyncio.start_unix_server(self.guest, str(self.agent)):
            began = time.monotonic()
            async with qmp.connect(self.qmp, "vm") as machine:
                answered = await agent.answers(machine, self.agent, "vm", timeout)
            return answered, time.monotonic() - began


def test_a_guest_without_an_agent_is_answered_at_once(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path, port_open=False, agent_delay=0.0)
    answered, took = asyncio.run(fakes.probe())
    assert answered is False
    assert fakes.agent_sessions == 0  # nothing was asked of the guest
    assert took < agent.PROBE_TIMEOUT / 2, took


def test_a_slow_agent_that_answers_within_the_timeout_is_alive(tmp_path: Path) -> None:
    # two round trips (sync, ping), each 0.3 of the timeout late: 0.6 of it in all
    fakes = Fakes(tmp_path, port_open=True, agent_delay=agent.PROBE_TIMEOUT * 0.3)
    answered, took = asyncio.run(fakes.probe())
    assert answered is True
    assert took >= agent.PROBE_TIMEOUT * 0.6, took


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_an_agent_that_answers_at_once_is_alive(tmp_path: Path, delay: float) -> None:
    answered, _ = asyncio.run(Fakes(tmp_path, port_open=True, agent_delay=delay).probe())
    assert answered is True


def test_an_open_port_whose_agent_never_answers_costs_the_timeout_only(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path, port_open=True, agent_delay=60.0)
    answered, took = asyncio.run(fakes.probe(timeout=0.3))
    assert answered is False
    assert 0.3 <= took < 1.5, took
