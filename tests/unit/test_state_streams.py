"""The memory state's streams, without QEMU: a saved state fed to a loader through a pipe while
it is hashed (``power._Feeder``), and a migration stream drained into a file while a thread
hashes what was written (``live_checkpoint._Drain`` and ``_Hasher``). The digest is the file's
sha256 whatever the reader does: it reads all, stops early, or the hasher is held meanwhile."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from pathlib import Path

import pytest

from waymark.engine.running import live_checkpoint, power

SIZE = 9 * (1 << 20) + 12345  # more than two feeder reads, and not a multiple of one


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def _read(fd: int, limit: int | None = None) -> bytes:
    """What a loader reads from the pipe: all of it, or ``limit`` bytes before it gives up."""
    got = bytearray()
    while limit is None or len(got) < limit:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        got += chunk
    os.close(fd)
    return bytes(got)


def test_the_feeder_streams_the_whole_file_and_its_sha256(state: Path) -> None:
    feeder = power._Feeder(state)
    loader = os.dup(feeder.read_end)
    os.close(feeder.read_end)
    feeder.start()
    assert _read(loader) == state.read_bytes()
    assert feeder.sha256() == hashlib.sha256(state.read_bytes()).hexdigest()


def test_a_loader_that_stops_reading_still_gets_the_files_digest(state: Path) -> None:
    """QEMU failed halfway and closed its end: the rest is hashed all the same (a damaged file
    is then told from a failed load)."""
    feeder = power._Feeder(state)
    loader = os.dup(feeder.read_end)
    os.close(feeder.read_end)
    feeder.start()
    assert len(_read(loader, limit=1 << 20)) >= 1 << 20
    assert feeder.sha256() == hashlib.sha256(state.read_bytes()).hexdigest()


def test_a_stopped_feeder_hashes_the_rest_without_a_reader(state: Path) -> None:
    """Given up on (a load that timed out, QEMU alive but not reading): no write blocks."""
    feeder = power._Feeder(state)
    feeder.start()
    feeder.stop()
    assert feeder.sha256() == hashlib.sha256(state.read_bytes()).hexdigest()
    os.close(feeder.read_end)


async def _drain(state: Path, out: Path, hold_midway: bool) -> tuple[str, int]:
    data = state.read_bytes()
    read_fd, write_fd = os.pipe()

    def qemu() -> None:  # writes the stream as QEMU does, then closes its end
        view = memoryview(data)
        while view:
            view = view[os.write(write_fd, view[:1 << 18]):]
        os.close(write_fd)

    with open(out, "w+b") as handle:
        hasher = live_checkpoint._Hasher(os.dup(handle.fileno()))
        hasher.start()
        drain = live_checkpoint._Drain(read_fd, handle.fileno(), hasher)
        if hold_midway:
            hasher.hold()  # as from the guest's STOP
        writer = threading.Thread(target=qemu)
        writer.start()
        try:
            await asyncio.wait_for(drain.done, 60)
        finally:
            drain.close()
            writer.join()
        try:
            return hasher.result(), drain.written
        finally:
            hasher.close()


@pytest.mark.parametrize("hold_midway", [False, True])
def test_the_drain_writes_the_stream_and_the_hasher_its_sha256(state: Path, tmp_path: Path,
                                                               hold_midway: bool) -> None:
    out = tmp_path / "copy.state"
    digest, written = asyncio.run(_drain(state, out, hold_midway))
    assert written == SIZE and out.read_bytes() == state.read_bytes()
    assert digest == hashlib.sha256(state.read_bytes()).hexdigest()
