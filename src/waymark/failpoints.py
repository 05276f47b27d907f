"""Failpoints: where tests kill Waymark with SIGKILL to prove an operation survives it.

They exist for Waymark's test suite only and are off unless a process arms them at its start
(:func:`arm`, called by the ``waymark`` entry point), which takes two keys:
``WAYMARK_TEST_SUITE=1`` (set only by the test suite's helpers: ``tests.helpers.Waymark.env``)
and a failpoint variable: ``WAYMARK_FAILPOINT`` = a point's number (in the order a run passes
them) or its label kills the process there; ``WAYMARK_FAILPOINT_LOG`` = a file that gets one
``<number> <label>`` line per point passed; ``WAYMARK_FAILPOINT_RAISE`` = a label raises a plain
:class:`RuntimeError` at every point of that label (an unexpected exception, for the faces'
last-resort handlers: the API's answers it, audited). A failpoint variable without the first key is
ignored with a warning, and ``waymark serve`` refuses to start with a kill or a trace armed
(:func:`armed`): a server never kills itself on a request, whatever its environment says (a
raise only fails the request). Disarmed, a failpoint costs one
attribute read. The count of points passed is kept under a lock (a server's threads, or a
command's, pass points concurrently).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

SUITE_KEY, KILL, TRACE = "WAYMARK_TEST_SUITE", "WAYMARK_FAILPOINT", "WAYMARK_FAILPOINT_LOG"
RAISE = "WAYMARK_FAILPOINT_RAISE"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Plan:
    kill_at: str | None  # a point's number or label
    trace: str | None  # the file that lists the points passed
    raise_at: str | None = None  # a label where a RuntimeError is raised


_plan: _Plan | None = None
_points_passed = 0
_lock = threading.Lock()


def arm(environ: Mapping[str, str]) -> None:
    """Arm the failpoints ``environ`` asks for, when it holds the test suite's key too."""
    global _plan
    kill_at, trace = environ.get(KILL) or None, environ.get(TRACE) or None
    raise_at = environ.get(RAISE) or None
    if kill_at is None and trace is None and raise_at is None:
        _plan = None
    elif environ.get(SUITE_KEY) != "1":
        _plan = None
        log.warning("%s, %s and %s are ignored: failpoints are for Waymark's test suite only "
                    "(unset them)", KILL, TRACE, RAISE)
    else:
        _plan = _Plan(kill_at, trace, raise_at)


def armed() -> bool:
    """Whether a failpoint kills the process or lists the points passed (a raise alone does
    neither)."""
    return _plan is not None and (_plan.kill_at is not None or _plan.trace is not None)


def failpoint(label: str = "step") -> None:
    """A journal point: when armed, a test kills the process here (``WAYMARK_FAILPOINT`` = its
    number or its label), raises a RuntimeError here (``WAYMARK_FAILPOINT_RAISE`` = its label)
    or lists the points a run passes (``WAYMARK_FAILPOINT_LOG``)."""
    plan = _plan
    if plan is None:
        return
    global _points_passed
    with _lock:
        index = _points_passed
        _points_passed += 1
        if plan.trace:
            _trace(plan.trace, f"{index} {label}\n")
    if plan.kill_at in (str(index), label):
        os.kill(os.getpid(), signal.SIGKILL)
    if plan.raise_at == label:
        raise RuntimeError(f"failpoint {label!r} raised, as {RAISE} asked")


def _trace(path: str, line: str) -> None:
    with open(path, "a") as out:
        out.write(line)
    if stat.S_ISFIFO(os.stat(path).st_mode):
        _until_read(path)


def _until_read(fifo: str) -> None:
    """A test that reads the trace through a FIFO holds the run at each point (the point's
    open() waits for a reader): wait until the reader has closed its end after this line, so
    that the next point's open() waits again instead of joining a read still under way (two
    points would pass as one, the run not held at the second)."""
    while True:
        try:
            probe = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no reader: the line was read and its end closed
                return
            raise
        os.close(probe)
        time.sleep(0.001)
