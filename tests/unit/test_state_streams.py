"""The memory state's streams, without QEMU: a saved state hashed by a thread while QEMU
would load it (``power._Checker``), and a migration stream drained into a file while a thread
hashes what was written (``live_checkpoint._Drain`` and ``_Hasher``, also when the hasher is
held meanwhile, as from the guest's STOP to its resume)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from pathlib import Path

import pytest

from waymark.engine.running import live_checkpoint, power

SIZE = 9 * (1 << 20) + 12345  # more than two reads of 4 MiB, and not a multiple of one


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def test_the_checker_hashes_the_whole_file(state: Path) -> None:
    checker = power._Checker(state)
    checker.start()
    assert checker.sha256() == hashlib.sha256(state.read_bytes()).hexdigest()


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
