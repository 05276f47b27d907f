"""Run external programs: argv lists only, logged at DEBUG, killed with their parent.

Every child gets ``PR_SET_PDEATHSIG`` = SIGKILL, so a waymark killed with SIGKILL leaves no
``qemu-img`` running behind it (a half-finished step is then redone by recovery).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from waymark.errors import ToolError, ToolMissing, tool_failed

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

# Debian package that ships each program we run, named in ToolMissing errors.
PACKAGES = {"qemu-img": "qemu-utils", "qemu-io": "qemu-utils",
            "qemu-storage-daemon": "qemu-system-common",
            "qemu-system-x86_64": "qemu-system-x86"}


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    stdout: str
    stderr: str


def which(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        package = PACKAGES.get(program, program)
        raise ToolMissing(
            f"{program} is not installed.",
            hint=f"Install it with: apt-get install -y {package}",
        )
    return path


def run(argv: Sequence[str], *, what: str, pass_fds: Sequence[int] = (),
        answers: Sequence[int] = ()) -> Completed:
    """Run ``argv`` to completion; raise ToolError (with its stderr) when it fails.

    ``what`` says in words what the command was doing, for the error message; ``pass_fds``
    stay open in the child (as ``/dev/fd/N``); ``answers``: non-zero exit codes that are an
    answer, not a failure (``qemu-img check`` exits 2 for corruption, 3 for leaks).
    """
    argv = (which(argv[0]), *argv[1:])
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(  # noqa: PLW1510 - return code checked by _checked
            argv, capture_output=True, text=True, env=_env(), pass_fds=tuple(pass_fds),
            preexec_fn=_die_with_parent,
        )
    except OSError as err:
        raise ToolError(f"could not run {argv[0]} while {what}: {err}") from err
    done = Completed(tuple(argv), proc.stdout, proc.stderr)
    return done if proc.returncode in answers else _checked(done, proc.returncode, what)


def start(argv: Sequence[str], *, what: str) -> subprocess.Popen[bytes]:
    """Start a long-lived helper (its stderr piped, for the error message); it dies with us."""
    argv = (which(argv[0]), *argv[1:])
    log.debug("start: %s", " ".join(argv))
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=_env(),
                                preexec_fn=_die_with_parent)  # noqa: PLW1509
    except OSError as err:
        raise ToolError(f"could not run {argv[0]} while {what}: {err}") from err


def spawn(argv: Sequence[str], *, what: str, pass_fds: Sequence[int], stderr: IO[bytes],
          user: int | None = None, group: int | None = None,
          extra_groups: list[int] | None = None) -> subprocess.Popen[bytes]:
    """Start a program that outlives us (a session of its own, no parent-death signal), as
    ``user``/``group`` when given, with ``pass_fds`` open. A thread reaps it when it exits, so a
    long-lived server keeps no zombies."""
    argv = (which(argv[0]), *argv[1:])
    log.debug("spawn: %s", " ".join(argv))
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=stderr, env=_env(), pass_fds=tuple(pass_fds),
                                 start_new_session=True, user=user, group=group,
                                 extra_groups=extra_groups)
    except OSError as err:
        raise ToolError(f"could not run {argv[0]} while {what}: {err}") from err
    threading.Thread(target=child.wait, name=f"reap-{child.pid}", daemon=True).start()
    return child


_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def run_progress(argv: Sequence[str], *, what: str, on_progress: Callable[[float], None],
                 pass_fds: Sequence[int] = ()) -> Completed:
    """Run a qemu-img command given ``-p``, reporting each ``(x/100%)`` it prints as x/100."""
    argv = (which(argv[0]), *argv[1:])
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=_env(), pass_fds=tuple(pass_fds),
                                preexec_fn=_die_with_parent)  # noqa: PLW1509
    except OSError as err:
        raise ToolError(f"could not run {argv[0]} while {what}: {err}") from err
    assert proc.stdout is not None and proc.stderr is not None
    buffer = b""
    try:
        while chunk := os.read(proc.stdout.fileno(), 4096):
            buffer += chunk
            *done, buffer = re.split(rb"[\r\n]", buffer)
            for piece in done:
                if match := _PERCENT.search(piece):
                    on_progress(float(match.group(1)) / 100)
    except BaseException:  # the caller gave up (a cancelled job): the tool stops too
        proc.kill()
        proc.wait()
        raise
    stderr = proc.stderr.read().decode(errors="replace")
    code = proc.wait()
    return _checked(Completed(tuple(argv), "", stderr), code, what)


def _env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C"}


def _checked(done: Completed, returncode: int, what: str) -> Completed:
    if returncode == 0:
        return done
    detail = done.stderr.strip() or done.stdout.strip() or f"exit code {returncode}"
    raise tool_failed(f"{os.path.basename(done.argv[0])} failed while {what}: {detail}")


def start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with the
    pid, it names one process for good (a recycled pid has another start time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 and fields[0] != "Z" else None


@dataclass(frozen=True)
class Usage:
    """What a process has used: CPU time (user + system, seconds since it started) and its
    resident memory (bytes), as ``/proc/PID/stat`` and ``/proc/PID/statm`` tell."""

    cpu_seconds: float
    rss_bytes: int


def usage(pid: int) -> Usage | None:
    """The process's :class:`Usage` now, or None when it is gone (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 13 or fields[0] == "Z":
        return None
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    return Usage(ticks / os.sysconf("SC_CLK_TCK"),
                 int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE"))


def identity() -> tuple[int, int | None]:
    """This process, as (pid, start time)."""
    return os.getpid(), start_time(os.getpid())


def alive(pid: int | None, start: int | None) -> bool:
    """The process (pid, start time) still runs."""
    return pid is not None and start is not None and start_time(pid) == start
