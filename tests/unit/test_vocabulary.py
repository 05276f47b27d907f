"""The one JSON vocabulary's pure parts (docs/api.md, "The JSON vocabulary"): a moment in one
form, whatever RFC 3339 form it was written in; a delete's one answer; a job's ``status`` with
its ``note``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from waymark.catalog.db import Catalog
from waymark.catalog.models import Job
from waymark.engine import jobs
from waymark.errors import InvalidInput
from waymark.model.timing import moment, parse_rfc3339, rfc3339
from waymark.model.vocabulary import deleted, gone


@pytest.mark.parametrize(("written", "shown"), [
    ("2026-12-07T03:12:21Z", "2026-12-07T03:12:21Z"),
    ("2026-12-07T03:12:21.123456Z", "2026-12-07T03:12:21Z"),  # a point by (older) Waymark
    ("2026-12-07T03:12:21.999999999Z", "2026-12-07T03:12:21Z"),  # never rounded up
    ("2026-12-07t04:42:21.5+01:30", "2026-12-07T03:12:21Z"),
    ("2026-12-06T23:12:21-04:00", "2026-12-07T03:12:21Z"),
])
def test_a_moment_in_any_rfc_3339_form_is_shown_in_whole_seconds_utc(written: str,
                                                                      shown: str) -> None:
    assert moment(written) == shown
    assert parse_rfc3339(written).utcoffset() is not None


@pytest.mark.parametrize("hostile", [
    "", "yesterday", "2026-12-07", "2026-12-07T03:12:21", "2026-12-07 03:12:21Z",
    "20261207T031221Z", "2026-12-07T03:12Z", "2026-02-30T00:00:00Z", "2026-12-07T25:00:00Z",
    "2026-12-07T03:12:21.Z", "2026-12-07T03:12:21Z\n", "٢٠٢٦-12-07T03:12:21Z",
    "2026-12-07T03:12:21." + "1" * 10 + "Z", "x" * 10_000, None, 1765077141, ["2026"],
])
def test_anything_else_is_refused_saying_what_was_expected(hostile: object) -> None:
    with pytest.raises(InvalidInput) as raised:
        parse_rfc3339(hostile, what="point's time")
    assert "point's time" in raised.value.message and len(raised.value.message) < 200
    assert raised.value.hint == "Expected a time like 2026-12-07T03:12:21Z."


def test_a_catalog_time_is_whole_seconds_utc() -> None:
    naive = datetime(2026, 12, 7, 3, 12, 21, 987654)  # SQLite's, in UTC
    assert rfc3339(naive) == rfc3339(naive.replace(tzinfo=UTC)) == "2026-12-07T03:12:21Z"


def test_every_delete_answers_what_went_in_one_shape() -> None:
    assert deleted(gone("vm", "web", "a" * 32)) == \
        {"deleted": [{"kind": "vm", "id": "a" * 32, "name": "web"}]}
    assert deleted(gone("template", "golden"), gone("template", "silver")) == \
        {"deleted": [{"kind": "template", "id": None, "name": "golden"},
                     {"kind": "template", "id": None, "name": "silver"}]}


def test_a_job_has_one_status_and_a_note_when_nobody_runs_it(tmp_path: Path) -> None:
    catalog = Catalog.open(tmp_path)
    long_ago = datetime.now(UTC) - timedelta(seconds=jobs.WORKERLESS_GRACE + 60)
    try:
        with catalog.session() as session:
            for job_id, created in (("a" * 32, long_ago), ("b" * 32, datetime.now(UTC))):
                session.add(Job(id=job_id, vm_id=None, kind="export", params={},
                                status="queued", progress=0.0, cancel_requested=False,
                                created_at=created))
        with catalog.session() as session:
            nobody, starting = (jobs.describe(session, session.get_one(Job, i))
                                for i in ("a" * 32, "b" * 32))
    finally:
        catalog.engine.dispose()
    assert (nobody["status"], nobody["note"]) == ("queued", jobs.ORPHANED_NOTE)
    assert (starting["status"], starting["note"]) == ("queued", None)
    assert "state" not in nobody and nobody["created_at"] == rfc3339(long_ago)
