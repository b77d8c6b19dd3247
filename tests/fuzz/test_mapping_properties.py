"""Property tests of the mapping engine, with records generated from each measure's own spec.

* every valid record maps, and every resource it becomes passes full ``fhir.resources`` R4 validation
  and round-trips through JSON unchanged (the engine itself never builds a model: this is the proof
  that checking specs once at load and values per record is enough);
* every invalid record yields rejections with known codes, never an exception;
* arbitrary JSON never raises.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from mappings import MappingContext, load_catalog
from mappings.compiler import ObservationMapper, QuestionnaireMapper
from mappings.fhir_models import validate_resource
from mappings.identity import device_full_url
from mappings.records import RECORD_CONTEXT
from mappings.spec import FieldSpec, ObservationSpec, QuestionnaireSpec
from mappings.units import UNITS, convert

CATALOG = load_catalog()
MEASURES = CATALOG.measures()
RECEIVED = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
CONTEXT = MappingContext("acme-mood", "r-1", "Patient/p-1", device_full_url("acme-mood"), RECEIVED)
REJECTION_CODES = {
    "missing",
    "unknown-field",
    "wrong-type",
    "out-of-range",
    "invalid-date-time",
    "invalid-date",
    "no-timezone",
    "in-future",
    "too-early",
    "unit-not-convertible",
    "invalid-answer",
    "period-reversed",
}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- valid records ---------------------------------------------------------------------------------

offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
instants = st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2024, 6, 1, 12, 4)).map(
    lambda d: d.replace(tzinfo=UTC)
)


def _iso(moment: datetime, zone: timezone, zulu: bool) -> str:
    local = moment.astimezone(zone)
    text = local.isoformat()
    return text.replace("+00:00", "Z") if zulu else text


aware_texts = st.builds(_iso, instants, offsets, st.booleans())


def _number(field: FieldSpec) -> st.SearchStrategy[Any]:
    assert field.minimum is not None and field.maximum is not None
    if field.type == "integer":
        return st.integers(int(field.minimum), int(field.maximum))
    return st.floats(field.minimum, field.maximum, allow_nan=False, allow_infinity=False)


def _quantity(field: FieldSpec) -> st.SearchStrategy[Any]:
    assert field.unit is not None
    canonical = field.unit.code

    def spell(value: float, unit: str, as_object: bool) -> Any:
        if unit == canonical and not as_object:
            return value
        return {"value": convert(value, canonical, unit), "unit": unit}

    return st.builds(spell, _number(field), st.sampled_from(field.accept_units), st.booleans())


def _field_value(field: FieldSpec) -> st.SearchStrategy[Any]:
    if field.type == "date-time":
        return aware_texts
    if field.type == "date":
        return st.dates(date(1900, 1, 1), date(2024, 6, 1)).map(date.isoformat)
    if field.type == "quantity":
        return _quantity(field)
    return _number(field)


@st.composite
def valid_observation(draw: st.DrawFn, spec: ObservationSpec) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for field in spec.fields:
        if field.required or draw(st.booleans()):
            data[field.name] = draw(_field_value(field))
        elif draw(st.booleans()):
            data[field.name] = None  # null means "not measured" for an optional field
    if spec.require_any and not any(data.get(n) is not None for n in spec.require_any):
        name = draw(st.sampled_from(spec.require_any))
        data[name] = draw(_field_value(next(f for f in spec.fields if f.name == name)))
    eff = spec.effective
    if eff.start and eff.end:
        first, second = sorted(
            [datetime.fromisoformat(data[eff.start]), datetime.fromisoformat(data[eff.end])]
        )
        data[eff.start], data[eff.end] = first.isoformat(), second.isoformat()
    return data


@st.composite
def valid_questionnaire(draw: st.DrawFn, spec: QuestionnaireSpec) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for item in spec.items:
        if not item.required and draw(st.booleans()):
            if draw(st.booleans()):
                answers[item.name] = None
            continue
        option = draw(st.sampled_from(spec.answer_lists[item.answers]))
        spellings: list[Any] = [option.coding.code]
        if option.score is not None:
            spellings.append(int(option.score))
        spellings += [a.coding.code for a in item.accept_also if a.same_as == option.coding.code]
        answers[item.name] = draw(st.sampled_from(spellings))
    return {"authored": draw(aware_texts), "answers": answers}


def valid_record(measure: str) -> st.SearchStrategy[dict[str, Any]]:
    spec = CATALOG.spec(measure)
    if isinstance(spec, ObservationSpec):
        return valid_observation(spec)
    return valid_questionnaire(spec)


@pytest.mark.parametrize("measure", MEASURES)
@SETTINGS
@given(data=st.data())
def test_every_valid_record_maps_to_valid_fhir_that_round_trips(measure: str, data: st.DataObject) -> None:
    record = data.draw(valid_record(measure))
    result = CATALOG.map(measure, record, CONTEXT)
    assert result.ok, (record, result.rejections)
    assert result.resources and result.measurements
    urls = {r.full_url for r in result.resources}
    assert len(urls) == len(result.resources)
    for mapped in result.resources:
        resource = mapped.resource
        model = validate_resource(resource)
        assert orjson.loads(model.model_dump_json()) == resource
        assert orjson.loads(orjson.dumps(resource)) == resource
        for ref in resource.get("derivedFrom", []):
            assert ref["reference"] in urls
    again = CATALOG.map(measure, orjson.loads(orjson.dumps(record)), CONTEXT)
    assert [orjson.dumps(r.resource) for r in again.resources] == [
        orjson.dumps(r.resource) for r in result.resources
    ]


# -- invalid records -------------------------------------------------------------------------------

junk = st.one_of(
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.text(max_size=5),
)


def _paths(record: dict[str, Any]) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = [(k,) for k in record]
    answers = record.get("answers")
    if isinstance(answers, dict):
        paths += [("answers", k) for k, v in answers.items() if v is not None]
    return paths


@st.composite
def invalid_record(draw: st.DrawFn, measure: str) -> dict[str, Any]:
    spec = CATALOG.spec(measure)
    record = draw(valid_record(measure))
    path = draw(st.sampled_from([p for p in _paths(record) if record_get(record, p) is not None]))
    field = next((f for f in getattr(spec, "fields", ()) if (f.name,) == path), None)
    mutation = draw(st.sampled_from(["drop", "junk", "range", "unknown", "naive", "future", "unit"]))
    value = record_get(record, path)
    if mutation == "drop" and (field is None or field.required) and not _optional_answer(spec, path):
        record_del(record, path)
    elif mutation == "range" and (field is not None and field.maximum is not None):
        record_set(
            record, path, draw(st.one_of(st.integers(int(field.maximum) + 1, 10**6), st.just(-1 - 10**7)))
        )
    elif mutation == "range" and len(path) == 2:
        record_set(record, path, draw(st.integers(6, 10**6)))
    elif mutation == "unknown":
        record_set(record, (*path[:-1], "x_" + draw(st.text("abc", min_size=1, max_size=4))), 1)
    elif mutation == "naive" and isinstance(value, str) and "T" in value:
        record_set(record, path, datetime.fromisoformat(value).replace(tzinfo=None).isoformat())
    elif (
        mutation == "future"
        and isinstance(value, str)
        and (path == ("authored",) or (field and field.type != "quantity"))
    ):
        later = RECEIVED + timedelta(days=draw(st.integers(2, 3000)))
        record_set(record, path, later.date().isoformat() if "T" not in value else later.isoformat())
    elif mutation == "unit" and field is not None and field.type == "quantity":
        bad = draw(st.sampled_from([*sorted(set(UNITS) - set(field.accept_units)), "hours", "mins", ""]))
        record_set(record, path, {"value": 1, "unit": bad})
    else:
        record_set(record, path, draw(junk))
    return record


def _optional_answer(spec: Any, path: tuple[str, ...]) -> bool:
    if len(path) != 2 or path[0] != "answers":
        return False
    return not next(i for i in spec.items if i.name == path[1]).required


def record_get(record: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = record
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def record_set(record: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = record
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def record_del(record: dict[str, Any], path: tuple[str, ...]) -> None:
    node = record
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]


@pytest.mark.parametrize("measure", MEASURES)
@SETTINGS
@given(data=st.data())
def test_every_invalid_record_yields_reasons_never_an_exception(measure: str, data: st.DataObject) -> None:
    record = data.draw(invalid_record(measure))
    result = CATALOG.map(measure, record, CONTEXT)
    assert not result.ok, record
    assert not result.resources and not result.measurements
    for rejection in result.rejections:
        assert rejection.code in REJECTION_CODES, rejection
        assert rejection.field and rejection.message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@pytest.mark.parametrize("measure", MEASURES)
@settings(max_examples=80, deadline=None)
@given(
    data=json_values
    | st.dictionaries(
        st.sampled_from(
            [
                "time",
                "date",
                "start",
                "end",
                "authored",
                "answers",
                "rating",
                "duration",
                "steps",
                "bpm",
                "sdnn",
                "sessions",
            ]
        ),
        json_values,
    )
)
def test_arbitrary_json_never_raises(measure: str, data: Any) -> None:
    result = CATALOG.map(measure, data, CONTEXT)
    assert result.ok or result.rejections


# -- the fast paths agree with the reference implementations -----------------------------------------


@pytest.mark.parametrize(
    "expression", ["%scores.sum()", "%scores.count()", "%scores.min()", " %bond . max () "]
)
@settings(max_examples=50, deadline=None)
@given(
    scores=st.lists(st.integers(0, 5) | st.sampled_from([0.5, 2.25]), max_size=9),
    bond=st.lists(st.integers(1, 5), max_size=3),
)
def test_fast_fhirpath_aggregates_equal_fhirpathpy(
    expression: str, scores: list[float], bond: list[int]
) -> None:
    from mappings.fhirpath import fast_path, reference_evaluator

    fast = fast_path(expression)
    assert fast is not None
    env = {"scores": scores, "bond": bond}
    assert fast({}, env) == reference_evaluator(expression)({}, env)


@settings(max_examples=200, deadline=None)
@given(system=st.text(max_size=60), value=st.text(max_size=40))
def test_full_urls_are_standard_uuid5(system: str, value: str) -> None:
    import uuid

    from mappings.identity import CANONICAL, full_url

    expected = uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, CANONICAL), system + "|" + value)
    assert full_url(system, value) == f"urn:uuid:{expected}"


def _load_both(measure: str, record: Any) -> tuple[Any, Any]:
    """(the fast loader's result, ``schema.load``'s result or "rejected"), under the record context."""
    mapper = CATALOG._mappers[measure]
    assert isinstance(mapper, ObservationMapper | QuestionnaireMapper), type(mapper)
    fast = mapper._fast_load
    assert fast is not None, f"{measure}: the compiled schema has no fast loader"
    with RECORD_CONTEXT({"latest": RECEIVED + CATALOG.future_tolerance}):
        quick = fast(record)
        try:
            slow = mapper.schema.load(record)
        except ValidationError:
            slow = "rejected"
    return quick, slow


@pytest.mark.parametrize("measure", MEASURES)
@SETTINGS
@given(data=st.data())
def test_fast_data_loader_equals_the_schema(measure: str, data: st.DataObject) -> None:
    """Valid records load to the very values the schema gives; anything else falls back to the schema."""
    record = data.draw(
        valid_record(measure) | invalid_record(measure) | st.dictionaries(st.text(max_size=8), json_values)
    )
    quick, slow = _load_both(measure, record)
    if slow == "rejected":
        assert quick is None, record
    else:
        assert quick == slow, record
        assert [type(v) for v in quick.values()] == [type(v) for v in slow.values()]


@pytest.mark.parametrize("measure", MEASURES)
@SETTINGS
@given(data=st.data())
def test_valid_records_take_the_fast_path(measure: str, data: st.DataObject) -> None:
    quick, slow = _load_both(measure, data.draw(valid_record(measure)))
    assert quick is not None and quick == slow
