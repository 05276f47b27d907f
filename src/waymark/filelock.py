"""Advisory ``flock`` locks on files: the kernel drops them when their holder dies (even by
SIGKILL), so holding one also proves no live process is mid-operation."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from waymark.errors import Busy

POLL = 0.05


@contextmanager
def held(path: Path, *, timeout: float, busy: Callable[[], Busy]) -> Iterator[None]:
    """Hold the lock on ``path`` (created if missing); after ``timeout`` seconds of waiting,
    raise ``busy()``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise busy() from None
                time.sleep(POLL)
        yield
    finally:
        os.close(fd)
