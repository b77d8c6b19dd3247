"""Structured logs: one JSON object per line, a request id on every line, and no PHI.

What may be logged is decided here, not at each call site: the access line names the route
*template* (``/api/v1/records/<record_id>``), never the query string or body, and `extra` fields
are only emitted when their key is on the allow-list below. Patient names, values, tokens and
codes therefore cannot reach the log by accident through these helpers.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, request

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Extra fields a log call may attach. Identifiers only: never names, values, free text or secrets.
ALLOWED_FIELDS = frozenset(
    {
        "method",
        "route",
        "status",
        "duration_ms",
        "vendor",
        "tenant",
        "submission",
        "records",
        "accepted",
        "duplicate",
        "rejected",
        "outbox_items",
        "delivered",
        "failed",
        "dead",
        "worker",
        "attempt",
        "http_status",
        "kid",
        "revision",
        "error_code",
        "exception",
        "rule",
        "alert",
        "count",
        "seconds",
        # scheduled jobs (fhir_bridge.scheduler)
        "job",
        "tick",
        # sandbox EHR (dev/demo only): which registered app, which OAuth grant
        "client",
        "grant_type",
    }
)

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key in ALLOWED_FIELDS and key not in _RESERVED:
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type and where it happened; never the exception text, which can quote input.
            entry["exception"] = record.exc_info[0].__name__
            entry["trace"] = _frames(record)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k in ALLOWED_FIELDS)
        rid = request_id.get()
        prefix = f"{record.levelname.lower():7} {record.name}"
        line = f"{prefix} [{rid}] {record.getMessage()}" if rid else f"{prefix} {record.getMessage()}"
        if record.exc_info and record.exc_info[0] is not None:
            line += f" exception={record.exc_info[0].__name__} at {_frames(record)}"
        return f"{line} {extras}".rstrip()


def _frames(record: logging.LogRecord) -> str:
    """File:line of each frame of the traceback, without the exception message or local values."""
    tb = record.exc_info[2] if record.exc_info else None
    frames = []
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append(f"{code.co_filename.rsplit('/', 2)[-1]}:{tb.tb_lineno}:{code.co_name}")
        tb = tb.tb_next
    return " < ".join(reversed(frames[-8:]))


def configure_logging(level: str, fmt: str, stream: Any = None) -> None:
    """Route every logger through one handler with our formatter (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_fhir_bridge", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler._fhir_bridge = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # Werkzeug's own access log prints full URLs with query strings: ours replaces it.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


def init_app(app: Flask, *, access_logger: str = "fhir_bridge.access") -> None:
    access = logging.getLogger(access_logger)

    @app.before_request
    def _start() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        # Accept a caller's id only if it is a plain token; otherwise it could smuggle text into logs.
        rid = (
            incoming if 0 < len(incoming) <= 64 and incoming.replace("-", "").isalnum() else uuid.uuid4().hex
        )
        g.request_id = rid
        g.started = time.perf_counter()
        request_id.set(rid)

    @app.after_request
    def _finish(response: Response) -> Response:
        rid = g.get("request_id")
        if rid:
            response.headers["X-Request-ID"] = rid
        started = g.get("started")
        duration = (time.perf_counter() - started) * 1000 if started else 0.0
        access.info(
            "request",
            extra={
                "method": request.method,
                "route": request.url_rule.rule if request.url_rule else "<unmatched>",
                "status": response.status_code,
                "duration_ms": round(duration, 2),
            },
        )
        return response

    @app.teardown_request
    def _clear(_exc: BaseException | None) -> None:
        request_id.set(None)
