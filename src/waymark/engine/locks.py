"""Per-VM locks: two commands never interleave changes to one VM.

An advisory ``flock`` on ``$WAYMARK_HOME/locks/<vm-id>.lock``. The kernel drops it when its holder
dies (even by SIGKILL), so holding the lock also proves no live process is mid-operation: that is
when recovery may finish a dead holder's journal intents.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import AbstractContextManager
from pathlib import Path

from waymark import filelock
from waymark.errors import Busy

_POLL = 0.05


def _lock_path(home: Path, key: str) -> Path:
    folder = home / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.lock"


def held(home: Path, key: str, *, timeout: float, label: str
         ) -> AbstractContextManager[None]:
    """Hold the lock ``key``; wait up to ``timeout`` seconds, then raise Busy."""
    return filelock.held(_lock_path(home, key), timeout=timeout, busy=lambda: Busy(
        f"{label} is busy: another waymark command has held it for {timeout:g} s.",
        hint="Retry when it finishes (or raise WAYMARK_LOCK_TIMEOUT)."))


def try_hold(home: Path, key: str) -> int | None:
    """Take the lock without waiting; the fd to close, or None when someone holds it."""
    fd = os.open(_lock_path(home, key), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
