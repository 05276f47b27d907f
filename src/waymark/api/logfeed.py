"""One reader per serial log for the console's event streams (:mod:`waymark.api.console`).

While any stream shows a VM's console, one thread of the server (:class:`LogFeeds`) watches
the folders of the logs they show through Linux's inotify (a ``IN_MODIFY`` of the log's name
in its folder, which also sees a log created or replaced) and, when one grew, reads what was
appended, once, and hands it to every stream of that log (each its own queue, on its own event
loop). A stream reads the file itself only to catch up once, from the offset it starts at to
where the reader had got when it joined. Between writes nothing is read or woken: no stream
looks at the file every fraction of a second.

A log whose folder does not exist yet (a VM never started) cannot be watched: it is looked at
every :data:`FALLBACK` s until its folder appears, and watched from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import select
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FALLBACK = 1.0  # s between two looks at a log whose folder cannot be watched (yet)
CHUNK = 65536  # bytes read at once

IN_MODIFY, IN_MOVED_TO, IN_CREATE, IN_IGNORED = 0x2, 0x80, 0x100, 0x8000
MASK = IN_MODIFY | IN_MOVED_TO | IN_CREATE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name, NUL-padded)
_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """A non-blocking inotify descriptor (``inotify_init1``) and its watches."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd: int = fd

    def watch(self, folder: Path) -> int | None:
        """Watch ``folder`` for files written, created or moved into it; None when it cannot
        be (it does not exist)."""
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(folder), MASK)
        if wd < 0:
            code = ctypes.get_errno()
            if code in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                return None
            raise OSError(code, f"inotify_add_watch of {folder} failed")
        return int(wd)

    def unwatch(self, wd: int) -> None:
        _libc.inotify_rm_watch(self.fd, wd)  # (an error: the folder went, its watch with it)

    def events(self) -> list[tuple[int, str]]:
        """The (watch, file name) of every event waiting (none: an empty list)."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        found, at = [], 0
        while at + _EVENT.size <= len(data):
            wd, _mask, _cookie, size = _EVENT.unpack_from(data, at)
            name = data[at + _EVENT.size:at + _EVENT.size + size].rstrip(b"\0")
            found.append((wd, os.fsdecode(name)))
            at += _EVENT.size + size
        return found

    def close(self) -> None:
        os.close(self.fd)


Chunk = tuple[int, bytes]
"""What was appended to a log: (its offset, its bytes)."""


@dataclass(eq=False)
class Subscription:
    """One stream's share of a log: the chunks read for it, from ``start`` (where the reader
    had got when the stream joined) on."""

    path: Path
    start: int
    queue: asyncio.Queue[Chunk]
    loop: asyncio.AbstractEventLoop

    def hand(self, chunk: Chunk) -> None:
        with contextlib.suppress(RuntimeError):  # its loop is closed: it is leaving
            self.loop.call_soon_threadsafe(self.queue.put_nowait, chunk)


@dataclass(eq=False)
class _Log:
    """A log being read: how far, its folder's watch, and the streams it hands chunks to."""

    path: Path
    end: int
    wd: int | None = None
    subscribers: list[Subscription] = field(default_factory=list)


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read(path: Path, at: int, until: int | None = None) -> Iterator[bytes]:
    """The log's bytes from ``at`` (to ``until``, default its end), in pieces of at most
    :data:`CHUNK`."""
    try:
        with open(path, "rb") as log:
            log.seek(at)
            while until is None or at < until:
                piece = log.read(CHUNK if until is None else min(CHUNK, until - at))
                if not piece:
                    return
                at += len(piece)
                yield piece
    except OSError:
        return


class LogFeeds:
    """The server's log readers: one thread and one inotify descriptor while any stream
    listens (ended when the last one leaves; the next starts them again)."""

    def __init__(self, fallback: float = FALLBACK) -> None:
        self.fallback = fallback
        self._lock = threading.Lock()
        self._logs: dict[Path, _Log] = {}
        self._reader: threading.Thread | None = None
        self._inotify: Inotify | None = None

    def subscribe(self, path: Path) -> Subscription:
        """Join the reader of ``path`` (from the running event loop): chunks appended from
        the returned ``start`` on come to its queue."""
        with self._lock:
            log = self._logs.get(path)
            if log is None:
                log = self._logs[path] = _Log(path, size_of(path))
                if self._inotify is not None:
                    log.wd = self._inotify.watch(path.parent)
            sub = Subscription(path, log.end, asyncio.Queue(), asyncio.get_running_loop())
            log.subscribers.append(sub)
            if self._reader is None:
                self._inotify = Inotify()
                for each in self._logs.values():
                    each.wd = self._inotify.watch(each.path.parent)
                self._reader = threading.Thread(target=self._run, args=(self._inotify,),
                                                name="console-logs", daemon=True)
                self._reader.start()
            return sub

    def leave(self, sub: Subscription) -> None:
        with self._lock:
            log = self._logs.get(sub.path)
            if log is None or sub not in log.subscribers:
                return
            log.subscribers.remove(sub)
            if not log.subscribers:
                del self._logs[sub.path]
                if log.wd is not None and self._inotify is not None and not any(
                        other.wd == log.wd for other in self._logs.values()):
                    self._inotify.unwatch(log.wd)

    def _run(self, inotify: Inotify) -> None:
        try:
            while self._listening(inotify):
                woken = self._wait(inotify)
                with self._lock:
                    for log in list(self._logs.values()):
                        unwatched = log.wd is None
                        if unwatched:  # its folder may exist by now (read it all the same)
                            log.wd = inotify.watch(log.path.parent)
                        if unwatched or (log.wd, log.path.name) in woken:
                            self._advance(log)
        finally:
            inotify.close()

    def _wait(self, inotify: Inotify) -> set[tuple[int, str]]:
        """The events that came within the fallback interval (a look every
        :data:`FALLBACK` s also notices the last stream leaving)."""
        ready, _, _ = select.select([inotify.fd], [], [], self.fallback)
        return set(inotify.events()) if ready else set()

    def _listening(self, inotify: Inotify) -> bool:
        with self._lock:
            if not self._logs:
                self._reader, self._inotify = None, None
                return False
            return True

    @staticmethod
    def _advance(log: _Log) -> None:
        """Read what was appended to ``log`` since, once, and hand it to each stream."""
        log.end = min(log.end, size_of(log.path))  # (a log replaced: from its new end)
        for piece in read(log.path, log.end):
            chunk = (log.end, piece)
            log.end += len(piece)
            for sub in log.subscribers:
                sub.hand(chunk)
