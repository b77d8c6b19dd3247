"""openapi.yaml as the tests use it: load once, and check a real response against what it documents."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[2] / "openapi.yaml"
SPEC_URI = "urn:fhir-bridge:openapi"


@functools.cache
def spec() -> dict[str, Any]:
    with SPEC_PATH.open() as handle:
        loaded = yaml.safe_load(handle)
    assert isinstance(loaded, dict)
    return loaded


def _pointer(ref: str) -> Any:
    node: Any = spec()
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _deref(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = _pointer(node["$ref"])
    return node


def path_template(flask_rule: str) -> str:
    """``/api/v1/records/<record_id>`` -> ``/api/v1/records/{record_id}``."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", flask_rule)


def example(path: str, method: str, media_type: str | None = None) -> Any:
    body = spec()["paths"][path][method.lower()]["requestBody"]["content"]
    media = body[media_type] if media_type else next(iter(body.values()))
    return media["example"]


def assert_matches_spec(response: Any, method: str, path: str) -> None:
    """The response's status is documented for this operation and its body validates against its schema."""
    operation = spec()["paths"][path][method.lower()]
    documented = operation["responses"]
    status = str(response.status_code)
    assert status in documented, f"{method} {path} answered {status}, which openapi.yaml does not document"
    described = _deref(documented[status])
    content = described.get("content")
    if not content:
        return
    mimetype = response.mimetype
    assert mimetype in content, f"{method} {path} {status}: {mimetype} is not documented ({list(content)})"
    schema = content[mimetype]["schema"]
    registry: Registry[Any] = Registry().with_resource(SPEC_URI, Resource.from_contents(spec(), DRAFT202012))
    resolved = {"$schema": "https://json-schema.org/draft/2020-12/schema", **_absolute(schema)}
    jsonschema.Draft202012Validator(resolved, registry=registry).validate(response.json)


def _absolute(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: (SPEC_URI + v if k == "$ref" and isinstance(v, str) and v.startswith("#") else _absolute(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_absolute(v) for v in node]
    return node
