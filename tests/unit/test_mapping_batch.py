"""Catalog.batch (the push path's way of mapping many records received at one moment) gives exactly what
Catalog.map gives record by record, the future check included, and refuses a record of another moment."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mappings import MappingContext, load_catalog

CATALOG = load_catalog()
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def context(record_id: str, received_at: datetime = NOW) -> MappingContext:
    return MappingContext("acme", record_id, "Patient/p1", "urn:uuid:device", received_at)


RECORDS: list[tuple[Any, Any]] = [
    ("mood", {"time": "2026-03-01T08:00:00+02:00", "rating": 7}),
    ("mood", {"time": "2026-03-02T08:00:00Z", "rating": 7}),  # in the future
    ("steps-daily", {"date": "2026-02-28", "steps": 1234}),
    ("steps-daily", {"date": "2026-02-28", "steps": -1}),
    ("nope", {}),
    ("mood", [1, 2]),
    (7, {}),
]


def test_a_batch_maps_as_map_does_record_by_record() -> None:
    one_by_one = [CATALOG.map(m, d, context(f"r{n}")) for n, (m, d) in enumerate(RECORDS)]
    with CATALOG.batch(NOW) as map_one:
        batched = [map_one(m, d, context(f"r{n}")) for n, (m, d) in enumerate(RECORDS)]
    assert batched == one_by_one
    assert [r.ok for r in batched] == [True, False, True, False, False, False, False]
    assert batched[1].rejections[0].code == "in-future"


def test_a_record_of_another_moment_or_a_naive_moment_is_refused() -> None:
    with CATALOG.batch(NOW) as map_one, pytest.raises(ValueError, match="batch's moment"):
        map_one("mood", RECORDS[0][1], context("r", NOW + timedelta(seconds=1)))
    with pytest.raises(ValueError, match="timezone-aware"), CATALOG.batch(NOW.replace(tzinfo=None)):
        pass
