"""Fault injection: per-app switches that make the sandbox misbehave the way real EHRs sometimes do.

They exist so the SMART app and the delivery worker can be tested against hostile or quirky EHR
answers (security checklist section 5, rows D, C and F) with a real server instead of mocks. They
are set through the admin API (``PUT /api/admin/clients/<client_id>/faults``) and apply only to
requests made by, or with tokens of, that one app. A fault with ``times`` fires that many times,
then clears itself; without it, it stays until replaced.
"""

from __future__ import annotations

from typing import Any

from fhir_bridge.errors import BadRequest

OAUTH_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "access_denied",
        "unsupported_response_type",
        "server_error",
        "temporarily_unavailable",
        "login_required",
        "consent_required",
        "interaction_required",
    }
)

# name -> what it does (shown by GET /api/admin/faults and in the README).
FAULTS: dict[str, str] = {
    "token_error": "The token endpoint answers this app with an OAuth error: "
    '{"error": "invalid_grant", "error_description": "...", "status": 400, "times": 1}.',
    "authorize_error": "The authorize endpoint redirects back to this app with an error (state echoed): "
    '{"error": "access_denied", "error_description": "...", "times": 1}.',
    "code_expired": "Authorization codes of this app are refused as expired at the token endpoint: true.",
    "token_response": "Members merged into this app's successful token responses, null removes one: "
    '{"expires_in": -1}, {"expires_in": "3600"}, {"patient": null}, {"token_type": "mac"}.',
    "search_foreign_patient": "FHIR searches with this app's tokens also return one resource of another "
    "patient (what a faulty EHR does; a correct client must never show it): true.",
    "fhir_error": "FHIR requests with this app's tokens fail with this status and an OperationOutcome, or "
    'with a body of your choosing: {"status": 503, "retry_after": "5", "times": 2}, '
    '{"status": 200, "content_type": "text/html", "body": "<html>login</html>"}.',
    "search_next_url": "FHIR searches with this app's tokens carry this URL as their next link (a "
    'client must not follow it to another host with its token): "https://evil.example/fhir/Observation".',
}

# Faults of the discovery documents, which no app authenticates to: set for the whole server.
DISCOVERY_FAULT = (
    "smart-configuration and openid-configuration misbehave: "
    '{"status": 500} or {"status": 200, "content_type": "text/html", "body": "<html>"} (body as given), '
    '{"overrides": {"code_challenge_methods_supported": null, "token_endpoint": "http://evil.example/t"}} '
    '(members merged, null removes), {"redirect": "https://other.example/.well-known/smart-configuration"}, '
    '{"delay_seconds": 5} (at most 30), optionally "documents": ["smart-configuration"] and "times": N.'
)
_DOCUMENTS = ("smart-configuration", "openid-configuration")


def _error_spec(name: str, value: Any, *, with_status: bool) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(
            f"faults.{name} must be an object like {FAULTS[name].split(': ', 1)[1]}", code="invalid-fault"
        )
    error = value.get("error")
    if error not in OAUTH_ERRORS:
        raise BadRequest(
            f"faults.{name}.error must be an OAuth error code: {', '.join(sorted(OAUTH_ERRORS))}.",
            code="invalid-fault",
        )
    description = value.get("error_description")
    if description is not None and (
        not isinstance(description, str)
        or any(ch in description for ch in '"\\')
        or not description.isascii()
    ):
        raise BadRequest(
            f"faults.{name}.error_description must be ASCII text without quotes or backslashes (RFC 6749).",
            code="invalid-fault",
        )
    if with_status and "status" in value and value["status"] not in (400, 401, 403, 500, 503):
        raise BadRequest(f"faults.{name}.status must be 400, 401, 403, 500 or 503.", code="invalid-fault")
    _check_times(name, value)
    return dict(value)


def _check_times(name: str, value: dict[str, Any]) -> None:
    times = value.get("times")
    if times is not None and (not isinstance(times, int) or isinstance(times, bool) or times < 1):
        raise BadRequest(f"faults.{name}.times must be a positive integer.", code="invalid-fault")


def validate_faults(data: Any) -> dict[str, Any]:
    """The faults as stored, or a 400 naming the first problem."""
    if not isinstance(data, dict):
        raise BadRequest(
            "The body must be a JSON object of faults (an empty object clears them).", code="invalid-fault"
        )
    unknown = sorted(set(data) - set(FAULTS))
    if unknown:
        raise BadRequest(
            f"Unknown fault(s): {', '.join(k[:40] for k in unknown)}. Known: {', '.join(FAULTS)}.",
            code="invalid-fault",
        )
    faults: dict[str, Any] = {}
    for name, value in data.items():
        if name in ("token_error", "authorize_error"):
            faults[name] = _error_spec(name, value, with_status=name == "token_error")
        elif name in ("code_expired", "search_foreign_patient"):
            if value is not True:
                raise BadRequest(
                    f"faults.{name} must be true (leave it out to turn it off).", code="invalid-fault"
                )
            faults[name] = True
        elif name == "token_response":
            if not isinstance(value, dict) or value.get("access_token") is not None:
                raise BadRequest(
                    "faults.token_response must be an object of token-response members (null removes one); "
                    "it cannot set access_token to a value.",
                    code="invalid-fault",
                )
            faults[name] = dict(value)
        elif name == "fhir_error":
            status = value.get("status") if isinstance(value, dict) else None
            lowest = 200 if isinstance(value, dict) and value.get("body") is not None else 400
            if not isinstance(status, int) or not lowest <= status <= 599:
                raise BadRequest(
                    "faults.fhir_error.status must be 400-599, or 200-599 with a body.",
                    code="invalid-fault",
                )
            retry_after = value.get("retry_after")
            if retry_after is not None and not isinstance(retry_after, str):
                raise BadRequest(
                    "faults.fhir_error.retry_after must be a string (sent as is).", code="invalid-fault"
                )
            for text in ("content_type", "body"):
                if value.get(text) is not None and not isinstance(value[text], str):
                    raise BadRequest(f"faults.fhir_error.{text} must be a string.", code="invalid-fault")
            _check_times(name, value)
            faults[name] = dict(value)
        elif name == "search_next_url":
            if not isinstance(value, str) or "://" not in value:
                raise BadRequest("faults.search_next_url must be an absolute URL.", code="invalid-fault")
            faults[name] = value
    return faults


def validate_discovery_fault(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or not data:
        raise BadRequest(f"The discovery fault is an object: {DISCOVERY_FAULT}", code="invalid-fault")
    known = {"status", "content_type", "body", "overrides", "redirect", "delay_seconds", "documents", "times"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BadRequest(
            f"Unknown member(s) {', '.join(k[:40] for k in unknown)}: {DISCOVERY_FAULT}", code="invalid-fault"
        )
    status = data.get("status", 200)
    if not isinstance(status, int) or not 200 <= status <= 599:
        raise BadRequest("status must be an HTTP status (200-599).", code="invalid-fault")
    for text in ("content_type", "body", "redirect"):
        if data.get(text) is not None and not isinstance(data[text], str):
            raise BadRequest(f"{text} must be a string.", code="invalid-fault")
    if data.get("overrides") is not None and not isinstance(data["overrides"], dict):
        raise BadRequest("overrides must be an object of members (null removes one).", code="invalid-fault")
    delay = data.get("delay_seconds", 0)
    if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= 30:
        raise BadRequest("delay_seconds must be a number from 0 to 30.", code="invalid-fault")
    documents = data.get("documents", list(_DOCUMENTS))
    if not isinstance(documents, list) or not documents or not set(documents) <= set(_DOCUMENTS):
        raise BadRequest(f"documents must list some of {', '.join(_DOCUMENTS)}.", code="invalid-fault")
    _check_times("discovery", data)
    return dict(data) | {"documents": documents}


def take(holder: Any, name: str) -> Any:
    """The fault's value if set on ``holder.faults`` (counting down ``times``), else None."""
    faults: dict[str, Any] = dict(holder.faults or {})
    value = faults.get(name)
    if value is None:
        return None
    if isinstance(value, dict) and isinstance(value.get("times"), int):
        remaining = value["times"] - 1
        if remaining <= 0:
            faults.pop(name)
        else:
            faults[name] = value | {"times": remaining}
        holder.faults = faults  # a new dict, so the ORM sees the change
    return value
