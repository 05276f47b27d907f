from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import Waymark, require_tools


def pytest_configure(config: pytest.Config) -> None:
    require_tools()


@pytest.fixture
def wm(tmp_path: Path) -> Waymark:
    """The real CLI against a fresh home folder."""
    return Waymark(tmp_path / "home")
