"""Compiling a checked spec into a mapper: everything constant is built and FHIR-validated once, at load.

Per record a mapper only runs the spec's field checks (the schema's own ``_deserialize`` steps
without marshmallow's bookkeeping; the schema itself only for records that fail, for its messages),
fills the varying values (identifier, subject, times, numbers, answers) into a pre-serialised
skeleton, and evaluates the pre-compiled FHIRPath scores. No ``fhir.resources`` model is built on
that path: at load, each spec's output for sample records at both ends of every range is validated
with the R4 models and round-tripped through JSON, and the property tests prove the same for
generated records. That is what makes mapping run at several times the rate full model validation
would allow (see ``bench/bench_mapping.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson
from marshmallow import Schema, ValidationError

from mappings import fhir_models
from mappings.fhirpath import Evaluator, compile_expression, reference_evaluator
from mappings.identity import RECORD_IDENTIFIER_SYSTEM, full_url, identifier_value
from mappings.model import MappedResource, MappingContext, MapResult, Measurement, Rejection
from mappings.records import FastLoad, fast_loader, observation_schema, questionnaire_schema, rejections
from mappings.spec import (
    AnswerOption,
    FieldSpec,
    ObservationSpec,
    QuestionnaireSpec,
    ScoreSpec,
    Spec,
    ValueSpec,
)
from mappings.specfile import Problems
from mappings.units import UCUM

PATIENT_SUPPLIED = {
    "system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-tags",
    "code": "patient-supplied",
    "display": "Patient supplied",
}
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


def fresh(value: Any) -> Callable[[], Any]:
    """A function returning a new deep copy of a JSON-like constant on every call.

    Resources are handed to callers that may change them (delivery rewrites references), so constant
    parts cannot be shared; generated literal code copies them several times faster than ``deepcopy``
    or an ``orjson`` round trip. ``repr`` of dicts, lists, strings, numbers, booleans and ``None`` is
    Python source for an equal value, and the values come from specs already checked at load.
    """
    namespace: dict[str, Any] = {}
    exec(f"def make():\n    return {value!r}\n", namespace)  # noqa: S102 - source is repr() of checked JSON data
    return namespace["make"]  # type: ignore[no-any-return]


_POSITIVE = fresh(
    [{"coding": [{"system": INTERPRETATION, "code": "POS", "display": "Positive"}], "text": "Positive"}]
)
_NEGATIVE = fresh(
    [{"coding": [{"system": INTERPRETATION, "code": "NEG", "display": "Negative"}], "text": "Negative"}]
)
_SCORE_UNIT = {"unit": "{score}", "system": UCUM, "code": "{score}"}


def fhir_datetime(value: datetime) -> str:
    """FHIR ``dateTime`` text keeping the sender's offset (local time matters clinically); UTC as ``Z``."""
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _as_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _reference(value: str) -> dict[str, str]:
    return {"reference": value}


def _identity(spec_id: str, role: str, ctx: MappingContext) -> tuple[str, str]:
    value = identifier_value(ctx.vendor_id, ctx.record_id, spec_id, role)
    return value, full_url(RECORD_IDENTIFIER_SYSTEM, value)


def _mapped(resource: dict[str, Any], value: str, url: str) -> MappedResource:
    return MappedResource(resource["resourceType"], RECORD_IDENTIFIER_SYSTEM, value, url, resource)


def _load(schema: Schema, fast: FastLoad | None, data: dict[str, Any]) -> dict[str, Any] | MapResult:
    """The record's values (the fast path when it passes), or the schema's rejections."""
    loaded = fast(data) if fast is not None else None
    if loaded is not None:
        return loaded
    try:
        result: dict[str, Any] = schema.load(data)
    except ValidationError as exc:
        return MapResult(rejections=tuple(rejections(exc.messages)))
    return result


class _Mapper:
    spec: Spec

    def map(self, data: dict[str, Any], ctx: MappingContext) -> MapResult:
        raise NotImplementedError


# -- observation ---------------------------------------------------------------------------------


def _value_builder(value: ValueSpec, fields: dict[str, FieldSpec]) -> tuple[str, Callable[[Any], Any]]:
    """The ``value[x]`` key for a value spec and a function from the loaded field value to its JSON."""
    field = fields[value.field]
    unit = field.unit or value.unit
    if unit is None:
        return "valueInteger", lambda v: v
    code, display = unit.code, unit.display

    def quantity(v: Any) -> dict[str, Any]:
        return {"value": v, "unit": display, "system": UCUM, "code": code}

    return "valueQuantity", quantity


class ObservationMapper(_Mapper):
    spec: ObservationSpec

    def __init__(self, spec: ObservationSpec) -> None:
        self.spec = spec
        self.schema: Schema = observation_schema(spec.id, spec.fields)
        self._fast_load = fast_loader(self.schema)
        self.fields = {f.name: f for f in spec.fields}
        eff = spec.effective
        if eff.date_time is not None:
            self._effective_key = "effectiveDateTime"
        else:
            self._effective_key = "effectivePeriod"
        self._value: tuple[str, str, Callable[[Any], Any]] | None = None
        if spec.value is not None:
            key, build = _value_builder(spec.value, self.fields)
            self._value = (key, spec.value.field, build)
        self._components = [
            (fresh(c.code.fhir()), c.value.field, *_value_builder(c.value, self.fields))
            for c in spec.components
        ]
        skeleton: dict[str, Any] = {
            "resourceType": "Observation",
            "meta": {"tag": [PATIENT_SUPPLIED]},
            "identifier": None,
            "status": "final",
            "category": [c.fhir() for c in spec.category],
            "code": spec.code.fhir(),
            "subject": None,
            self._effective_key: None,
            "performer": None,
        }
        if not skeleton["category"]:
            del skeleton["category"]
        if self._value is not None:
            skeleton[self._value[0]] = None
        skeleton["device"] = None
        if self._components:
            skeleton["component"] = None
        self._skeleton = fresh(skeleton)

    def map(self, data: dict[str, Any], ctx: MappingContext) -> MapResult:
        loaded = _load(self.schema, self._fast_load, data)
        if isinstance(loaded, MapResult):
            return loaded
        values = {k: v for k, v in loaded.items() if v is not None}
        problems = self._cross_check(values)
        if problems:
            return MapResult(rejections=tuple(problems))
        return self.build(values, ctx)

    def _cross_check(self, values: dict[str, Any]) -> list[Rejection]:
        spec = self.spec
        out: list[Rejection] = []
        if spec.require_any and not any(name in values for name in spec.require_any):
            out.append(Rejection("missing", "data", f"Give at least one of: {', '.join(spec.require_any)}."))
        eff = spec.effective
        if eff.start is not None and eff.end is not None and values[eff.end] < values[eff.start]:
            out.append(Rejection("period-reversed", eff.end, f"`{eff.end}` is before `{eff.start}`."))
        return out

    def build(self, values: dict[str, Any], ctx: MappingContext) -> MapResult:
        """Fill the skeleton from validated values (also used at load, with sample values)."""
        spec = self.spec
        ident, url = _identity(spec.id, "main", ctx)
        res = self._skeleton()
        res["identifier"] = [{"system": RECORD_IDENTIFIER_SYSTEM, "value": ident}]
        res["subject"] = {"reference": ctx.patient_reference}
        eff = spec.effective
        if eff.date_time is not None:
            when = values[eff.date_time]
            if isinstance(when, datetime):
                res["effectiveDateTime"] = fhir_datetime(when)
            else:
                res["effectiveDateTime"] = when.isoformat()
                when = datetime(when.year, when.month, when.day, tzinfo=UTC)
        else:
            assert eff.start is not None and eff.end is not None
            when = values[eff.start]
            res["effectivePeriod"] = {"start": fhir_datetime(when), "end": fhir_datetime(values[eff.end])}
        res["performer"] = [{"reference": ctx.patient_reference}]
        if self._value is not None:
            key, name, build = self._value
            res[key] = build(values[name])
        res["device"] = {"reference": ctx.device_full_url}
        if self._components:
            res["component"] = [
                {"code": code(), key: build(values[name])}
                for code, name, key, build in self._components
                if name in values
            ]
        # A list comprehension, not a generator: this runs per record, and a generator costs more.
        measurements = tuple(
            [
                Measurement(m.code, when, float(values[m.source]))
                for m in spec.measurements
                if m.source in values
            ]
        )
        return MapResult(
            (MappedResource("Observation", RECORD_IDENTIFIER_SYSTEM, ident, url, res),), (), measurements
        )

    def samples(self) -> list[dict[str, Any]]:
        """Validated values at both ends of every range, every optional field present."""
        low: dict[str, Any] = {}
        high: dict[str, Any] = {}
        for f in self.spec.fields:
            if f.type == "date-time":
                low[f.name] = datetime(2024, 5, 1, 8, 30, tzinfo=UTC)
                high[f.name] = datetime(2024, 5, 1, 8, 30, tzinfo=UTC)
            elif f.type == "date":
                low[f.name] = high[f.name] = date(2024, 5, 1)
            else:
                assert f.minimum is not None and f.maximum is not None
                low[f.name], high[f.name] = _as_number(f.minimum), _as_number(f.maximum)
        return [low, high]


# -- questionnaire -------------------------------------------------------------------------------


class QuestionnaireMapper(_Mapper):
    spec: QuestionnaireSpec

    def __init__(self, spec: QuestionnaireSpec, evaluators: dict[str, Evaluator]) -> None:
        self.spec = spec
        self.schema: Schema = questionnaire_schema(spec)
        self._fast_load = fast_loader(self.schema)
        self._evaluators = evaluators
        self._canonical = f"{spec.questionnaire.url}|{spec.questionnaire.version}"
        self._category = [c.fhir() for c in spec.category]
        self._themes = sorted({i.theme for i in spec.items if i.theme})
        self._items = spec.items
        # One factory per (item, answer): the whole response item is a constant once the answer is known.
        self._answer_items = {
            (item.name, option.coding.code): fresh(
                {"linkId": item.link_id, "text": item.text, "answer": [{"valueCoding": option.coding.fhir()}]}
            )
            for item in spec.items
            for option in spec.answer_lists[item.answers]
        }
        qr: dict[str, Any] = {
            "resourceType": "QuestionnaireResponse",
            "meta": {"tag": [PATIENT_SUPPLIED]},
            "identifier": None,
            "questionnaire": self._canonical,
            "status": "completed",
            "subject": None,
            "authored": None,
            "author": None,
            "source": None,
            "item": None,
        }
        self._qr = fresh(qr)
        self._scores = []
        for score in spec.scores:
            skeleton = self._observation_skeleton(
                score.code.fhir(), value_key="valueQuantity", performer=False
            )
            if score.bands:
                skeleton["interpretation"] = None
            skeleton["device"] = skeleton["derivedFrom"] = None
            self._scores.append((score, fresh(skeleton)))
        self._item_obs = []
        for io in spec.item_observations:
            skeleton = self._observation_skeleton(
                io.code.fhir(), value_key="valueCodeableConcept", performer=True
            )
            if io.positive:
                skeleton["interpretation"] = None
            skeleton["device"] = skeleton["derivedFrom"] = None
            self._item_obs.append((io, fresh(skeleton)))

    def _observation_skeleton(
        self, code: dict[str, Any], *, value_key: str, performer: bool
    ) -> dict[str, Any]:
        skeleton: dict[str, Any] = {
            "resourceType": "Observation",
            "meta": {"tag": [PATIENT_SUPPLIED]},
            "identifier": None,
            "status": "final",
            "category": self._category,
            "code": code,
            "subject": None,
            "effectiveDateTime": None,
        }
        if performer:
            skeleton["performer"] = None
        skeleton[value_key] = None
        if not self._category:
            del skeleton["category"]
        return skeleton

    def map(self, data: dict[str, Any], ctx: MappingContext) -> MapResult:
        loaded = _load(self.schema, self._fast_load, data)
        if isinstance(loaded, MapResult):
            return loaded
        answers = {k: v for k, v in loaded["answers"].items() if v is not None}
        return self.build(loaded["authored"], answers, ctx)

    def variables(self, answers: dict[str, AnswerOption]) -> dict[str, Any]:
        """FHIRPath environment: ``%scores``, one variable per item name, one list per theme."""
        env: dict[str, Any] = {}
        scores: list[float] = []
        themes: dict[str, list[float]] = {t: [] for t in self._themes}
        for item in self._items:
            option = answers.get(item.name)
            score = None if option is None else option.score
            env[item.name] = [] if score is None else [score]
            if score is not None:
                scores.append(score)
                if item.theme:
                    themes[item.theme].append(score)
        env["scores"] = scores
        env.update(themes)
        return env

    def evaluate(self, score: ScoreSpec, qr: dict[str, Any], env: dict[str, Any]) -> float | int | None:
        """The score's value, or ``None`` when the expression does not yield one number in range."""
        try:
            result = self._evaluators[score.role](qr, env)
        except Exception:  # boundary: fhirpathpy raises bare Exceptions; a failed score becomes a rejection
            return None
        number = result[0] if len(result) == 1 else None
        if isinstance(number, bool) or not isinstance(number, int | float | Decimal):
            return None
        value = _as_number(round(float(number), 6))
        return value if score.minimum <= value <= score.maximum else None

    def build(self, authored: datetime, answers: dict[str, AnswerOption], ctx: MappingContext) -> MapResult:
        spec = self.spec
        when = fhir_datetime(authored)
        patient = ctx.patient_reference
        qr_ident, qr_url = _identity(spec.id, "main", ctx)
        qr = self._qr()
        qr["identifier"] = {"system": RECORD_IDENTIFIER_SYSTEM, "value": qr_ident}
        qr["subject"] = _reference(patient)
        qr["authored"] = when
        qr["author"] = _reference(patient)
        qr["source"] = _reference(patient)
        qr["item"] = [
            self._answer_items[item.name, answers[item.name].coding.code]()
            for item in self._items
            if item.name in answers
        ]
        resources = [_mapped(qr, qr_ident, qr_url)]
        measurements: list[Measurement] = []
        env = self.variables(answers)
        for score, skeleton in self._scores:
            value = self.evaluate(score, qr, env)
            if value is None:
                message = (
                    f"The score `{score.role}` could not be computed from these answers. This is a problem "
                    "in the mapping spec, not in your data; the bridge's operators have to fix it."
                )
                return MapResult(rejections=(Rejection("score-failed", "answers", message),))
            ident, url = _identity(spec.id, score.role, ctx)
            obs = skeleton()
            obs["identifier"] = [{"system": RECORD_IDENTIFIER_SYSTEM, "value": ident}]
            obs["subject"] = _reference(patient)
            obs["effectiveDateTime"] = when
            # No performer on computed scores: US Core screening-assessment guidance says answers "not
            # answered directly" omit it and point at their source with derivedFrom instead.
            obs["valueQuantity"] = {"value": value, **_SCORE_UNIT}
            if score.bands:
                band = next(b for b in score.bands if value <= b.maximum)
                obs["interpretation"] = [
                    {"coding": [band.coding.fhir()], "text": band.text or band.coding.display}
                ]
            obs["device"] = _reference(ctx.device_full_url)
            obs["derivedFrom"] = [_reference(qr_url)]
            resources.append(_mapped(obs, ident, url))
            if score.measurement:
                measurements.append(Measurement(score.measurement, authored, float(value)))
        for io, skeleton in self._item_obs:
            option = answers.get(io.item)
            if option is None:
                continue
            ident, url = _identity(spec.id, io.role, ctx)
            obs = skeleton()
            obs["identifier"] = [{"system": RECORD_IDENTIFIER_SYSTEM, "value": ident}]
            obs["subject"] = _reference(patient)
            obs["effectiveDateTime"] = when
            obs["performer"] = [_reference(patient)]
            obs["valueCodeableConcept"] = {"coding": [option.coding.fhir()], "text": option.coding.display}
            if io.positive:
                obs["interpretation"] = (_POSITIVE if option.coding.code in io.positive else _NEGATIVE)()
            obs["device"] = _reference(ctx.device_full_url)
            obs["derivedFrom"] = [_reference(qr_url)]
            resources.append(_mapped(obs, ident, url))
            if io.measurement and option.score is not None:
                measurements.append(Measurement(io.measurement, authored, float(option.score)))
        return MapResult(resources=tuple(resources), measurements=tuple(measurements))

    def samples(self) -> list[dict[str, AnswerOption]]:
        """Every item answered with its lowest, then its highest answer (by score, else list order)."""
        low: dict[str, AnswerOption] = {}
        high: dict[str, AnswerOption] = {}
        for item in self._items:
            options = self.spec.answer_lists[item.answers]
            ordered = (
                sorted(options, key=lambda o: o.score or 0) if options[0].score is not None else list(options)
            )
            low[item.name], high[item.name] = ordered[0], ordered[-1]
        return [low, high]

    def questionnaire(self) -> dict[str, Any]:
        """The FHIR Questionnaire vendors render (answer scores as ``ordinalValue``)."""
        spec, meta = self.spec, self.spec.questionnaire
        out: dict[str, Any] = {
            "resourceType": "Questionnaire",
            "url": meta.url,
            "version": meta.version,
            "name": meta.name,
            "title": meta.title,
            "status": "active",
            "subjectType": ["Patient"],
        }
        if meta.description:
            out["description"] = meta.description
        if meta.copyright:
            out["copyright"] = meta.copyright
        out["code"] = [c.fhir() for c in meta.codings]
        items = []
        for item in spec.items:
            entry: dict[str, Any] = {"linkId": item.link_id}
            if item.codings:
                entry["code"] = [c.fhir() for c in item.codings]
            entry.update({"text": item.text, "type": "choice", "required": item.required})
            options = []
            for option in spec.answer_lists[item.answers]:
                answer: dict[str, Any] = {}
                if option.score is not None:
                    answer["extension"] = [
                        {
                            "url": "http://hl7.org/fhir/StructureDefinition/ordinalValue",
                            "valueDecimal": option.score,
                        }
                    ]
                answer["valueCoding"] = option.coding.fhir()
                options.append(answer)
            entry["answerOption"] = options
            items.append(entry)
        out["item"] = items
        return out


# -- compile with load-time checks ---------------------------------------------------------------

_SAMPLE_CONTEXT = MappingContext(
    vendor_id="sample-vendor",
    record_id="sample-record",
    patient_reference="Patient/sample",
    device_full_url="urn:uuid:00000000-0000-5000-8000-000000000000",
    received_at=datetime(2024, 5, 2, tzinfo=UTC),
)


def _check_fhir(resource: dict[str, Any], problems: Problems, what: str) -> None:
    """Full R4 validation and a JSON round trip of one resource a spec produces."""
    try:
        model = fhir_models.validate_resource(resource)
    except (fhir_models.ValidationError, KeyError) as exc:
        problems.add((), f"the {what} this spec produces is not valid FHIR R4: {exc}")
        return
    again = orjson.loads(model.model_dump_json())
    if again != orjson.loads(orjson.dumps(resource)):
        problems.add((), f"the {what} this spec produces changes when it round-trips through the FHIR models")


def compile_spec(spec: Spec, problems: Problems) -> _Mapper | None:
    """A mapper for a parsed spec, or ``None`` with every problem recorded."""
    before = len(problems.items)
    if isinstance(spec, ObservationSpec):
        mapper = ObservationMapper(spec)
        for values in mapper.samples():
            for res in mapper.build(values, _SAMPLE_CONTEXT).resources:
                _check_fhir(res.resource, problems, "Observation")
        return mapper if len(problems.items) == before else None

    # Syntax was checked when the spec was parsed (mappings.spec); compile each expression once here.
    evaluators = {score.role: compile_expression(score.expression) for score in spec.scores}
    qmapper = QuestionnaireMapper(spec, evaluators)
    for i, score in enumerate(spec.scores):
        reference = reference_evaluator(score.expression)
        for answers in qmapper.samples():
            env = qmapper.variables(answers)
            try:
                result = reference({}, env)
            except Exception as exc:  # boundary: whatever fhirpathpy raises is a problem of the spec
                problems.add(("scores", i, "expression"), f"FHIRPath fails on a sample record: {exc}")
                break
            if evaluators[score.role]({}, env) != result:  # the fast path must agree with fhirpathpy
                problems.add(("scores", i, "expression"), "fast evaluation disagrees with fhirpathpy")
                break
            if qmapper.evaluate(score, {}, env) is None:
                problems.add(
                    ("scores", i, "expression"),
                    f"on a sample record the expression gives {result!r}; expected one number between "
                    f"{score.minimum:g} and {score.maximum:g}",
                )
                break
    if len(problems.items) != before:
        return None
    for answers in qmapper.samples():
        built = qmapper.build(datetime(2024, 5, 1, 8, 30, tzinfo=UTC), answers, _SAMPLE_CONTEXT)
        for res in built.resources:
            _check_fhir(res.resource, problems, res.resource_type)
    _check_fhir(qmapper.questionnaire(), problems, "Questionnaire")
    return qmapper if len(problems.items) == before else None
