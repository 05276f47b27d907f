"""Module-scoped fixtures of the real-guest tests: a home whose VMs are all powered off at the
end, and the test guest, built once and cached."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.guests import GUEST_DIR, LIVE, processes_naming
from tests.helpers import Waymark

# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def home() -> Iterator[Waymark]:
    """A home for the module; at the end every VM in it is powered off, and any QEMU still
    naming the home is killed (so a failed test never leaves one running)."""
    if shutil.which("qemu-system-x86_64") is None:
        raise RuntimeError("missing qemu-system-x86_64 (apt-get install -y qemu-system-x86)")
    # a short path (not under pytest's temporary folder), easy to read in QEMU's command lines
    # (a deep one works too: test_runtime.py's test_a_home_deeper_than_a_socket_address_...)
    folder = Path(tempfile.mkdtemp(prefix="wm-", dir="/tmp"))
    wm = Waymark(folder / "home")
    yield wm
    listed = wm.run("vm", "list", "--json")
    for row in json.loads(listed.stdout) if listed.returncode == 0 else []:
        if row["state"] in LIVE:
            wm.run("vm", "stop", row["name"], "--force")
    leftovers = processes_naming(str(wm.home))
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)
    assert leftovers == [], f"QEMU processes left running after vm stop --force: {leftovers}"


@pytest.fixture(scope="module")
def image(home: Waymark) -> dict[str, str]:
    """kernel, initrd, disk and append of the test guest, built once and cached; also
    initrd_tools, boot_disk and iso (``waymark guest build --json``; docs/architecture.md,
    "The test guest")."""
    # a first build downloads Debian packages: give it time
    built: dict[str, str] = home.run("guest", "build", "--dest", str(GUEST_DIR), "--json",
                                     timeout=1800).ok().json()
    return built
