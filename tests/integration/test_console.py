"""``waymark vm console`` through the real CLI, against a serial socket served by the test."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Waymark
from waymark.qemu import sockets


@pytest.fixture
def deep_wm() -> Iterator[Waymark]:
    """A home deeper than a Unix socket address holds (108 bytes): the console socket is
    reached through its folder (:mod:`waymark.qemu.sockets`)."""
    with tempfile.TemporaryDirectory(prefix="wm", dir="/tmp") as home:
        yield Waymark(Path(home) / ("deep-" * 20) / "home")


def serve_one_console(path: Path, greeting: bytes, typed: list[bytes] | None = None
                      ) -> threading.Thread:
    """A serial console that greets one client, then hangs up at once as QEMU does when the VM
    stops, or (given ``typed``) collects what the client types until it leaves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert len(str(path).encode()) > 108
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sockets.address(path) as where:
        server.bind(where)
    server.listen(1)

    def answer() -> None:
        with server, server.accept()[0] as client:
            # a client that typed and detached at once may have left before the greeting:
            # what it sent is still there to read
            with contextlib.suppress(BrokenPipeError):
                client.sendall(greeting)
            while typed is not None and (data := client.recv(1024)):
                typed.append(data)

    server_thread = threading.Thread(target=answer, daemon=True)
    server_thread.start()
    return server_thread


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_console_returns_when_the_vm_stops_without_a_key_pressed(deep_wm: Waymark,
                                                                 terminal: bool) -> None:
    wm = deep_wm
    vm_id = wm.json("vm", "create", "con", "--disk", "1M")["id"]
    serve_one_console(wm.home / "vms" / vm_id / "run" / "console.sock", b"guest login: ")
    # stdin stays open and silent (a terminal, or a pipe, nobody types on)
    keyboard, stdin = pty.openpty() if terminal else os.pipe()[::-1]
    try:
        proc = subprocess.Popen([sys.executable, "-m", "waymark", "vm", "console", "con"],
                                stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=wm.env())
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("waymark vm console still runs 20 s after the console closed")
        finally:
            out, err = proc.communicate()
    finally:
        os.close(keyboard)
        os.close(stdin)
    assert proc.returncode == 0, err
    assert out == b"guest login: "
    assert b"Connected to the console of con" in err and b"Detached." in err


def test_console_sends_keys_and_detaches_on_ctrl_close_bracket(deep_wm: Waymark) -> None:
    wm = deep_wm
    vm_id = wm.json("vm", "create", "con", "--disk", "1M")["id"]
    typed: list[bytes] = []
    server = serve_one_console(wm.home / "vms" / vm_id / "run" / "console.sock", b"$ ", typed)

    done = wm.run("vm", "console", "con", input="ls\n\x1dnot sent").ok()
    assert "Detached." in done.stderr
    server.join(10)  # (it has read all the client sent once the client is gone)
    assert b"".join(typed) == b"ls\n"


def serve_like_qemu(path: Path, answer: bytes, typed: list[bytes]) -> threading.Thread:
    """A serial console that reads as QEMU's does: a few bytes at a time (a UART, as fast as
    the guest reads), everything it has not read dropped when the client hangs up; once a whole
    line came, the guest answers ``answer`` a moment later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sockets.address(path) as where:
        server.bind(where)
    server.listen(1)

    def guest() -> None:
        with server, server.accept()[0] as client:
            watch = select.poll()
            watch.register(client, select.POLLIN | select.POLLRDHUP)
            while not any(mask & (select.POLLRDHUP | select.POLLHUP)
                          for _, mask in watch.poll(10_000)):
                typed.append(client.recv(4))
                if b"".join(typed).endswith(b"\n"):
                    time.sleep(0.5)  # the guest's shell runs the command
                    client.sendall(answer)
                time.sleep(0.05)

    thread = threading.Thread(target=guest, daemon=True)
    thread.start()
    return thread


def test_piped_input_reaches_the_guest_whole_and_its_answer_is_printed(
        deep_wm: Waymark) -> None:
    wm = deep_wm
    vm_id = wm.json("vm", "create", "con", "--disk", "1M")["id"]
    typed: list[bytes] = []
    guest = serve_like_qemu(wm.home / "vms" / vm_id / "run" / "console.sock",
                            b"CONSOLE-OK\r\n$ ", typed)

    began = time.monotonic()
    done = wm.run("vm", "console", "con", "--linger", "1", input="echo CONSOLE-OK\n").ok()
    took = time.monotonic() - began
    guest.join(10)
    assert b"".join(typed) == b"echo CONSOLE-OK\n", "the guest got only part of the input"
    assert "CONSOLE-OK" in done.stdout, done
    assert "Detached." in done.stderr
    assert took < 10, f"the console lingered {took:.1f} s for a guest quiet after 0.5 s"
