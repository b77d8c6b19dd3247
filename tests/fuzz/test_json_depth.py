"""The request reader's depth check on the raw text agrees with the walk over the parsed value, for any
JSON document (strings full of brackets and quotes included), or defers to that walk."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_bridge.api.common import _depth_ok, _text_depth_ok

tricky_text = st.text(alphabet='[]{}"\\:, ab\u00e9\u4e16', max_size=8)
documents = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(documents, st.integers(1, 12), st.booleans())
def test_text_depth_agrees_with_the_walk(document: Any, limit: int, pretty: bool) -> None:
    raw = json.dumps(document, indent=1).encode() if pretty else orjson.dumps(document)
    quick = _text_depth_ok(raw, limit)
    if b"\\" not in raw:
        assert quick is not None
    assert quick in (None, _depth_ok(orjson.loads(raw), limit))


def test_deep_and_shallow_documents() -> None:
    assert _text_depth_ok(b"[" * 32 + b"]" * 32, 32) is True
    assert _text_depth_ok(b"[" * 33 + b"]" * 33, 32) is False
    assert _text_depth_ok(b'{"a": "[[[[[[", "b": [[1], {"c": "]]]"}]}', 3) is True
    assert _text_depth_ok(b'{"a": "[[[[[[", "b": [[1], {"c": "]]]"}]}', 2) is False
    assert _text_depth_ok(b'["\\"[["]', 5) is None
