"""``/registration``: what hospital IT types into their EHR's app registration form, per tenant.

Nothing here is secret: client ids, URLs and scopes are what every EHR's registration screen asks
for. The JSON block follows the field names of RFC 7591 dynamic registration, which most EHR
vendor portals mirror, so it can be pasted or read field by field (see docs/registering.md).
"""

from __future__ import annotations

import json
from typing import Any

from flask import render_template
from sqlalchemy import select

from auth import smart_launch as sl
from fhir_bridge import services
from fhir_bridge.storage.models import Tenant


def tenant_registration(tenant: Tenant) -> dict[str, Any]:
    settings = services.current().settings
    from smart_app.launch import redirect_uri

    syntax = tenant.scope_syntax or "v2"
    ehr_scope = sl.launch_scopes(tenant.smart_scopes or "", syntax=syntax, kind="ehr")
    standalone_scope = sl.launch_scopes(tenant.smart_scopes or "", syntax=syntax, kind="standalone")
    confidential = tenant.smart_client_auth == "private_key_jwt"
    document: dict[str, Any] = {
        "client_name": "fhir-bridge",
        "client_id": tenant.smart_client_id or "(assigned by the EHR)",
        "application_type": "web",
        "initiate_login_uri": settings.url("/launch"),
        "redirect_uris": [redirect_uri(tenant)],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "private_key_jwt" if confidential else "none",
        "scope": " ".join(dict.fromkeys(ehr_scope.split() + standalone_scope.split())),
        "fhir_versions": ["4.0.1"],
        "smart_launch_types": ["ehr-launch", "standalone-launch"],
        "pkce_code_challenge_method": "S256",
    }
    if confidential:
        document["jwks_uri"] = settings.url("/.well-known/jwks.json")
        document["token_endpoint_auth_signing_alg"] = settings.signing_alg
    return {
        "tenant": tenant,
        "launch_url": settings.url("/launch"),
        "standalone_url": settings.url("/launch/standalone") + f"?tenant={tenant.id}",
        "redirect_url": redirect_uri(tenant),
        "jwks_url": settings.url("/.well-known/jwks.json"),
        "ehr_scope": ehr_scope,
        "standalone_scope": standalone_scope,
        "confidential": confidential,
        "json": json.dumps(document, indent=2),
    }


def page() -> str:
    svc = services.current()
    with svc.db.transaction() as session:
        tenants = list(session.scalars(select(Tenant).where(Tenant.status == "active").order_by(Tenant.name)))
        entries = [tenant_registration(t) for t in tenants]
    return render_template(
        "smart/registration.html",
        entries=entries,
        public_url=svc.settings.public_url,
        jwks_url=svc.settings.url("/.well-known/jwks.json"),
    )
