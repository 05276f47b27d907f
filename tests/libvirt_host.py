"""A real libvirt (Debian 12's 9.0) for the tests: a private ``libvirtd`` started by the test on
sockets in a temporary folder (there is no systemd here, and no daemon runs), used through
``virsh`` to define domains and read the XML libvirt writes for them (``virsh dumpxml``, its
defaults filled in). Domains are only defined, never started: their NVRAM file and TPM state are
made where libvirt keeps them (:meth:`Libvirt.give_state`), as its first start would make them.

libvirtd runs as root with the system qemu driver (its state folders, such as
``/run/libvirt/qemu``, are host-wide, and it holds their pid files), so one instance runs at a
time: a file lock serializes the test files that use it (and where the host's own libvirtd
runs, its socket ``/run/libvirt/libvirt-sock`` is used instead). Every domain defined is
undefined at the end with its NVRAM and TPM state, and the daemon is stopped.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

OVMF = Path("/usr/share/OVMF")
NVRAM_DIR = Path("/var/lib/libvirt/qemu/nvram")
SWTPM_DIR = Path("/var/lib/libvirt/swtpm")
LOCK = Path(tempfile.gettempdir()) / "waymark-tests-libvirtd.lock"
CONF = """unix_sock_dir = "{folder}"
listen_tls = 0
listen_tcp = 0
auth_unix_rw = "none"
auth_unix_ro = "none"
"""


@dataclass
class Libvirt:
    """The private daemon's folder (its sockets) and the domains defined through it."""

    folder: Path
    defined: list[str] = field(default_factory=list)
    uri: str = ""

    def __post_init__(self) -> None:
        self.uri = self.uri or f"qemu:///system?socket={self.folder}/libvirt-sock"

    def virsh(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                              timeout=60, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def define(self, xml: str) -> str:
        """Define the domain ``xml`` (its name must be new); returns the XML libvirt writes."""
        with tempfile.NamedTemporaryFile("w", suffix=".xml") as file:
            file.write(xml)
            file.flush()
            out = self.virsh("define", file.name)
        name = out.split("'")[1]
        self.defined.append(name)
        return self.virsh("dumpxml", name)

    def uuid(self, name: str) -> str:
        return self.virsh("domuuid", name).strip()

    def give_state(self, name: str, variables: Path | None = None, tpm: bool = False) -> None:
        """What the domain's first start would make: its NVRAM file, copied from
        ``variables`` where libvirt keeps it, and a manufactured TPM 2.0 state in libvirt's
        swtpm folder (as libvirt runs swtpm_setup)."""
        if variables is not None:
            NVRAM_DIR.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(variables, NVRAM_DIR / f"{name}_VARS.fd")
        if tpm:
            folder = SWTPM_DIR / self.uuid(name) / "tpm2"
            folder.mkdir(parents=True, exist_ok=True)
            subprocess.run(["swtpm_setup", "--tpm2", "--tpmstate", str(folder), "--createek",
                            "--overwrite"], capture_output=True, check=True, timeout=60)


def unique(prefix: str) -> str:
    """A domain name no other test run uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextmanager
def private_libvirtd() -> Iterator[Libvirt]:
    """libvirtd on sockets of its own, for the ``with`` block (one at a time on the host); its
    domains undefined with their NVRAM and TPM state at the end, then it is stopped."""
    missing = [tool for tool in ("libvirtd", "virsh", "swtpm_setup") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: apt-get install -y "
                           "libvirt-daemon-system libvirt-clients swtpm-tools")
    if os.geteuid() != 0:
        raise RuntimeError("the libvirt tests run libvirt's system qemu driver: run them as root")
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if Path("/run/libvirt/libvirt-sock").exists():  # the host's own libvirtd runs
            with _undefining(Libvirt(Path("/run/libvirt"), uri="qemu:///system")) as libvirt:
                yield libvirt
            return
        folder = Path(tempfile.mkdtemp(prefix="wm-libvirt-"))
        (folder / "libvirtd.conf").write_text(CONF.format(folder=folder))
        log = (folder / "libvirtd.log").open("wb")
        daemon = subprocess.Popen(["libvirtd", "--config", str(folder / "libvirtd.conf"),
                                   "--pid-file", str(folder / "libvirtd.pid")],
                                  stdout=log, stderr=log)
        libvirt = Libvirt(folder)
        try:
            _wait_ready(libvirt, daemon)
            with _undefining(libvirt):
                yield libvirt
        finally:
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            log.close()
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _undefining(libvirt: Libvirt) -> Iterator[Libvirt]:
    """``libvirt``; the domains defined through it undefined at the end, NVRAM and TPM state
    with them."""
    try:
        yield libvirt
    finally:
        for name in libvirt.defined:
            libvirt.virsh("undefine", name, "--nvram", "--tpm", check=False)


def _wait_ready(libvirt: Libvirt, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while (libvirt.folder / "libvirt-sock").exists() is False or \
            "QEMU" not in libvirt.virsh("version", check=False):
        if daemon.poll() is not None or time.monotonic() > deadline:
            tail = (libvirt.folder / "libvirtd.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"libvirtd did not start (is another one running?): {tail}")
        time.sleep(0.1)
