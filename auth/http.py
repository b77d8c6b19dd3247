"""HTTP details shared by every client we run (token endpoint, discovery, FHIR): Retry-After, capped reads."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime

import requests


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None if unusable.

    A date in the past means "now" (0); negative numbers, words and empty values are unusable, and
    the caller falls back to its own backoff. Callers clamp the result.
    """
    if value is None:
        return None
    raw = value.strip()
    if not raw:
        return None
    if raw.isdigit():
        return float(int(raw))
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, delta)


def read_capped(response: requests.Response, limit: int) -> bytes:
    """The body, or ValueError as soon as it grows past ``limit`` bytes (never buffered whole)."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ValueError(f"response of {declared} bytes is larger than the {limit} accepted")
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(256 * 1024):
        size += len(chunk)
        if size > limit:
            raise ValueError(f"response larger than the {limit} bytes accepted")
        chunks.append(chunk)
    return b"".join(chunks)
