"""``qemu.monitor.ask`` and ``query``, the synchronous QMP queries of ``vm status``'s read path
(and of the guest tests and benches), against a fake QEMU monitor on a Unix socket: answers in
order with events in between, arguments sent, QEMU's refusal, a monitor that never greets,
closes or speaks no QMP; each failure a ToolError naming the VM."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from waymark.errors import ToolError
from waymark.qemu import monitor

GREETING = b'{"QMP": {"version": {}, "capabilities": []}}\r\n'
EVENT = b'{"event": "RTC_CHANGE", "data": {"offset": 1}, "timestamp": {}}\r\n'


class Client:
    """The fake monitor's side of one connection."""

    def __init__(self, conn: socket.socket, asked: list[str]) -> None:
        self.conn, self.asked, self.lines = conn, asked, conn.makefile("rb")

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def command(self) -> str | None:
        """The next command's name (recorded in ``asked``); None once the client left."""
        line = self.lines.readline()
        if not line:
            return None
        name = str(json.loads(line)["execute"])
        self.asked.append(name)
        return name


Speak = Callable[[Client], None]


@contextmanager
def fake_qemu(path: Path, speak: Speak) -> Iterator[list[str]]:
    """A monitor on ``path`` that talks to one client with ``speak``; yields the commands it
    was sent (filled in as they come)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    asked: list[str] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            speak(Client(conn, asked))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield asked
    finally:
        server.close()
        thread.join(5)


def answering(answers: dict[str, object]) -> Speak:
    """Greets, then answers each command from ``answers`` (an unknown one: QEMU's refusal), an
    event before each answer."""
    def speak(client: Client) -> None:
        client.send(GREETING)
        while (name := client.command()) is not None:
            reply = {"return": answers.get(name, {})} if name in answers or \
                name == "qmp_capabilities" else {"error": {"class": "CommandNotFound",
                                                           "desc": f"{name} not found"}}
            client.send(EVENT + json.dumps(reply).encode() + b"\r\n")
    return speak


def test_queries_are_answered_in_order_with_events_between(tmp_path: Path) -> None:
    status = {"status": "running", "running": True}
    chardevs = [{"label": "qga0", "frontend-open": False}]
    with fake_qemu(tmp_path / "qmp.sock", answering({"query-status": status,
                                                     "query-chardev": chardevs})) as asked:
        answers = monitor.ask(tmp_path / "qmp.sock", "vm1", "query-status", "query-chardev")
    assert answers == [status, chardevs]
    assert asked == ["qmp_capabilities", "query-status", "query-chardev"]


def test_a_query_with_arguments_sends_them_and_a_refusal_of_any_shape_is_an_error(
        tmp_path: Path) -> None:
    def echo(client: Client) -> None:  # answers each command with the arguments it was sent
        client.send(GREETING)
        while line := client.lines.readline():
            message = json.loads(line)
            reply = {"return": message.get("arguments", {})} if message["execute"] != "bad" \
                else {"error": "no object"}
            client.send(json.dumps(reply).encode() + b"\r\n")
    with fake_qemu(tmp_path / "qmp.sock", echo):
        assert monitor.query(tmp_path / "qmp.sock", "vm1", "query-named-block-nodes",
                             flat=True) == {"flat": True}
    with fake_qemu(tmp_path / "qmp2.sock", echo), \
            pytest.raises(ToolError, match="QEMU refused bad for vm1: no object"):
        monitor.query(tmp_path / "qmp2.sock", "vm1", "bad")


def test_a_refused_query_is_an_error_with_qemus_reason(tmp_path: Path) -> None:
    with fake_qemu(tmp_path / "qmp.sock", answering({})), \
            pytest.raises(ToolError, match="QEMU refused query-nothing for vm1: "
                                           "query-nothing not found"):
        monitor.ask(tmp_path / "qmp.sock", "vm1", "query-nothing")


def test_a_monitor_that_never_greets_fails_within_the_timeout(tmp_path: Path) -> None:
    def silent(client: Client) -> None:
        time.sleep(1.0)

    with fake_qemu(tmp_path / "qmp.sock", silent):
        started = time.monotonic()
        with pytest.raises(ToolError, match=r"cannot ask QEMU of vm1 at .*qmp\.sock"):
            monitor.ask(tmp_path / "qmp.sock", "vm1", "query-status", timeout=0.3)
        assert time.monotonic() - started < 0.9


@pytest.mark.parametrize("said", [b"", b"not json\n", b"[1, 2]\n"])
def test_a_monitor_that_closes_or_speaks_no_qmp_is_an_error(tmp_path: Path, said: bytes) -> None:
    def speak(client: Client) -> None:
        client.send(said)

    with fake_qemu(tmp_path / "qmp.sock", speak), \
            pytest.raises(ToolError, match="cannot ask QEMU of vm1"):
        monitor.ask(tmp_path / "qmp.sock", "vm1", "query-status")


def test_no_monitor_listening_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="cannot ask QEMU of vm1"):
        monitor.ask(tmp_path / "qmp.sock", "vm1", "query-status")
