"""What the tests need, and the ``wm`` fixture.

Markers say what a test needs besides Python (README.md, "Running the tests"); they are applied
here from the test's folder or fixtures, so a new test in the right folder needs no decorator:

- ``guest``: boots QEMU guests with ``qemu-system-x86_64`` (tests/guest, and the guest builder's
  boot test), or builds the test guest from Debian packages; a test elsewhere that starts
  ``qemu-system-x86_64`` is marked by hand (tests/integration/test_names.py);
- ``browser``: drives Chromium (tests/browser, tests/guest/test_portal.py, test_display.py);
- ``root``: needs root (mounts a tmpfs, makes the QEMU user, a tap device);
- ``slow``: long fault-injection sweeps (marked by hand).

A selected test whose need is missing fails naming what to install: never a silent skip.
Every test outside tests/unit needs ``qemu-img`` and ``qemu-io``; tests/unit needs nothing.
"""

from __future__ import annotations

import collections
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import RemoteWaymark, Waymark, require_tools, served

TESTS = Path(__file__).resolve().parent
FOLDER_MARKS = {"guest": ("guest",), "browser": ("browser",)}
FILE_MARKS = {"guest/test_portal.py": ("browser",), "guest/test_display.py": ("browser",)}
# fixtures that make a test need something: the test guest (tests/integration/test_guest_build.py
# builds and boots it), a tmpfs mounted by the test (test_full_fs.py, test_backups.py)
FIXTURE_MARKS = {"guest": ("guest",), "machine": ("guest",),
                 "small_home": ("root",), "small_repo": ("root",),
                 "libvirt": ("root",)}  # a private libvirtd (tests/libvirt_host.py)
CHROMIUM = "/usr/bin/chromium"


def place(item: pytest.Item) -> Path:
    """The test's file, relative to tests/ (a file elsewhere: its absolute path)."""
    path = item.path.resolve()
    return path.relative_to(TESTS) if path.is_relative_to(TESTS) else path


def marks_of(item: pytest.Item) -> set[str]:
    """The markers a test gets from its folder, file and fixtures."""
    where = place(item)
    marks = set(FOLDER_MARKS.get(where.parts[0], ()))
    marks.update(FILE_MARKS.get(where.as_posix(), ()))
    for name in getattr(item, "fixturenames", ()):
        marks.update(FIXTURE_MARKS.get(name, ()))
    return marks


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for mark in sorted(marks_of(item) - {m.name for m in item.iter_markers()}):
            item.add_marker(mark)


def pytest_collection_finish(session: pytest.Session) -> None:
    """On an xdist worker, tests that share a node id would run as one (the workers report by
    node id): Schemathesis's cases all have one under pytest 9.2. Such tests are marked
    ``single_process`` and run after the workers (Makefile); any other is an error here,
    never a silent loss."""
    if not hasattr(session.config, "workerinput"):
        return
    seen = collections.Counter(item.nodeid for item in session.items)
    shared = sorted(nodeid for nodeid, count in seen.items() if count > 1)
    if shared:
        raise pytest.UsageError(f"tests that share a node id cannot run on xdist workers: "
                                f"{shared}; mark them single_process")


def missing_needs(item: pytest.Item) -> list[str]:
    """What a selected test needs that this machine lacks, each with how to get it."""
    marks = {m.name for m in item.iter_markers()}
    missing = []
    if "guest" in marks and shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 (apt-get install -y qemu-system-x86)")
    if "browser" in marks and shutil.which("chromium") is None and not Path(CHROMIUM).exists():
        missing.append("chromium (apt-get install -y chromium)")
    if "root" in marks and os.geteuid() != 0:
        missing.append("root (run as root, or leave these tests out: -m 'not root')")
    return missing


def pytest_runtest_setup(item: pytest.Item) -> None:
    if place(item).parts[0] != "unit":
        require_tools()
    missing = missing_needs(item)
    if missing:
        raise RuntimeError("this test needs: " + ", ".join(missing))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``also_served`` run twice: on the host, and through a real server."""
    if "wm" in metafunc.fixturenames and metafunc.definition.get_closest_marker("also_served"):
        metafunc.parametrize("wm", ["local", "server"], indirect=True)


@pytest.fixture
def wm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Waymark]:
    """The real CLI against a fresh home folder; for ``also_served`` tests, a second time with
    the commands that work through ``--server`` going through a real ``waymark serve`` on that
    home (:class:`tests.helpers.RemoteWaymark`)."""
    local = Waymark(tmp_path / "home")
    if getattr(request, "param", "local") == "local":
        yield local
        return
    with served(local) as (url, token):
        remote = RemoteWaymark(local.home, url, token)
        yield remote
        assert remote.remote_calls > 0, "the test never went through the server"

