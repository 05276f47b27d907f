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
