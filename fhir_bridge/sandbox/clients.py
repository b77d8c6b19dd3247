"""App registration: what an EHR's app-registration form records, validated the same way every time.

Used by the admin API (``PUT /api/admin/clients/<client_id>``) and by ``--clients FILE`` at start-up.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from fhir_bridge.errors import BadRequest
from fhir_bridge.sandbox.models import SandboxClient
from fhir_bridge.sandbox.scopes import CONTEXT_SCOPES, ScopeError, parse_resource_scope

CLIENT_ID = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")
FIELDS = frozenset(
    {
        "client_id",
        "name",
        "auth_method",
        "redirect_uris",
        "launch_url",
        "standalone_url",
        "jwks_url",
        "jwks",
        "scopes",
    }
)
INTERACTIVE_SCOPES = [
    "launch",
    "launch/patient",
    "launch/encounter",
    "openid",
    "fhirUser",
    "offline_access",
    "online_access",
    "patient/*.cruds",
    "user/*.cruds",
]
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k"})


def _url(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be an absolute http(s) URL.", code="invalid-client")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise BadRequest(f"{name} must be an absolute http(s) URL without a fragment.", code="invalid-client")
    return value


def register(session: Session, client_id: str, data: Any) -> SandboxClient:
    """Create or replace the registration of ``client_id``; a 400 names the first wrong field."""
    if not CLIENT_ID.match(client_id):
        raise BadRequest("client_id is 1-128 letters, digits, '.', '_' or '-'.", code="invalid-client")
    if not isinstance(data, dict):
        raise BadRequest("The registration must be a JSON object.", code="invalid-client")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise BadRequest(
            f"Unknown field(s) {', '.join(k[:40] for k in unknown)}; known: {', '.join(sorted(FIELDS))}.",
            code="invalid-client",
        )
    if data.get("client_id", client_id) != client_id:
        raise BadRequest("client_id in the body differs from the one in the URL.", code="invalid-client")
    method = {"public": "none", "none": "none", "private_key_jwt": "private_key_jwt"}.get(
        str(data.get("auth_method", "public"))
    )
    if method is None:
        raise BadRequest("auth_method must be public or private_key_jwt.", code="invalid-client")
    redirect_uris = data.get("redirect_uris", [])
    if not isinstance(redirect_uris, list):
        raise BadRequest("redirect_uris must be a list of URLs.", code="invalid-client")
    redirect_uris = [_url("redirect_uris[]", u) for u in redirect_uris]
    launch_url = _url("launch_url", data["launch_url"]) if data.get("launch_url") else None
    standalone_url = _url("standalone_url", data["standalone_url"]) if data.get("standalone_url") else None
    jwks_url = _url("jwks_url", data["jwks_url"]) if data.get("jwks_url") else None
    jwks = data.get("jwks")
    if jwks is not None:
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise BadRequest('jwks must be a JWKS object: {"keys": [...]}.', code="invalid-client")
        if any(not isinstance(k, dict) or _PRIVATE_MEMBERS & set(k) for k in jwks["keys"]):
            raise BadRequest("jwks must hold public keys only.", code="invalid-client")
    if method == "private_key_jwt" and not (jwks or jwks_url):
        raise BadRequest(
            "A private_key_jwt client needs jwks_url (preferred) or jwks.", code="invalid-client"
        )
    default = INTERACTIVE_SCOPES + (["system/*.cruds"] if method == "private_key_jwt" else [])
    scopes = data.get("scopes", default)
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise BadRequest("scopes must be a list of scope strings.", code="invalid-client")
    for scope in scopes:
        try:
            parsed = parse_resource_scope(scope)
        except ScopeError as exc:
            raise BadRequest(f"scopes: {exc}.", code="invalid-client") from None
        if parsed is None and scope not in CONTEXT_SCOPES:
            raise BadRequest(
                f"scopes: {scope[:60]!r} is neither a resource scope nor one of "
                f"{', '.join(sorted(CONTEXT_SCOPES))}.",
                code="invalid-client",
            )
        if parsed is not None and parsed.level == "system" and method != "private_key_jwt":
            raise BadRequest("system/ scopes need a private_key_jwt client.", code="invalid-client")
    row = session.get(SandboxClient, client_id)
    if row is None:
        row = SandboxClient(client_id=client_id, faults={})
        session.add(row)
    row.name = str(data.get("name") or client_id)[:200]
    row.auth_method = method
    row.redirect_uris = redirect_uris
    row.launch_url = launch_url
    row.standalone_url = standalone_url
    row.jwks_url = jwks_url
    row.jwks = jwks
    row.scopes = list(dict.fromkeys(scopes))
    return row


def describe(row: SandboxClient) -> dict[str, Any]:
    return {
        "client_id": row.client_id,
        "name": row.name,
        "auth_method": "public" if row.auth_method == "none" else row.auth_method,
        "redirect_uris": row.redirect_uris,
        "launch_url": row.launch_url,
        "standalone_url": row.standalone_url,
        "jwks_url": row.jwks_url,
        "jwks": row.jwks,
        "scopes": row.scopes,
        "faults": row.faults or {},
    }


def read_file(path: Path) -> list[dict[str, Any]]:
    """Registrations from a JSON file: a list of objects, each with its client_id."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadRequest(f"{path}: cannot read a JSON list of clients ({exc.__class__.__name__}).") from None
    if not isinstance(data, list) or not all(
        isinstance(c, dict) and isinstance(c.get("client_id"), str) for c in data
    ):
        raise BadRequest(f"{path}: expected a JSON list of objects, each with a client_id.")
    return data
