"""The test guest's serial log as the benchmarks read it (shared by bench/runtime.py and
bench/harness.py, the base of bench/live.py, bench/merge.py and bench/backup.py)."""

from __future__ import annotations

import re
from pathlib import Path

COUNTER = re.compile(rb"^COUNTER (\d+)\r?$", re.MULTILINE)


class SerialLog:
    """Reads a VM's serial log, ``serial``, set by the class that mixes it in."""

    serial: Path

    def log(self, mark: int = 0) -> bytes:
        try:
            return self.serial.read_bytes()[mark:]
        except FileNotFoundError:
            return b""

    def mark(self) -> int:
        return len(self.log())

    def last_counter(self, mark: int = 0) -> int:
        """The last complete COUNTER line's value after ``mark`` (0 when none)."""
        text = self.log(mark)
        found = COUNTER.findall(text[:text.rfind(b"\n") + 1])
        return int(found[-1]) if found else 0
