"""openapi.yaml stays true: a valid OpenAPI 3.1 document that routes and documentation agree on, both ways."""

from __future__ import annotations

from flask import Flask
from openapi_spec_validator import validate

from tests.support.openapi import path_template, spec

# What vendors call. Everything the app routes under these prefixes must be documented, and the
# reverse; operations endpoints (/healthz, /readyz, /metrics) are for hospital IT and documented in README.
VENDOR_PREFIXES = ("/api/", "/oauth/", "/fhir", "/.well-known/", "/cds-services")


def test_openapi_is_a_valid_3_1_document() -> None:
    document = spec()
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_vendor_route_is_documented_and_every_documented_path_is_routed(app: Flask) -> None:
    routed: set[tuple[str, str]] = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(VENDOR_PREFIXES):
            continue
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            routed.add((method, path_template(rule.rule)))
    documented = {
        (method.upper(), path)
        for path, item in spec()["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    }
    assert routed - documented == set(), "routes missing from openapi.yaml"
    assert documented - routed == set(), "openapi.yaml documents routes the app does not have"


def test_every_operation_documents_its_errors_and_security() -> None:
    for path, item in spec()["paths"].items():
        for method, operation in item.items():
            if method not in {"get", "post", "delete"}:
                continue
            public = operation.get("security") == []
            codes = set(operation["responses"])
            assert any(code.startswith("2") for code in codes), (method, path)
            if not public:
                assert {"401", "403"} <= codes, f"{method} {path} must document 401 and 403"
