"""The one place exceptions become HTTP responses.

Each surface gets the shape its users expect: vendor API and operations routes get JSON
``{"error": code, "message": ...}``; FHIR routes (``/fhir``) get an ``OperationOutcome``; the SMART
app and everything a browser opens gets an HTML page. Messages are written for the person reading
them; stack traces and exception text from libraries never reach a client.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Flask, Response, current_app, render_template, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"

# HTTP status -> FHIR IssueType code (http://hl7.org/fhir/R4/valueset-issue-type.html)
_ISSUE_TYPES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "processing",
    429: "throttled",
    500: "exception",
    503: "transient",
}


class BridgeError(Exception):
    """An error a client can act on. ``code`` is a stable machine code, ``message`` a sentence."""

    status = 500
    code = "internal-error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
        fhir_path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details
        self.headers = headers or {}
        self.fhir_path = fhir_path


class BadRequest(BridgeError):
    status, code = 400, "invalid-request"


class Unauthorized(BridgeError):
    status, code = 401, "unauthorized"


class Forbidden(BridgeError):
    status, code = 403, "forbidden"


class NotFound(BridgeError):
    status, code = 404, "not-found"


class Conflict(BridgeError):
    status, code = 409, "conflict"


class PayloadTooLarge(BridgeError):
    status, code = 413, "payload-too-large"


class UnsupportedMediaType(BridgeError):
    status, code = 415, "unsupported-media-type"


class Unprocessable(BridgeError):
    status, code = 422, "unprocessable"


class TooManyRequests(BridgeError):
    status, code = 429, "too-many-requests"

    def __init__(self, message: str, *, retry_after: int, **kwargs: Any) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)}, **kwargs)


class ServiceUnavailable(BridgeError):
    status, code = 503, "unavailable"


def operation_outcome(
    status: int, message: str, *, code: str | None = None, fhir_path: str | None = None
) -> dict[str, Any]:
    """An R4 OperationOutcome with one issue (or ``issues`` built by callers with several)."""
    issue: dict[str, Any] = {
        "severity": "error" if status < 500 else "fatal",
        "code": _ISSUE_TYPES.get(status, "processing" if status < 500 else "exception"),
        "diagnostics": message,
    }
    if code:
        issue["details"] = {"coding": [{"system": "urn:fhir-bridge:error", "code": code}], "text": message}
    if fhir_path:
        issue["expression"] = [fhir_path]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def _surface() -> str:
    path = request.path
    # An app may name browser-facing paths under otherwise-JSON prefixes (e.g. an OAuth authorize page).
    if path.startswith(tuple(current_app.config.get("HTML_ERROR_PREFIXES", ()))):
        return "html"
    if path == "/fhir" or path.startswith("/fhir/"):
        return "fhir"
    if path.startswith(
        ("/api/", "/oauth/", "/.well-known/", "/metrics", "/healthz", "/readyz", "/cds-services")
    ):
        return "json"
    if path.startswith("/app/") and "/api/" in path:  # the SMART dashboard's own JSON calls
        return "json"
    return "html"


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: Any = None,
    headers: dict[str, str] | None = None,
    fhir_path: str | None = None,
) -> Response:
    surface = _surface()
    if surface == "fhir":
        if isinstance(details, dict) and details.get("resourceType") == "OperationOutcome":
            body = details
        else:
            body = operation_outcome(status, message, code=code, fhir_path=fhir_path)
        response = Response(orjson.dumps(body), status=status, mimetype=FHIR_JSON)
    elif surface == "json":
        payload: dict[str, Any] = {"error": code, "message": message}
        if request.path.startswith("/oauth/"):
            # RFC 6749 §5.2 names the human-readable text error_description.
            payload["error_description"] = message
        if details is not None:
            payload["details"] = details
        response = Response(orjson.dumps(payload), status=status, mimetype="application/json")
    else:
        html = render_template("error.html", status=status, code=code, message=message)
        response = Response(html, status=status, mimetype="text/html")
    response.headers["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


_HTTP_CODES = {
    400: "invalid-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    413: "payload-too-large",
    415: "unsupported-media-type",
    429: "too-many-requests",
}

_HTTP_MESSAGES = {
    404: "There is nothing at this address. Check the URL against the API documentation (openapi.yaml).",
    405: "This address does not accept that HTTP method.",
    413: "The request body is larger than this service accepts.",
}


def init_app(app: Flask) -> None:
    @app.errorhandler(BridgeError)
    def _bridge_error(err: BridgeError) -> Response:
        if err.status >= 500:
            log.error("request failed", extra={"error_code": err.code, "status": err.status})
        return error_response(
            err.status,
            err.code,
            err.message,
            details=err.details,
            headers=err.headers,
            fhir_path=err.fhir_path,
        )

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        status = err.code or 500
        code = _HTTP_CODES.get(status, "http-error")
        message = _HTTP_MESSAGES.get(status) or (err.description or err.name)
        headers = {}
        if status == 405 and err.valid_methods:  # type: ignore[attr-defined]
            headers["Allow"] = ", ".join(err.valid_methods)  # type: ignore[attr-defined]
        if status == 413:
            message = (
                f"The request body is larger than the {app.config.get('MAX_CONTENT_LENGTH')} bytes accepted."
            )
        return error_response(status, code, message, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        # Boundary catch-all: log the type and place (never the text), answer generically.
        log.error("unhandled exception", exc_info=err)
        return error_response(
            500, "internal-error", "Something went wrong on our side. It has been logged; please try again."
        )
