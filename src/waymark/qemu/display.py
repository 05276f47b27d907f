"""A running VM's screen: a picture of it (QMP ``screendump``) and a connection to its VNC
server (:func:`waymark.qemu.cmdline.display`).

Both keep QEMU's user away from Waymark's paths. The picture is written into a memory file
Waymark made and handed over open (an fd set: QEMU opens ``/dev/fdset/N``), then read back
here: QEMU never writes a path, and the caller writes the PNG where it was asked, as itself.
The VNC socket lives in a folder QEMU's user owns, so what is found at its path may be
anything that user put there (a link to another program's socket): a connection is kept only
when the VM's own QEMU process is at its other end (``SO_PEERCRED``), before a byte is sent.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

from waymark.errors import Conflict
from waymark.qemu import qmp, sockets

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


async def screendump(machine: qmp.Qmp, label: str) -> bytes:
    """The VM's screen now, as PNG bytes."""
    memory = os.memfd_create("screendump", os.MFD_CLOEXEC)
    try:
        # an fd set's descriptor must have the access mode QEMU opens it with (write only)
        writer = os.open(f"/proc/self/fd/{memory}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            machine.client.send_fd_scm(writer)
        finally:
            os.close(writer)
        added = await machine.command("add-fd", opaque=f"screendump of {label}")
        try:
            await machine.command("screendump", filename=f"/dev/fdset/{added['fdset-id']}",
                                  format="png")
        finally:
            await machine.command("remove-fd", **{"fdset-id": added["fdset-id"]})
        picture = _read_all(memory)
    finally:
        os.close(memory)
    if not picture.startswith(PNG_SIGNATURE):
        raise Conflict(f"QEMU wrote no PNG picture of {label}'s screen.",
                       hint="Try again once the VM has booted.")
    return picture


def _read_all(fd: int) -> bytes:
    parts, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def connect(path: Path, qemu_pid: int, label: str) -> socket.socket:
    """A connection to the VM's VNC server at ``path`` (non-blocking), refused unless the
    process at the other end is ``qemu_pid``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with sockets.address(path) as where:
            sock.connect(where)
        pid, _, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if pid != qemu_pid:
            raise Conflict(f"the display socket of {label} is not its QEMU's (process {pid} "
                           f"answers, QEMU is {qemu_pid}): not connected.",
                           hint=f"Restart the VM: waymark vm stop {label}; waymark vm start "
                                f"{label}")
    except OSError as err:
        sock.close()
        raise Conflict(f"cannot reach the display of {label}: {err.strerror or err}.",
                       hint=f"Is it running? waymark vm status {label} (a VM started before "
                            "Waymark had a graphical console gets one at its next start)") \
            from err
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
