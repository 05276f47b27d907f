"""A VM's TPM changed and read from the host as its guest would, with the real tpm2-tools: a
swtpm started on the VM's TPM state (the VM is off) on loopback ports, shut down cleanly after."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NV = "0x1500016"  # an owner-defined NV index


def _free_pair() -> int:
    """A loopback port P with P + 1 free too (the swtpm TCTI's data and control ports)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        with socket.socket() as second:
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two free loopback ports in a row")


@contextmanager
def tpm_session(folder: Path) -> Iterator[dict[str, str]]:
    """swtpm on a VM's TPM state (the VM is off) on loopback; yields the environment for
    tpm2-tools; shut down cleanly (its state written) at the end."""
    port = _free_pair()
    swtpm = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={folder}",
                              "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                              "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                              "--flags", "startup-clear"])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port + 1), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and swtpm.poll() is None, "swtpm did not start"
                time.sleep(0.05)
        yield {**os.environ, "TPM2TOOLS_TCTI": f"swtpm:host=127.0.0.1,port={port}"}
    finally:
        subprocess.run(["swtpm_ioctl", "--tcp", f"127.0.0.1:{port + 1}", "-s"],
                       capture_output=True, check=False)
        try:
            swtpm.wait(10)
        except subprocess.TimeoutExpired:
            swtpm.kill()
            swtpm.wait()


def tpm2(env: dict[str, str], *args: str, data: bytes | None = None) -> str:
    done = subprocess.run(["tpm2_" + args[0], *args[1:]], env=env, input=data,
                          capture_output=True, check=True)
    return done.stdout.decode(errors="replace")


def nv_write(folder: Path, text: str) -> None:
    """The NV index holds ``text`` (defined first when it is not)."""
    with tpm_session(folder) as env:
        if NV not in tpm2(env, "nvreadpublic"):
            tpm2(env, "nvdefine", NV, "-C", "o", "-s", "16", "-a", "ownerread|ownerwrite")
        tpm2(env, "nvwrite", NV, "-C", "o", "-i", "-", data=text.ljust(16).encode())


def nv_read(folder: Path) -> str:
    with tpm_session(folder) as env:
        return tpm2(env, "nvread", NV, "-C", "o", "-s", "16").strip()


