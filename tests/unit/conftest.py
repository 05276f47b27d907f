from __future__ import annotations

import pytest

from tests.unit.fake_images import FakeImages


@pytest.fixture
def images(monkeypatch: pytest.MonkeyPatch) -> FakeImages:
    """The image tool replaced by a recording fake (tests/unit/fake_images.py)."""
    return FakeImages().install(monkeypatch)
