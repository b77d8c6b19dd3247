"""What every vendor-facing view shares: the bearer-token check and the strict JSON body reader.

The token check runs on every request and looks the vendor up in the database each time, so
``fhir-bridge vendor disable`` takes effect on the very next request, not when tokens expire.

The body reader is strict because a lenient parser is a parser differential waiting to happen
(security checklist P1-P6): the size limit applies before the body is read, the media type must be
the one the route speaks, and duplicate keys, ``NaN``/``Infinity``, out-of-range numbers, invalid
UTF-8, a byte-order mark, NUL characters and deep nesting are all refused with 400 and a message
that says which.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

import orjson
from flask import g, request
from sqlalchemy.orm import Session

from auth.vendor_tokens import InvalidToken, TokenVerifier, VendorPrincipal
from fhir_bridge import services
from fhir_bridge.errors import BadRequest, BridgeError, Forbidden, PayloadTooLarge, UnsupportedMediaType
from fhir_bridge.storage.models import VendorClient
from fhir_bridge.vendors import ActiveVendors, is_active

F = TypeVar("F", bound=Callable[..., Any])

VERIFIER_KEY = "fhir_bridge.token_verifier"
VENDORS_KEY = "fhir_bridge.active_vendors"
MAX_DEPTH = 32
DISABLED = "the client this token was issued to is disabled or no longer registered"


class InvalidTokenError(BridgeError):
    status, code = 401, "invalid_token"


def _unauthorized(message: str) -> InvalidTokenError:
    safe = message.replace('"', "'")
    return InvalidTokenError(
        message, headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{safe}"'}
    )


def current_vendor() -> VendorClient:
    vendor = g.get("vendor")
    assert isinstance(vendor, VendorClient), "view is not wrapped in requires_scope"
    return vendor


def current_principal() -> VendorPrincipal:
    principal = g.get("principal")
    assert isinstance(principal, VendorPrincipal)
    return principal


def _active_vendors(app: Any) -> ActiveVendors:
    found = app.extensions.get(VENDORS_KEY)
    if found is None:
        found = app.extensions[VENDORS_KEY] = ActiveVendors(services.from_app(app).db)
    assert isinstance(found, ActiveVendors)
    return found


def authenticate(*scopes: str, in_transaction: bool = False) -> VendorClient:
    """Check the bearer token, the vendor's status and (any of) ``scopes``; remember who is calling.

    ``in_transaction``: the view checks the vendor's status itself, as the first statement of the
    transaction it writes in (:func:`vendor_gate`), so a push is one transaction; here the vendor
    comes from a snapshot of a few seconds (a disabled vendor still gets its 401 from the gate,
    before anything is written).
    """
    from flask import current_app

    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidTokenError(
            "This endpoint needs an access token: 'Authorization: Bearer <token>' from POST /oauth/token.",
            headers={"WWW-Authenticate": 'Bearer realm="fhir-bridge"'},
        )
    verifier = current_app.extensions[VERIFIER_KEY]
    assert isinstance(verifier, TokenVerifier)
    try:
        principal = verifier.verify(token.strip())
    except InvalidToken as exc:
        raise _unauthorized(str(exc)) from None
    vendors = _active_vendors(current_app)
    vendor = vendors.snapshot(principal.client_id) if in_transaction else vendors.get(principal.client_id)
    if vendor is None:
        raise _unauthorized(DISABLED)
    if scopes and not principal.scopes.intersection(scopes):
        raise Forbidden(
            f"This token lacks the scope this request needs ({' or '.join(scopes)}); "
            "ask for it at the token endpoint (it must also be registered for your client).",
            code="insufficient_scope",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{" ".join(scopes)}"'},
        )
    g.vendor = vendor
    g.principal = principal
    return vendor


def requires_scope(*scopes: str, in_transaction: bool = False) -> Callable[[F], F]:
    """Authenticate before the view. ``in_transaction``: the view passes :func:`vendor_gate` to the
    transaction it writes in (see :func:`authenticate`); one that does not is a bug, refused here."""

    def decorate(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            authenticate(*scopes, in_transaction=in_transaction)
            response = view(*args, **kwargs)
            if in_transaction and not g.get("vendor_checked"):
                raise RuntimeError(f"{view.__name__} never ran vendor_gate() in its transaction")
            return response

        return cast(F, wrapper)

    return decorate


def vendor_gate() -> Callable[[Session], None]:
    """The vendor status check for the view's own transaction (``requires_scope(in_transaction=True)``):
    run first inside it, a disabled vendor gets the same 401 as at :func:`authenticate`."""
    vendor_id = current_vendor().id

    def check(session: Session) -> None:
        if not is_active(session, vendor_id):
            raise _unauthorized(DISABLED)
        g.vendor_checked = True

    return check


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise BadRequest(
            f"The JSON body has the member {duplicate!r} twice in one object; send each member once.",
            code="duplicate-json-key",
        )
    return result


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"The number {text[:40]} is out of range.", code="invalid-json-number")
    return value


def _no_constants(name: str) -> Any:
    raise BadRequest(
        f"{name} is not valid JSON; send numbers as finite decimals.", code="invalid-json-number"
    )


def _depth_ok(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values() if isinstance(child, dict | list))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node if isinstance(child, dict | list))
    return True


_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_AS_PARENS = bytes.maketrans(b"[]{}", b"()()")


def _text_depth_ok(raw: bytes, limit: int) -> bool | None:
    """:func:`_depth_ok` read off the text of a document orjson accepted, or None when it cannot tell.

    Why: walking the parsed value was ~2 % of a 1,000-record push; this runs in C-level byte
    operations. Without any backslash no string holds an escaped quote, so the parts between
    quotes alternate outside/inside strings; what stays outside, reduced to its brackets, is a
    balanced sequence (the text is valid JSON) whose innermost pairs ``()`` vanish one nesting
    level per ``replace``. With a backslash it answers None and the caller walks the value.
    """
    if b"\\" in raw:
        return None
    brackets = b"".join(raw.split(b'"')[::2]).translate(_AS_PARENS, _NOT_BRACKET)
    for _ in range(limit):
        if not brackets:
            return True
        brackets = brackets.replace(b"()", b"")
    return not brackets


def _within_depth(raw: bytes, shape: Any) -> bool:
    quick = _text_depth_ok(raw, MAX_DEPTH)
    return _depth_ok(shape, MAX_DEPTH) if quick is None else quick


def read_json(*media_types: str) -> Any:
    """The request body as JSON, refusing anything ambiguous (see the module docstring)."""
    max_bytes = services.current().settings.max_body_bytes
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(
            f"The body is {request.content_length} bytes; at most {max_bytes} are accepted. "
            "Split the batch into smaller ones."
        )
    mimetype = request.mimetype
    if mimetype not in media_types:
        raise UnsupportedMediaType(
            f"Send the body as {' or '.join(media_types)} (got {mimetype or 'no Content-Type'}).",
        )
    charset = request.mimetype_params.get("charset")
    if charset is not None and charset.lower() != "utf-8":
        raise UnsupportedMediaType("JSON bodies must be UTF-8 (charset=utf-8).")
    raw = request.get_data(cache=True)
    if not raw:
        raise BadRequest("The request body is empty; send a JSON object.", code="empty-body")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise BadRequest(
            "The body starts with a byte-order mark; send UTF-8 without BOM.", code="invalid-json"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f"The body is not valid UTF-8 (byte {exc.start}); send UTF-8 encoded JSON.", code="invalid-utf8"
        ) from None
    if "\\u0000" in text:
        raise BadRequest("The body contains a NUL character (\\u0000); remove it.", code="invalid-json")
    # orjson first: it refuses any nesting past its own fixed limit without Python recursion, so a
    # 10,000-deep document costs nothing and cannot exhaust the interpreter's stack.
    try:
        shape = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "recursion" in str(exc).lower():
            raise BadRequest(
                f"The JSON is nested deeper than {MAX_DEPTH} levels.", code="json-too-deep"
            ) from None
        shape = None
    if shape is not None and not _within_depth(raw, shape):
        raise BadRequest(f"The JSON is nested deeper than {MAX_DEPTH} levels.", code="json-too-deep")
    # Then the standard parser with hooks, for what orjson silently accepts (duplicate keys) and for
    # precise messages on what it refuses (NaN, Infinity, out-of-range numbers, syntax errors).
    try:
        value = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_float=_finite, parse_constant=_no_constants
        )
    except RecursionError:
        raise BadRequest(
            f"The JSON is nested deeper than {MAX_DEPTH} levels.", code="json-too-deep"
        ) from None
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"The body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.",
            code="invalid-json",
        ) from None
    except ValueError:
        # e.g. an integer with more digits than Python converts (sys.get_int_max_str_digits)
        raise BadRequest(
            "The body holds a number too large to process.", code="invalid-json-number"
        ) from None
    if shape is None:
        # orjson refused what the standard parser accepted: numbers outside 64-bit range.
        raise BadRequest(
            "The body holds a number outside the range JSON numbers may have here.",
            code="invalid-json-number",
        )
    # No second depth check: both parsers accepted the same text, so ``value`` nests exactly as
    # ``shape`` did, which passed above (walking a 1,000-record batch twice cost ~3 % of a push).
    return value


def load(schema: Any, data: Any, *, what: str = "body") -> Any:
    """Validate with a marshmallow schema (unknown fields refused: mass assignment, M5/P9)."""
    from marshmallow import ValidationError

    from fhir_bridge.errors import Unprocessable

    if not isinstance(data, dict):
        raise Unprocessable(f"The {what} must be a JSON object.", code="invalid-request")
    try:
        return schema.load(data)
    except ValidationError as exc:
        fields = sorted(str(k) for k in exc.messages) if isinstance(exc.messages, dict) else []
        raise Unprocessable(
            f"The {what} is not valid: check {', '.join(fields) or 'its fields'} (see details).",
            code="invalid-request",
            details=exc.messages,
        ) from None
