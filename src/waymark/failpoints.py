"""Failpoints: where tests kill Waymark with SIGKILL to prove an operation survives it.

They exist for Waymark's test suite only and are off unless a process arms them at its start
(:func:`arm`, called by the ``waymark`` entry point), which takes two keys:
``WAYMARK_TEST_SUITE=1`` (set only by the test suite's helpers: ``tests.helpers.Waymark.env``)
and a failpoint variable: ``WAYMARK_FAILPOINT`` = a point's number (in the order a run passes
them) or its label kills the process there; ``WAYMARK_FAILPOINT_LOG`` = a file that gets one
``<number> <label>`` line per point passed. A failpoint variable without the first key is
ignored with a warning, and ``waymark serve`` refuses to start with failpoints armed: a server
never kills itself on a request, whatever its environment says. Disarmed, a failpoint costs one
attribute read. The count of points passed is kept under a lock (a server's threads, or a
command's, pass points concurrently).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass

SUITE_KEY, KILL, TRACE = "WAYMARK_TEST_SUITE", "WAYMARK_FAILPOINT", "WAYMARK_FAILPOINT_LOG"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Plan:
    kill_at: str | None  # a point's number or label
    trace: str | None  # the file that lists the points passed


_plan: _Plan | None = None
_points_passed = 0
_lock = threading.Lock()


def arm(environ: Mapping[str, str]) -> None:
    """Arm the failpoints ``environ`` asks for, when it holds the test suite's key too."""
    global _plan
    kill_at, trace = environ.get(KILL) or None, environ.get(TRACE) or None
    if kill_at is None and trace is None:
        _plan = None
    elif environ.get(SUITE_KEY) != "1":
        _plan = None
        log.warning("%s and %s are ignored: failpoints are for Waymark's test suite only "
                    "(unset them)", KILL, TRACE)
    else:
        _plan = _Plan(kill_at, trace)


def armed() -> bool:
    return _plan is not None


def failpoint(label: str = "step") -> None:
    """A journal point: when armed, a test kills the process here (``WAYMARK_FAILPOINT`` = its
    number or its label) or lists the points a run passes (``WAYMARK_FAILPOINT_LOG``)."""
    plan = _plan
    if plan is None:
        return
    global _points_passed
    with _lock:
        index = _points_passed
        _points_passed += 1
        if plan.trace:
            with open(plan.trace, "a") as out:
                out.write(f"{index} {label}\n")
    if plan.kill_at in (str(index), label):
        os.kill(os.getpid(), signal.SIGKILL)
