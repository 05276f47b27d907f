"""Failpoints: where tests kill Waymark with SIGKILL to prove an operation survives it.

``WAYMARK_FAILPOINT`` = a point's number (in the order a run passes them) or its label kills the
process there; ``WAYMARK_FAILPOINT_LOG`` = a file that gets one ``<number> <label>`` line per
point passed. Without them a failpoint costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

_points_passed = 0


def failpoint(label: str = "step") -> None:
    """A journal point: tests kill the process here (``WAYMARK_FAILPOINT`` = its number or its
    label) and list the points a run passes (``WAYMARK_FAILPOINT_LOG`` = a file that gets one
    ``<number> <label>`` line per point)."""
    global _points_passed
    index = _points_passed
    _points_passed += 1
    trace = os.environ.get("WAYMARK_FAILPOINT_LOG")
    if trace:
        with open(trace, "a") as out:
            out.write(f"{index} {label}\n")
    if os.environ.get("WAYMARK_FAILPOINT") in (str(index), label):
        os.kill(os.getpid(), signal.SIGKILL)
