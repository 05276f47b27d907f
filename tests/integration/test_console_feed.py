"""The console's event streams are pushed what QEMU appends to a VM's serial log
(:class:`waymark.api.logfeed.LogFeeds`: one reader per log, woken by inotify), instead of each
stream reading the log five times a second.

On the feed itself: with its fallback look an hour apart, a line appended to the log reaches
every subscriber at once (only the kernel's notice could have woken it), read once for all of
them; a log whose folder does not exist yet is watched once it appears. Through a real ``waymark
serve``: two streams of one VM both get a line written while they are open, from where each
started, and end with the offset to go on from."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import Waymark, served
from waymark.api import logfeed
from waymark.engine.running import observe

HOUR = 3600.0
PATIENCE = 30.0  # s a wake-up may take on a loaded machine (never near the hour)


def append(path: Path, text: str) -> None:
    with open(path, "ab") as log:
        log.write(text.encode())


def test_a_line_appended_reaches_every_subscriber_at_once(tmp_path: Path,
                                                          monkeypatch: Any) -> None:
    log = tmp_path / "run" / "serial.log"
    log.parent.mkdir()
    log.write_bytes(b"booting\n")
    feeds = logfeed.LogFeeds(fallback=HOUR)
    reads: list[int] = []
    real = logfeed.read

    def counted(path: Path, at: int, until: int | None = None) -> Any:
        reads.append(at)
        return real(path, at, until)

    monkeypatch.setattr(logfeed, "read", counted)

    async def scenario() -> list[logfeed.Chunk]:
        first, second = feeds.subscribe(log), feeds.subscribe(log)
        try:
            assert first.start == second.start == len(b"booting\n")
            await asyncio.to_thread(append, log, "login: ")
            got = [await asyncio.wait_for(sub.queue.get(), PATIENCE) for sub in (first, second)]
            assert reads == [len(b"booting\n")]  # read once, for both
            return got
        finally:
            feeds.leave(first)
            feeds.leave(second)

    assert asyncio.run(scenario()) == [(8, b"login: "), (8, b"login: ")]


def test_a_log_whose_folder_appears_later_is_watched_from_then_on(tmp_path: Path) -> None:
    log = tmp_path / "run" / "serial.log"
    feeds = logfeed.LogFeeds(fallback=0.05)

    async def scenario() -> logfeed.Chunk:
        sub = feeds.subscribe(log)
        try:
            assert sub.start == 0
            await asyncio.sleep(0.2)  # looked at, not watchable yet
            log.parent.mkdir()
            append(log, "hello\n")
            return await asyncio.wait_for(sub.queue.get(), PATIENCE)
        finally:
            feeds.leave(sub)

    assert asyncio.run(scenario()) == (0, b"hello\n")


class Console(threading.Thread):
    """A console event stream read to its end, in a thread of its own."""

    def __init__(self, url: str, token: str, offset: int | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.token, self.offset = url, token, offset
        self.connected = threading.Event()
        self.events: list[tuple[str, dict[str, Any]]] = []

    def run(self) -> None:
        params = {} if self.offset is None else {"offset": str(self.offset)}
        with httpx.Client(base_url=self.url, timeout=60,
                          headers={"Authorization": f"Bearer {self.token}"}) as http, \
                http.stream("GET", "/api/vms/v/console/events", params=params) as resp:
            assert resp.status_code == 200
            self.connected.set()
            kind = ""
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    self.events.append((kind, json.loads(line.removeprefix("data: "))))

    def text(self) -> str:
        return "".join(data["text"] for kind, data in self.events if kind == "output")


def test_two_streams_of_a_vm_both_get_what_is_written_while_they_are_open(
        tmp_path: Path) -> None:
    wm = Waymark(tmp_path / "home")
    vm_id = wm.json("vm", "create", "v", "--disk", "1M")["id"]
    log = observe.run_files(wm.home, vm_id).serial_log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"earlier output\n")
    with served(wm) as (url, token):
        tail, later = Console(url, token), Console(url, token, offset=len(b"earlier "))
        for stream in (tail, later):
            stream.start()
            assert stream.connected.wait(PATIENCE)
        append(log, "Debian GNU/Linux 12 ttyS0\n")
        for stream in (tail, later):
            stream.join(PATIENCE + 30)
            assert not stream.is_alive()
    assert tail.text() == "earlier output\nDebian GNU/Linux 12 ttyS0\n", tail.events
    assert later.text() == "output\nDebian GNU/Linux 12 ttyS0\n", later.events
    end = len(b"earlier output\nDebian GNU/Linux 12 ttyS0\n")
    for stream in (tail, later):
        assert stream.events[-1] == ("end", {"offset": end}), stream.events
        assert stream.events[-2][1]["offset"] == end
