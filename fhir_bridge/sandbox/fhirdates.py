"""FHIR dates as ranges: the precision of a value is part of its meaning in FHIR search.

``2024-05`` is all of May 2024, ``2024-05-02T10:00:00Z`` is one second. Both stored values and
search values become half-open ``[lo, hi)`` ranges in microseconds since the epoch, and the search
prefixes (eq, lt, gt, ...) are defined on those ranges (http://hl7.org/fhir/R4/search.html#prefix).
A date or dateTime without a time zone is read as UTC: the sandbox has no "server local time".
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone, tzinfo

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_PATTERN = re.compile(
    r"^(?P<year>\d{4})"
    r"(?:-(?P<month>\d{2})"
    r"(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})"
    r"(?::(?P<second>\d{2})(?:\.(?P<fraction>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


class DateFormatError(ValueError):
    """Not a FHIR date, dateTime or instant."""


def micros(moment: datetime) -> int:
    """Microseconds since the epoch of an aware datetime."""
    delta = moment.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_range(text: str) -> tuple[int, int]:
    """The ``[lo, hi)`` range a FHIR date/dateTime/instant stands for, in microseconds."""
    match = _PATTERN.match(text.strip())
    if not match:
        raise DateFormatError(
            f"{text!r} is not a FHIR date or dateTime (e.g. 2024-05-02 or 2024-05-02T10:00:00Z)"
        )
    parts = match.groupdict()
    try:
        year = int(parts["year"])
        if parts["month"] is None:
            start = datetime(year, 1, 1, tzinfo=UTC)
            return micros(start), micros(start.replace(year=year + 1))
        month = int(parts["month"])
        if parts["day"] is None:
            start = datetime(year, month, 1, tzinfo=UTC)
            end = start.replace(year=year + 1, month=1) if month == 12 else start.replace(month=month + 1)
            return micros(start), micros(end)
        day = int(parts["day"])
        if parts["hour"] is None:
            start = datetime(year, month, day, tzinfo=UTC)
            return micros(start), micros(start + timedelta(days=1))
        tz: tzinfo = UTC
        if parts["tz"] and parts["tz"] != "Z":
            sign = 1 if parts["tz"][0] == "+" else -1
            hours, minutes = int(parts["tz"][1:3]), int(parts["tz"][4:6])
            tz = _offset(sign * (hours * 60 + minutes))
        local = datetime(year, month, day, int(parts["hour"]), int(parts["minute"]), tzinfo=tz)
        if parts["second"] is None:
            return micros(local), micros(local + timedelta(minutes=1))
        local = local.replace(second=int(parts["second"]))
        fraction = parts["fraction"]
        if not fraction:
            return micros(local), micros(local + timedelta(seconds=1))
        digits = min(len(fraction), 6)
        start_us = micros(local) + int(fraction[:digits].ljust(6, "0"))
        return start_us, start_us + 10 ** (6 - digits)
    except ValueError as exc:
        raise DateFormatError(f"{text!r} is not a valid date: {exc}") from None


def _offset(minutes: int) -> tzinfo:
    if not -24 * 60 < minutes < 24 * 60:
        raise ValueError("time-zone offset out of range")
    return timezone(timedelta(minutes=minutes))


def instant(moment: datetime) -> str:
    """A FHIR instant (UTC, millisecond precision), as ``meta.lastUpdated`` carries it."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
