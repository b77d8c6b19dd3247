"""Histories from JSON for ``fhir-bridge rules test``: native records (mapped with the catalogue, as a
push would) or ledger rows (``code``, ``time``, ``value``), into the rows :func:`simulate` takes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from mappings import Catalog, MappingContext
from mappings.identity import device_full_url


class HistoryError(ValueError):
    """The JSON history is not usable; the message names the entry and field."""


def _offset(moment: datetime) -> int:
    offset = moment.utcoffset()
    return int(offset.total_seconds() // 60) if offset is not None else 0


def rows_from_json(data: Any, catalog: Catalog) -> list[tuple[str, datetime, float, int]]:
    """``[...]`` or ``{"records": [...]}``: each entry a native record or a measurement."""
    entries = data.get("records") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise HistoryError('the history must be a JSON list, or an object with a "records" list')
    rows: list[tuple[str, datetime, float, int]] = []
    now = datetime.now(UTC)
    for index, entry in enumerate(entries):
        where = f"records[{index}]"
        if not isinstance(entry, dict):
            raise HistoryError(f"{where}: must be an object")
        if "measure" in entry:
            measure, record_data = entry.get("measure"), entry.get("data")
            if not isinstance(measure, str) or measure not in catalog:
                raise HistoryError(f"{where}.measure: unknown measure {measure!r}")
            if not isinstance(record_data, dict):
                raise HistoryError(f"{where}.data: must be an object")
            result = catalog.map(
                measure,
                record_data,
                MappingContext(
                    vendor_id="rules-test",
                    record_id=str(entry.get("record_id") or f"r{index}"),
                    patient_reference="Patient/rules-test",
                    device_full_url=device_full_url("rules-test"),
                    received_at=now,
                ),
            )
            if result.rejections:
                first = result.rejections[0]
                raise HistoryError(f"{where}.data.{first.field}: {first.message}")
            rows += [(m.code, m.time, float(m.value), _offset(m.time)) for m in result.measurements]
        else:
            code, raw_time, value = entry.get("code"), entry.get("time"), entry.get("value")
            if not isinstance(code, str) or not code:
                raise HistoryError(f"{where}: give a native record (measure, data) or a measurement (code)")
            try:
                moment = datetime.fromisoformat(str(raw_time))
            except ValueError:
                raise HistoryError(f"{where}.time: an ISO 8601 date-time with offset") from None
            if moment.tzinfo is None:
                raise HistoryError(f"{where}.time: needs a UTC offset (e.g. Z or -05:00)")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise HistoryError(f"{where}.value: must be a number")
            rows.append((code, moment, float(value), _offset(moment)))
    return rows
