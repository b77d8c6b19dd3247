"""The JSON body of a Flask test response, for tests that read fields out of it.

Werkzeug types ``TestResponse.json`` as ``Any | None`` (None when the body is not JSON), so indexing it
straight away does not type-check, and when it does fail at run time it fails with a bare
``TypeError: 'NoneType' object is not subscriptable``. ``json_of`` says instead which response was not
JSON, and hands back the payload as ``Any``: a JSON document is genuinely untyped.
"""

from __future__ import annotations

from typing import Any

from werkzeug.test import TestResponse


def json_of(response: TestResponse) -> Any:
    """The decoded JSON body; fails the test if the response has none."""
    data = response.json
    assert data is not None, f"expected a JSON body, got {response.status} {response.mimetype}"
    return data


def json_object_of(response: TestResponse) -> dict[str, Any]:
    """The decoded JSON body when the test needs it to be an object (a FHIR resource, a token response)."""
    data = json_of(response)
    assert isinstance(data, dict), f"expected a JSON object, got {type(data).__name__}"
    return data
