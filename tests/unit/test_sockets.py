"""Unix socket paths of any length (:mod:`waymark.qemu.sockets`): a path longer than a socket
address holds is bound and reached through its folder, opened only for the call."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from waymark.qemu import sockets


def test_a_short_path_is_its_own_address(tmp_path: Path) -> None:
    path = Path("/tmp/qmp.sock")
    with sockets.address(path) as where:
        assert where == str(path)


def test_a_path_too_long_is_bound_and_reached_through_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / ("deep-" * 25)
    folder.mkdir()
    path = folder / "qmp.sock"
    assert len(os.fsencode(path)) > sockets.SOCKET_PATH_MAX
    opened = set(os.listdir("/proc/self/fd"))
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        with sockets.address(path) as where:
            assert where.startswith("/proc/self/fd/") and where.endswith("/qmp.sock")
            server.bind(where)
        server.listen()
        assert path.exists()  # the socket is where its path says
        with sockets.address(path) as where:
            client.connect(where)
        accepted, _ = server.accept()
        with accepted:
            client.sendall(b"hello")
            assert accepted.recv(5) == b"hello"
    assert set(os.listdir("/proc/self/fd")) == opened  # the folder was let go
