from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import RemoteWaymark, Waymark, require_tools, served


def pytest_configure(config: pytest.Config) -> None:
    require_tools()


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


# --- running on several workers (pytest-xdist, `make test`) --------------------------------------
# Tests that boot guests (TCG: a core each) or drive Chromium run on one worker per group, in
# turn, while the other workers run the rest; the guest build cache is shared, so the test of
# the build goes with the guests.
WORKER_GROUPS = {"tests/guest/": "guests", "tests/integration/test_guest_build.py": "guests",
                 "tests/browser/": "browser"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for prefix, group in WORKER_GROUPS.items():
            if item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.xdist_group(group))
