"""A saved state hashed by a thread while QEMU loads it (``power._Checker``), without QEMU."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from waymark.engine.running import power

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
