"""A QEMU with no guest for the disks of a VM that is off: ``qemu-storage-daemon`` with the VM's
chains as block nodes (named as in the VM's own QEMU, the active image writable) and a QMP
monitor. Backups of stopped VMs then use QEMU's block jobs and dirty bitmaps exactly as for
running ones. Nothing writes the disks' content; on ``quit`` (or SIGTERM, when its caller
failed) the daemon writes its persistent bitmaps back into the images. Killed (with Waymark),
it leaves them marked in-use, which only makes the next backup full.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from waymark import process
from waymark.errors import ToolError
from waymark.qemu import cmdline, qmp

START_TIMEOUT = 10.0
QUIT_TIMEOUT = 30.0


def argv(chains: Sequence[cmdline.DiskChain], socket: Path) -> list[str]:
    args = ["qemu-storage-daemon"]
    for chain in chains:
        args += ["--blockdev" if a == "-blockdev" else a for a in cmdline.blockdevs(chain)]
    path = cmdline.escaped(str(socket))
    return [*args, "--chardev", f"socket,id=qmp0,path={path},server=on,wait=off",
            "--monitor", "chardev=qmp0"]


@dataclass(frozen=True)
class Started:
    """A storage daemon's process, started: it opens the images while its caller does other
    work; :func:`session` greets it."""

    process: subprocess.Popen[bytes]
    socket: Path
    label: str


@contextlib.contextmanager
def started(chains: Sequence[cmdline.DiskChain], label: str) -> Iterator[Started]:
    """A storage daemon holding ``chains``, started now; stopped on leaving unless it has quit
    (:func:`session`). Its socket lives in a private temporary folder (a socket path must stay
    under 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="waymark-") as folder:
        socket = Path(folder) / "qmp.sock"
        daemon = process.start(argv(chains, socket), what=f"opening the disks of {label}")
        try:
            yield Started(daemon, socket, label)
        finally:
            _stop(daemon)


@contextlib.asynccontextmanager
async def session(daemon: Started) -> AsyncIterator[qmp.Qmp]:
    """The QMP session to a daemon :func:`started`, which quits cleanly on exit."""
    label = daemon.label
    async with qmp.greeted(daemon.process, daemon.socket, label, timeout=START_TIMEOUT,
                           exited=lambda: _failed(daemon.process, label)) as machine:
        yield machine
        with contextlib.suppress(ToolError):  # the reply may be lost as it exits
            await machine.command("quit")
    code = await asyncio.to_thread(daemon.process.wait, QUIT_TIMEOUT)
    if code != 0:
        raise ToolError(f"qemu-storage-daemon for {label} exited with {code}: "
                        f"{_stderr(daemon.process)}")


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    """A daemon that has not quit (its caller failed) stopped: asked first (SIGTERM: it closes
    its images as on ``quit``, its bitmaps saved, not left in use), killed if it does not."""
    if daemon.poll() is not None:
        return
    daemon.terminate()
    try:
        daemon.wait(QUIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def _failed(daemon: subprocess.Popen[bytes], label: str) -> ToolError:
    return ToolError(f"qemu-storage-daemon could not open the disks of {label}: "
                     f"{_stderr(daemon)}")


def _stderr(daemon: subprocess.Popen[bytes]) -> str:
    assert daemon.stderr is not None
    return daemon.stderr.read().decode(errors="replace").strip() or "(no message)"
