"""Unix socket paths of any length.

A Unix socket's address holds at most :data:`SOCKET_PATH_MAX` bytes (``sun_path``, its final
NUL included), and a VM's sockets live under the Waymark home (``vms/<id>/run/qmp.sock``): a
deep home would make them unreachable. Waymark binds every VM socket itself (QEMU gets the
listening descriptor, :mod:`waymark.qemu.confine`) and connects to them itself, so each bind and
connect goes through :func:`address`: a path too long is reached as
``/proc/self/fd/N/<name>``, ``N`` the socket's folder opened for the call (Linux resolves the
folder through that link; the file system sees the socket at its real path).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

SOCKET_PATH_MAX = 108  # sun_path of a Unix socket address, its final NUL included


@contextlib.contextmanager
def address(path: Path) -> Iterator[str]:
    """An address for binding or connecting to the socket ``path``, valid inside the block:
    ``path`` itself when it fits, else a short path through its folder, opened until the
    block ends (a socket bound or connected keeps working after that)."""
    if len(os.fsencode(path)) < SOCKET_PATH_MAX:
        yield str(path)
        return
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)
