"""Run external programs: argv lists only, logged at DEBUG, killed with their parent.

Every child gets ``PR_SET_PDEATHSIG`` = SIGKILL, so a waymark killed with SIGKILL leaves no
``qemu-img`` running behind it (a half-finished step is then redone by recovery).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from waymark.errors import ToolError, ToolMissing

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

# Debian package that ships each program we run, named in ToolMissing errors.
PACKAGES = {"qemu-img": "qemu-utils", "qemu-io": "qemu-utils"}


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


def run(argv: Sequence[str], *, what: str) -> Completed:
    """Run ``argv`` to completion; raise ToolError (with its stderr) when it fails.

    ``what`` says in words what the command was doing, for the error message.
    """
    argv = (which(argv[0]), *argv[1:])
    env = {**os.environ, "LC_ALL": "C"}
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(  # noqa: PLW1510 - return code checked below
            argv, capture_output=True, text=True, env=env, preexec_fn=_die_with_parent
        )
    except OSError as err:
        raise ToolError(f"could not run {argv[0]} while {what}: {err}") from err
    if proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}"
        raise ToolError(f"{os.path.basename(argv[0])} failed while {what}: {detail}")
    return Completed(tuple(argv), proc.stdout, proc.stderr)
