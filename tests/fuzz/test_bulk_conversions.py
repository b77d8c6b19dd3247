"""BulkInsert's own SQLite conversion of UTC timestamps gives exactly the text the ORM's chain gives
(UTCDateTime's bind processor, then SQLite's DATETIME storage format): SQLite compares these as text,
so one differing character would misorder the outbox and the rules' ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects.sqlite import pysqlite

from fhir_bridge.storage.bulk import sqlite_utc_text
from fhir_bridge.storage.models import UTCDateTime

DIALECT = pysqlite.dialect()
ORM_CHAIN = UTCDateTime().dialect_impl(DIALECT).bind_processor(DIALECT)
zones = st.one_of(
    st.just(UTC),
    st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m))),
    st.integers(-86_399, 86_399).map(lambda s: timezone(timedelta(seconds=s))),
)


@settings(max_examples=500, deadline=None)
@given(st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=zones))
def test_same_text_as_the_orm(value: datetime) -> None:
    assert ORM_CHAIN is not None
    assert sqlite_utc_text(value) == ORM_CHAIN(value)


def test_naive_values_are_refused_as_the_orm_refuses_them() -> None:
    assert ORM_CHAIN is not None
    for convert in (sqlite_utc_text, ORM_CHAIN):
        with pytest.raises(ValueError, match="naive datetime"):
            convert(datetime(2026, 1, 1))
