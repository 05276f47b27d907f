"""A process's CPU time and resident memory read from /proc (``waymark.process.usage``), and a
VM's CPU use measured over an interval (``presence.usage``), on a real process: this one."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from waymark import process
from waymark.engine.running import presence


def rss_from_status() -> int:
    """VmRSS of /proc/self/status, in bytes (another file than the one usage() reads)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_usage_reads_this_process_cpu_time_and_memory() -> None:
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # some CPU time to measure
        pass
    before = time.process_time()
    used = process.usage(os.getpid())
    after = time.process_time()
    assert used is not None
    slack = 5 / os.sysconf("SC_CLK_TCK")  # /proc counts whole clock ticks, sampled
    assert before - slack <= used.cpu_seconds <= after + slack, (before, used, after)
    assert used.cpu_seconds >= 0.3 - slack
    expected = rss_from_status()
    assert abs(used.rss_bytes - expected) <= expected // 10, (used.rss_bytes, expected)
    held = bytearray(64 << 20)  # 64 MiB touched: the resident memory grows by it
    held[::4096] = b"\x01" * len(held[::4096])
    assert process.usage(os.getpid()).rss_bytes >= used.rss_bytes + (60 << 20)  # type: ignore[union-attr]
    del held


def test_usage_of_a_process_that_is_gone_is_none() -> None:
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    assert process.usage(child) is None


def test_the_cpu_use_over_an_interval_sees_a_busy_thread() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    busy = threading.Thread(target=spin)
    busy.start()
    try:
        found = presence.Process(os.getpid(), {"started_at": time.time() - 90})
        measured = presence.usage(found, interval=0.5)
    finally:
        stop.set()
        busy.join()
    assert measured is not None
    assert 0 < measured["cpu_percent"] <= 100 * (os.cpu_count() or 1) + 5, measured
    assert measured["cpu_seconds"] > 0 and measured["rss_bytes"] > 0
    assert 89 <= presence.uptime(found) <= 120  # type: ignore[operator]
    assert presence.uptime(presence.Process(os.getpid(), {})) is None
