"""The push path's envelope fast path accepts exactly what RecordSchema accepts, with the same result;
everything else still goes through the schema (so its error messages are unchanged)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from fhir_bridge.push import RecordSchema, load_envelope

SCHEMA = RecordSchema()

ids = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,12}", fullmatch=True),
    st.text(max_size=12),
    st.integers(),
    st.none(),
    st.just("x" * 201),
    st.just("ok\n"),
)
values = st.one_of(
    ids, st.dictionaries(st.text(max_size=5), st.integers(), max_size=3), st.lists(st.integers())
)
envelopes = st.dictionaries(
    st.sampled_from(["record_id", "app_user_id", "measure", "data", "extra"]), values, max_size=5
) | st.fixed_dictionaries(
    {
        "record_id": ids,
        "app_user_id": ids,
        "measure": st.one_of(st.text(max_size=110), st.just("")),
        "data": st.one_of(st.dictionaries(st.text(max_size=5), st.integers(), max_size=3), st.integers()),
    }
)


def outcome(load: Any, raw: dict[str, Any]) -> tuple[str, Any]:
    try:
        return "ok", load(raw)
    except ValidationError as exc:
        return "error", exc.messages


@settings(max_examples=400, deadline=None)
@given(envelopes)
def test_fast_path_and_schema_agree(raw: dict[str, Any]) -> None:
    assert outcome(load_envelope, raw) == outcome(SCHEMA.load, raw)
