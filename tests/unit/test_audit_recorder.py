"""The audit recorder's cap on refusals without credentials: per client address, the first
``limit`` of a window are recorded one by one, the rest counted and written as one summary
entry once the window is over (with the next entry anyone causes); other addresses and callers
with credentials are not affected."""

from __future__ import annotations

from typing import Any

import pytest

from waymark.usecases.access import audit
from waymark.usecases.access.audit import Entry, Recorder


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[Entry]:
    rows: list[Entry] = []
    monkeypatch.setattr(audit, "record", lambda _ctx, entry: rows.append(entry))
    return rows


def refusal(client: str, status: int = 401) -> Entry:
    return Entry(method="GET", action="GET /api/vms", status=status, client=client)


def test_refusals_over_the_limit_are_counted_in_one_summary(written: list[Entry]) -> None:
    clock = Clock()
    recorder = Recorder(limit=3, window=60.0, clock=clock)
    ctx: Any = None
    for _ in range(10):
        recorder.record(ctx, refusal("10.0.0.1"), anonymous=True)
    recorder.record(ctx, refusal("10.0.0.2", 404), anonymous=True)
    recorder.record(ctx, Entry(method="POST", action="POST /api/vms", status=201,
                               user="root-admin"), anonymous=False)
    assert [e.client for e in written] == ["10.0.0.1"] * 3 + ["10.0.0.2", None]
    clock.now += 61
    recorder.record(ctx, refusal("10.0.0.2"), anonymous=True)
    summary = written[5]
    assert (summary.action, summary.client, summary.outcome) == (
        "unauthenticated refusals", "10.0.0.1", "denied")
    assert summary.message is not None and summary.message.startswith("7 more requests")
    assert written[6].client == "10.0.0.2" and len(written) == 7  # a new window: recorded
    clock.now += 61
    recorder.record(ctx, refusal("10.0.0.1"), anonymous=True)  # nothing left out: no summary
    assert len(written) == 8


def test_stored_texts_are_bounded() -> None:
    assert audit.bounded("x" * 5000) == "x" * (audit.TEXT_LIMIT - 1) + "…"
    assert audit.bounded("short") == "short" and audit.bounded(None) is None
