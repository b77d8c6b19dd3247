"""The mapping spec language: what a measure's YAML file may say, parsed into typed, checked specs.

A spec has a versioned envelope (``kind``, ``version``, ``id``, ``title``, ``description``) and one of
two bodies: ``observation`` (one record becomes one Observation) or ``questionnaire`` (answers become
a QuestionnaireResponse plus score Observations). Parsing here is purely structural and local to one
file (unknown keys, missing keys, wrong types, codes without a system, references between the parts of
the file); checks that need the whole catalogue or a compiled artefact (FHIRPath, FHIR validation,
codes of our CodeSystem) happen in :mod:`mappings.compiler`. Both report through
:class:`~mappings.specfile.Problems`, so one run lists every mistake.

Identity, subject, performer and device are deliberately *not* part of the language: the engine stamps
them from the calling context, so no spec can send data to the wrong patient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mappings.fhirpath import syntax_errors
from mappings.identity import CODE_SYSTEM_URL
from mappings.specfile import LineDict, LineList, Path_, Problems
from mappings.units import UNITS

FORMAT_VERSION = 1
KINDS = ("observation", "questionnaire")
FIELD_TYPES = ("date-time", "date", "integer", "decimal", "quantity")
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_MEASUREMENT = re.compile(r"^[a-z0-9][a-z0-9-]*\.[a-z0-9][a-z0-9-]*$")
_URI = re.compile(r"^[a-z][a-z0-9+.-]*:\S+$")
_CODE = re.compile(r"^[^\s]+( [^\s]+)*$")  # FHIR `code`: no leading/trailing/double whitespace
# FHIRPath names we must not shadow with item or theme variables.
RESERVED_VARIABLES = frozenset({"resource", "context", "ucum", "sct", "loinc", "rootResource", "scores"})


@dataclass(frozen=True)
class Coding:
    system: str
    code: str
    display: str | None = None

    def fhir(self) -> dict[str, Any]:
        out: dict[str, Any] = {"system": self.system, "code": self.code}
        if self.display is not None:
            out["display"] = self.display
        return out


@dataclass(frozen=True)
class Concept:
    """A CodeableConcept: one or more codings and an optional text."""

    codings: tuple[Coding, ...]
    text: str | None = None

    def fhir(self) -> dict[str, Any]:
        out: dict[str, Any] = {"coding": [c.fhir() for c in self.codings]}
        if self.text is not None:
            out["text"] = self.text
        return out


@dataclass(frozen=True)
class Unit:
    code: str
    display: str


@dataclass(frozen=True)
class FieldSpec:
    """One member of a record's ``data`` (observation kind)."""

    name: str
    type: str
    required: bool
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    decimals: int | None = None
    unit: Unit | None = None
    accept_units: tuple[str, ...] = ()


@dataclass(frozen=True)
class ValueSpec:
    """Where an Observation value (or component value) comes from, and its unit when it has one."""

    field: str
    unit: Unit | None = None


@dataclass(frozen=True)
class ComponentSpec:
    code: Concept
    value: ValueSpec


@dataclass(frozen=True)
class MeasurementSpec:
    code: str
    source: str  # a field name (observation kind) or a score/item-observation role (questionnaire)


@dataclass(frozen=True)
class Effective:
    date_time: str | None = None
    start: str | None = None
    end: str | None = None


@dataclass(frozen=True)
class ConceptDef:
    """A code this spec adds to our CodeSystem."""

    code: str
    display: str
    definition: str
    properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ObservationSpec:
    id: str
    title: str
    description: str
    file: str
    concepts: tuple[ConceptDef, ...]
    fields: tuple[FieldSpec, ...]
    require_any: tuple[str, ...]
    category: tuple[Concept, ...]
    code: Concept
    effective: Effective
    value: ValueSpec | None
    components: tuple[ComponentSpec, ...]
    measurements: tuple[MeasurementSpec, ...]
    kind: str = "observation"


@dataclass(frozen=True)
class AnswerOption:
    coding: Coding
    score: float | None


@dataclass(frozen=True)
class Alias:
    """Another code accepted for an answer, recorded as the answer it stands for (``same_as``)."""

    coding: Coding
    same_as: str


@dataclass(frozen=True)
class ItemSpec:
    name: str
    link_id: str
    codings: tuple[Coding, ...]
    text: str
    answers: str
    required: bool
    theme: str | None
    accept_also: tuple[Alias, ...]


@dataclass(frozen=True)
class Band:
    minimum: float
    maximum: float
    coding: Coding
    text: str | None


@dataclass(frozen=True)
class ScoreSpec:
    role: str
    code: Concept
    expression: str
    minimum: float
    maximum: float
    bands: tuple[Band, ...]
    measurement: str | None


@dataclass(frozen=True)
class ItemObservationSpec:
    role: str
    item: str
    code: Concept
    positive: tuple[str, ...]
    measurement: str | None


@dataclass(frozen=True)
class QuestionnaireMeta:
    url: str
    version: str
    name: str
    title: str
    codings: tuple[Coding, ...]
    copyright: str | None
    description: str | None


@dataclass(frozen=True)
class QuestionnaireSpec:
    id: str
    title: str
    description: str
    file: str
    concepts: tuple[ConceptDef, ...]
    questionnaire: QuestionnaireMeta
    category: tuple[Concept, ...]
    answer_lists: dict[str, tuple[AnswerOption, ...]]
    items: tuple[ItemSpec, ...]
    scores: tuple[ScoreSpec, ...]
    item_observations: tuple[ItemObservationSpec, ...]
    kind: str = "questionnaire"


Spec = ObservationSpec | QuestionnaireSpec

_MISSING = object()


class _Reader:
    """Typed access into the YAML tree that records a problem (with its path) instead of raising."""

    def __init__(self, problems: Problems) -> None:
        self.p = problems

    def mapping(
        self,
        node: Any,
        path: Path_,
        *,
        required: tuple[str, ...] = (),
        optional: tuple[str, ...] = (),
        any_keys: bool = False,
    ) -> LineDict | None:
        if not isinstance(node, LineDict):
            self.p.add(path, "expected a mapping (key: value lines)")
            return None
        allowed = set(required) | set(optional)
        for key in () if any_keys else node:
            if key not in allowed:
                self.p.add((*path, key), f"unknown key; allowed here: {', '.join(sorted(allowed))}")
        for key in required:
            if key not in node:
                self.p.add(path, f"missing required key `{key}`")
        return node

    def seq(self, node: Any, path: Path_, *, allow_empty: bool = False) -> LineList | None:
        if not isinstance(node, LineList):
            self.p.add(path, "expected a list")
            return None
        if not node and not allow_empty:
            self.p.add(path, "the list is empty")
            return None
        return node

    def text(self, node: LineDict, key: str, path: Path_, *, default: Any = _MISSING) -> str | None:
        value = node.get(key, default)
        if value is _MISSING or value is None:
            return None if default is _MISSING else default
        if not isinstance(value, str) or not value.strip():
            self.p.add((*path, key), "expected a non-empty text")
            return None
        return value.strip()

    def number(self, node: LineDict, key: str, path: Path_) -> float | None:
        value = node.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.p.add((*path, key), "expected a number")
            return None
        return float(value) if isinstance(value, float) else value

    def boolean(self, node: LineDict, key: str, path: Path_, default: bool) -> bool:
        value = node.get(key, default)
        if not isinstance(value, bool):
            self.p.add((*path, key), "expected true or false")
            return default
        return value

    def matching(
        self, node: LineDict, key: str, path: Path_, pattern: re.Pattern[str], what: str
    ) -> str | None:
        value = self.text(node, key, path)
        if value is not None and not pattern.match(value):
            self.p.add((*path, key), f"`{value}` is not a valid {what}")
            return None
        return value

    def coding(self, node: Any, path: Path_) -> Coding | None:
        m = self.mapping(node, path, required=("system", "code"), optional=("display",))
        if m is None:
            return None
        system = self.text(m, "system", path)
        code = self.text(m, "code", path)
        display = self.text(m, "display", path)
        if system is not None and not _URI.match(system):
            self.p.add((*path, "system"), f"`{system}` is not an absolute URI")
            return None
        if code is not None and not _CODE.match(code):
            self.p.add((*path, "code"), "a code may not contain leading, trailing or repeated spaces")
            return None
        if system is None or code is None:
            return None
        if system == CODE_SYSTEM_URL:
            self.p.own_codes.append((path, code))
        return Coding(system, code, display)

    def codings(self, node: Any, path: Path_) -> tuple[Coding, ...]:
        items = self.seq(node, path)
        if items is None:
            return ()
        found = [self.coding(item, (*path, i)) for i, item in enumerate(items)]
        return tuple(c for c in found if c is not None)

    def concept(self, node: Any, path: Path_) -> Concept | None:
        m = self.mapping(node, path, required=("coding",), optional=("text",))
        if m is None:
            return None
        codings = self.codings(m.get("coding"), (*path, "coding")) if "coding" in m else ()
        text = self.text(m, "text", path)
        return Concept(codings, text) if codings else None

    def concepts(self, node: Any, path: Path_) -> tuple[Concept, ...]:
        items = self.seq(node, path)
        if items is None:
            return ()
        found = [self.concept(item, (*path, i)) for i, item in enumerate(items)]
        return tuple(c for c in found if c is not None)


def parse_spec(root: Any, file: str, problems: Problems) -> Spec | None:
    """Check one file's tree and build its spec; ``None`` (with problems recorded) when it is invalid."""
    r = _Reader(problems)
    if not isinstance(root, LineDict):
        problems.add((), "a mapping spec must be a YAML mapping with `kind`, `version` and `id`")
        return None
    kind = root.get("kind")
    if kind not in KINDS:
        shown = "missing" if kind is None else f"`{kind}`"
        problems.add(("kind",), f"unknown kind {shown}; a spec's kind is one of: {', '.join(KINDS)}")
        return None
    version = root.get("version")
    if version != FORMAT_VERSION:
        problems.add(
            ("version",), f"unsupported spec format version {version!r}; this engine reads version 1"
        )
    before = len(problems.items)
    spec: Spec | None = (
        _observation(r, root, file) if kind == "observation" else _questionnaire(r, root, file)
    )
    return spec if len(problems.items) == before and version == FORMAT_VERSION else None


_ENVELOPE = ("kind", "version", "id", "title", "description")


def _envelope(r: _Reader, root: LineDict) -> tuple[str | None, str | None, str | None]:
    ident = r.matching(root, "id", (), _ID, "measure id (lower-case letters, digits and -)")
    return ident, r.text(root, "title", ()), r.text(root, "description", ())


def _concept_defs(r: _Reader, node: Any, path: Path_) -> tuple[ConceptDef, ...]:
    if node is None:
        return ()
    items = r.seq(node, path)
    out: list[ConceptDef] = []
    for i, item in enumerate(items or ()):
        p = (*path, i)
        m = r.mapping(item, p, required=("code", "display", "definition"), optional=("properties",))
        if m is None:
            continue
        code = r.matching(m, "code", p, re.compile(r"^[a-z0-9][a-z0-9.-]*$"), "code")
        if code:
            r.p.defined_codes.add(code)
        display, definition = r.text(m, "display", p), r.text(m, "definition", p)
        props: list[tuple[str, str]] = []
        if "properties" in m:
            pm = r.mapping(m["properties"], (*p, "properties"), required=(), optional=("theme",))
            if pm is not None and "theme" in pm:
                theme = r.text(pm, "theme", (*p, "properties"))
                if theme:
                    props.append(("theme", theme))
        if code and display and definition:
            out.append(ConceptDef(code, display, definition, tuple(props)))
    return tuple(out)


# -- observation ---------------------------------------------------------------------------------


def _field(r: _Reader, name: str, node: Any, path: Path_) -> FieldSpec | None:
    m = r.mapping(
        node,
        path,
        required=("type", "doc"),
        optional=("required", "min", "max", "decimals", "unit", "accept_units"),
    )
    if m is None:
        return None
    ftype = m.get("type")
    if ftype not in FIELD_TYPES:
        r.p.add((*path, "type"), f"unknown field type {ftype!r}; one of: {', '.join(FIELD_TYPES)}")
        return None
    doc = r.text(m, "doc", path) or ""
    required = r.boolean(m, "required", path, True)
    numeric = ftype in ("integer", "decimal", "quantity")
    for key in ("min", "max", "decimals"):
        if key in m and not numeric:
            r.p.add((*path, key), f"`{key}` applies only to integer, decimal and quantity fields")
    for key in ("unit", "accept_units"):
        if key in m and ftype != "quantity":
            r.p.add((*path, key), f"`{key}` applies only to quantity fields")
    minimum, maximum = r.number(m, "min", path), r.number(m, "max", path)
    if minimum is not None and maximum is not None and minimum > maximum:
        r.p.add((*path, "min"), "min is greater than max")
    if numeric and (minimum is None or maximum is None):
        r.p.add(path, "numeric fields need both `min` and `max` (a plausible range protects the chart)")
    decimals = m.get("decimals")
    if decimals is not None and (isinstance(decimals, bool) or not isinstance(decimals, int) or decimals < 0):
        r.p.add((*path, "decimals"), "expected a whole number of decimal places (0 or more)")
        decimals = None
    if ftype == "decimal" and decimals is None:
        r.p.add(path, "decimal fields need `decimals` (how many decimal places to keep)")
    unit: Unit | None = None
    accept: tuple[str, ...] = ()
    if ftype == "quantity":
        if decimals is None:
            r.p.add(path, "quantity fields need `decimals` (how many decimal places to keep)")
        unit = _unit(r, m.get("unit"), (*path, "unit"))
        raw_accept = m.get("accept_units")
        listed: list[str] = []
        if raw_accept is not None:
            listed = [str(u) for u in (r.seq(raw_accept, (*path, "accept_units")) or ())]
        if unit is not None:
            dimension = UNITS[unit.code].dimension
            for i, code in enumerate(listed):
                known = UNITS.get(code)
                if known is None:
                    r.p.add((*path, "accept_units", i), f"unknown UCUM unit `{code}`")
                elif known.dimension != dimension:
                    r.p.add(
                        (*path, "accept_units", i),
                        f"`{code}` ({known.dimension}) cannot be converted to `{unit.code}` ({dimension})",
                    )
            accept = tuple(dict.fromkeys((unit.code, *listed)))
    if ftype == "quantity" and unit is None:
        return None
    return FieldSpec(
        name=name,
        type=ftype,
        required=required,
        doc=doc,
        minimum=minimum,
        maximum=maximum,
        decimals=decimals if isinstance(decimals, int) else None,
        unit=unit,
        accept_units=accept,
    )


def _unit(r: _Reader, node: Any, path: Path_) -> Unit | None:
    m = r.mapping(node, path, required=("code", "display"))
    if m is None:
        return None
    code, display = r.text(m, "code", path), r.text(m, "display", path)
    if code is not None and code not in UNITS:
        r.p.add((*path, "code"), f"unknown UCUM unit `{code}`; known: {', '.join(sorted(UNITS))}")
        return None
    return Unit(code, display) if code and display else None


def _value(r: _Reader, node: Any, path: Path_, fields: dict[str, FieldSpec]) -> ValueSpec | None:
    m = r.mapping(node, path, required=("field",), optional=("unit",))
    if m is None:
        return None
    name = r.text(m, "field", path)
    field = fields.get(name or "")
    if name is not None and field is None:
        r.p.add((*path, "field"), f"no field named `{name}` in `fields`")
        return None
    if field is None:
        return None
    unit = _unit(r, m["unit"], (*path, "unit")) if "unit" in m else None
    if field.type in ("date-time", "date"):
        r.p.add((*path, "field"), f"`{name}` is a {field.type}; a value must be a number")
        return None
    if field.type == "quantity" and "unit" in m:
        r.p.add((*path, "unit"), f"`{name}` is a quantity and already has its unit")
    if field.type == "decimal" and unit is None:
        r.p.add(
            path, f"`{name}` is a decimal: give the value a `unit` (US Core: quantities carry UCUM units)"
        )
    return ValueSpec(field.name, unit)


def _observation(r: _Reader, root: LineDict, file: str) -> ObservationSpec | None:
    r.mapping(
        root,
        (),
        required=(*_ENVELOPE, "fields", "observation"),
        optional=("concepts", "require_any", "measurements"),
    )
    ident, title, description = _envelope(r, root)
    concepts = _concept_defs(r, root.get("concepts"), ("concepts",))
    fields: dict[str, FieldSpec] = {}
    raw_fields = r.mapping(root.get("fields"), ("fields",), any_keys=True) if "fields" in root else None
    for name, node in (raw_fields or {}).items():
        if not _NAME.match(name):
            r.p.add(("fields", name), "field names are lower_snake_case")
            continue
        spec = _field(r, name, node, ("fields", name))
        if spec is not None:
            fields[name] = spec
    require_any: tuple[str, ...] = ()
    if "require_any" in root:
        seq = r.seq(root["require_any"], ("require_any",)) or ()
        for i, name in enumerate(seq):
            if name not in fields:
                r.p.add(("require_any", i), f"no field named `{name}` in `fields`")
            elif fields[name].required:
                r.p.add(("require_any", i), f"`{name}` is already required")
        require_any = tuple(str(n) for n in seq)

    path: Path_ = ("observation",)
    obs = r.mapping(
        root.get("observation"),
        path,
        required=("category", "code", "effective"),
        optional=("value", "components"),
    )
    if obs is None:
        return None
    category = r.concepts(obs.get("category"), (*path, "category"))
    code = r.concept(obs.get("code"), (*path, "code"))
    effective = _effective(r, obs.get("effective"), (*path, "effective"), fields)
    value = _value(r, obs["value"], (*path, "value"), fields) if "value" in obs else None
    components: list[ComponentSpec] = []
    if "components" in obs:
        for i, item in enumerate(r.seq(obs["components"], (*path, "components")) or ()):
            cp = (*path, "components", i)
            cm = r.mapping(item, cp, required=("code", "value"))
            if cm is None:
                continue
            ccode = r.concept(cm.get("code"), (*cp, "code"))
            cvalue = _value(r, cm.get("value"), (*cp, "value"), fields)
            if ccode and cvalue:
                components.append(ComponentSpec(ccode, cvalue))
    if value is None and not components:
        r.p.add(path, "an observation needs a `value` or `components`")
    elif value is not None and not fields[value.field].required:
        r.p.add((*path, "value", "field"), "the Observation value must come from a required field")
    elif value is None and not require_any and not any(fields[c.value.field].required for c in components):
        r.p.add(path, "all components are optional: add `require_any` so an Observation is never empty")

    measurements: list[MeasurementSpec] = []
    if "measurements" in root:
        for i, item in enumerate(r.seq(root["measurements"], ("measurements",)) or ()):
            mp: Path_ = ("measurements", i)
            mm = r.mapping(item, mp, required=("code", "field"))
            if mm is None:
                continue
            mcode = r.matching(mm, "code", mp, _MEASUREMENT, "measurement code (`measure.quantity`)")
            source = r.text(mm, "field", mp)
            if source is not None and source not in fields:
                r.p.add((*mp, "field"), f"no field named `{source}` in `fields`")
            elif source is not None and fields[source].type in ("date-time", "date"):
                r.p.add((*mp, "field"), f"`{source}` is a {fields[source].type}, not a number")
            elif mcode and source:
                measurements.append(MeasurementSpec(mcode, source))
    if not (ident and title and description and code and effective):
        return None
    return ObservationSpec(
        id=ident,
        title=title,
        description=description,
        file=file,
        concepts=concepts,
        fields=tuple(fields.values()),
        require_any=require_any,
        category=category,
        code=code,
        effective=effective,
        value=value,
        components=tuple(components),
        measurements=tuple(measurements),
    )


def _effective(r: _Reader, node: Any, path: Path_, fields: dict[str, FieldSpec]) -> Effective | None:
    m = r.mapping(node, path, required=(), optional=("date_time", "start", "end"))
    if m is None:
        return None
    keys = set(m)
    if keys not in ({"date_time"}, {"start", "end"}):
        r.p.add(path, "give either `date_time: FIELD` or both `start: FIELD` and `end: FIELD`")
        return None
    found: dict[str, str] = {}
    for key in sorted(keys):
        name = r.text(m, key, path)
        field = fields.get(name or "")
        if field is None:
            r.p.add((*path, key), f"no field named `{name}` in `fields`")
            continue
        allowed = ("date-time", "date") if key == "date_time" else ("date-time",)
        if field.type not in allowed:
            r.p.add((*path, key), f"`{name}` is a {field.type}; expected {' or '.join(allowed)}")
            continue
        if not field.required:
            r.p.add((*path, key), f"`{name}` must be required: every Observation needs its time")
            continue
        found[key] = field.name
    if len(found) != len(keys):
        return None
    return Effective(date_time=found.get("date_time"), start=found.get("start"), end=found.get("end"))


# -- questionnaire -------------------------------------------------------------------------------


def _questionnaire(r: _Reader, root: LineDict, file: str) -> QuestionnaireSpec | None:
    r.mapping(
        root,
        (),
        required=(*_ENVELOPE, "questionnaire", "category", "answer_lists", "items", "scores"),
        optional=("concepts", "item_observations"),
    )
    ident, title, description = _envelope(r, root)
    concepts = _concept_defs(r, root.get("concepts"), ("concepts",))
    meta = _questionnaire_meta(r, root.get("questionnaire"), ("questionnaire",))
    category = r.concepts(root.get("category"), ("category",))

    lists: dict[str, tuple[AnswerOption, ...]] = {}
    raw_lists: dict[str, Any] = r.mapping(root.get("answer_lists"), ("answer_lists",), any_keys=True) or {}
    for name, node in raw_lists.items():
        lp: Path_ = ("answer_lists", name)
        options: list[AnswerOption] = []
        for i, item in enumerate(r.seq(node, lp) or ()):
            om = r.mapping(item, (*lp, i), required=("system", "code"), optional=("display", "score"))
            if om is None:
                continue
            option_score = r.number(om, "score", (*lp, i))
            coding = r.coding(_without(om, "score"), (*lp, i))
            if coding is not None:
                options.append(AnswerOption(coding, option_score))
        codes = [o.coding.code for o in options]
        for dup in sorted({c for c in codes if codes.count(c) > 1}):
            r.p.add(lp, f"answer code `{dup}` appears twice")
        option_scores = [o.score for o in options if o.score is not None]
        if option_scores and len(option_scores) != len(options):
            r.p.add(lp, "either every answer of a list has a `score` or none has")
        if len(set(option_scores)) != len(option_scores):
            r.p.add(lp, "two answers have the same score, so a score cannot name one answer")
        lists[name] = tuple(options)

    items: list[ItemSpec] = []
    for i, node in enumerate(r.seq(root.get("items"), ("items",)) or ()):
        item = _item(r, node, ("items", i), lists)
        if item is not None:
            items.append(item)
    for attr, what in (("name", "name"), ("link_id", "linkId")):
        seen: set[str] = set()
        for index, value in enumerate(getattr(it, attr) for it in items):
            if value in seen:
                r.p.add(("items", index), f"two items have the {what} `{value}`")
            seen.add(value)
    by_name = {it.name: it for it in items}
    themes = {it.theme for it in items if it.theme}
    for theme in sorted(themes & (set(by_name) | RESERVED_VARIABLES)):
        r.p.add(("items",), f"theme `{theme}` clashes with an item name or a reserved FHIRPath variable")

    scores: list[ScoreSpec] = []
    for i, node in enumerate(r.seq(root.get("scores"), ("scores",)) or ()):
        score = _score(r, node, ("scores", i))
        if score is not None:
            scores.append(score)
    item_obs: list[ItemObservationSpec] = []
    if "item_observations" in root:
        for i, node in enumerate(r.seq(root["item_observations"], ("item_observations",)) or ()):
            io = _item_observation(r, node, ("item_observations", i), by_name, lists)
            if io is not None:
                item_obs.append(io)
    seen_roles: set[str] = set()
    for where, role in [(("scores", i), s.role) for i, s in enumerate(scores)] + [
        (("item_observations", i), o.role) for i, o in enumerate(item_obs)
    ]:
        if role == "main":
            r.p.add((*where, "role"), "`main` is the role of the QuestionnaireResponse; choose another")
        elif role in seen_roles:
            r.p.add((*where, "role"), f"role `{role}` is used twice")
        seen_roles.add(role)
    if not (ident and title and description and meta):
        return None
    return QuestionnaireSpec(
        id=ident,
        title=title,
        description=description,
        file=file,
        concepts=concepts,
        questionnaire=meta,
        category=category,
        answer_lists=lists,
        items=tuple(items),
        scores=tuple(scores),
        item_observations=tuple(item_obs),
    )


def _without(node: LineDict, key: str) -> LineDict:
    """The same mapping (and lines) without ``key``: lets an answer option be read as a coding."""
    out = LineDict((k, v) for k, v in node.items() if k != key)
    out.line, out.key_lines = node.line, node.key_lines
    return out


def _questionnaire_meta(r: _Reader, node: Any, path: Path_) -> QuestionnaireMeta | None:
    m = r.mapping(
        node,
        path,
        required=("url", "version", "name", "title", "code"),
        optional=("copyright", "description"),
    )
    if m is None:
        return None
    url = r.text(m, "url", path)
    if url is not None and not _URI.match(url):
        r.p.add((*path, "url"), "expected an absolute URL")
    version = m.get("version")
    if not isinstance(version, str):
        r.p.add((*path, "version"), 'expected a version text in quotes, e.g. "1.0.0"')
    name = r.matching(m, "name", path, re.compile(r"^[A-Z]([A-Za-z0-9_]){0,254}$"), "computable name")
    title = r.text(m, "title", path)
    codings = r.codings(m.get("code"), (*path, "code"))
    if not (url and isinstance(version, str) and name and title and codings):
        return None
    return QuestionnaireMeta(
        url=url,
        version=version,
        name=name,
        title=title,
        codings=codings,
        copyright=r.text(m, "copyright", path),
        description=r.text(m, "description", path),
    )


def _item(r: _Reader, node: Any, path: Path_, lists: dict[str, tuple[AnswerOption, ...]]) -> ItemSpec | None:
    m = r.mapping(
        node,
        path,
        required=("name", "linkId", "text", "answers"),
        optional=("code", "required", "theme", "accept_also"),
    )
    if m is None:
        return None
    name = r.matching(m, "name", path, _NAME, "item name (lower_snake_case)")
    if name in RESERVED_VARIABLES:
        r.p.add((*path, "name"), f"`{name}` is reserved in FHIRPath expressions")
        name = None
    link_id = r.text(m, "linkId", path)
    text = r.text(m, "text", path)
    codings = r.codings(m["code"], (*path, "code")) if "code" in m else ()
    answers = r.text(m, "answers", path)
    if answers is not None and answers not in lists:
        r.p.add((*path, "answers"), f"no answer list named `{answers}` in `answer_lists`")
        answers = None
    theme = r.matching(m, "theme", path, _NAME, "theme name") if "theme" in m else None
    aliases: list[Alias] = []
    if "accept_also" in m:
        for i, a in enumerate(r.seq(m["accept_also"], (*path, "accept_also")) or ()):
            ap = (*path, "accept_also", i)
            am = r.mapping(a, ap, required=("system", "code", "same_as"), optional=("display",))
            if am is None:
                continue
            same_as = r.text(am, "same_as", ap)
            coding = r.coding(_without(am, "same_as"), ap)
            known = {o.coding.code for o in lists.get(answers or "", ())}
            if same_as is not None and answers is not None and same_as not in known:
                r.p.add((*ap, "same_as"), f"answer code `{same_as}` is not in the answer list `{answers}`")
            elif coding is not None and coding.code in known:
                r.p.add((*ap, "code"), f"`{coding.code}` is already in the answer list `{answers}`")
            elif coding is not None and same_as is not None:
                aliases.append(Alias(coding, same_as))
    if not (name and link_id and text and answers):
        return None
    return ItemSpec(
        name=name,
        link_id=link_id,
        codings=codings,
        text=text,
        answers=answers,
        required=r.boolean(m, "required", path, True),
        theme=theme,
        accept_also=tuple(aliases),
    )


def _score(r: _Reader, node: Any, path: Path_) -> ScoreSpec | None:
    m = r.mapping(
        node,
        path,
        required=("role", "code", "expression", "min", "max"),
        optional=("bands", "measurement"),
    )
    if m is None:
        return None
    role = r.matching(m, "role", path, _ID, "role (lower-case letters, digits and -)")
    code = r.concept(m.get("code"), (*path, "code"))
    expression = r.text(m, "expression", path)
    if expression is not None:
        errors = syntax_errors(expression)
        if errors:
            r.p.add((*path, "expression"), "FHIRPath does not parse: " + "; ".join(errors))
            expression = None
    minimum, maximum = r.number(m, "min", path), r.number(m, "max", path)
    bands: list[Band] = []
    if "bands" in m:
        for i, b in enumerate(r.seq(m["bands"], (*path, "bands")) or ()):
            bp = (*path, "bands", i)
            bm = r.mapping(b, bp, required=("min", "max", "coding"), optional=("text",))
            if bm is None:
                continue
            bmin, bmax = r.number(bm, "min", bp), r.number(bm, "max", bp)
            coding = r.coding(bm.get("coding"), (*bp, "coding"))
            if bmin is not None and bmax is not None and coding is not None:
                bands.append(Band(bmin, bmax, coding, r.text(bm, "text", bp)))
        if minimum is not None and maximum is not None and bands:
            expected = minimum
            for i, band in enumerate(bands):
                if band.minimum != expected or band.maximum < band.minimum:
                    r.p.add(
                        (*path, "bands", i),
                        f"bands must cover {minimum:g}-{maximum:g} in order without gaps or overlaps; "
                        f"this band should start at {expected:g}",
                    )
                    break
                expected = band.maximum + 1
            else:
                if bands[-1].maximum != maximum:
                    r.p.add((*path, "bands"), f"the last band must end at max ({maximum:g})")
    measurement = (
        r.matching(m, "measurement", path, _MEASUREMENT, "measurement code (`measure.quantity`)")
        if "measurement" in m
        else None
    )
    if not (role and code and expression) or minimum is None or maximum is None:
        return None
    return ScoreSpec(role, code, expression, minimum, maximum, tuple(bands), measurement)


def _item_observation(
    r: _Reader,
    node: Any,
    path: Path_,
    items: dict[str, ItemSpec],
    lists: dict[str, tuple[AnswerOption, ...]],
) -> ItemObservationSpec | None:
    m = r.mapping(node, path, required=("role", "item", "code"), optional=("positive", "measurement"))
    if m is None:
        return None
    role = r.matching(m, "role", path, _ID, "role (lower-case letters, digits and -)")
    item_name = r.text(m, "item", path)
    item = items.get(item_name or "")
    if item_name is not None and item is None:
        r.p.add((*path, "item"), f"no item named `{item_name}`")
    code = r.concept(m.get("code"), (*path, "code"))
    positive: list[str] = []
    if "positive" in m:
        for i, value in enumerate(r.seq(m["positive"], (*path, "positive")) or ()):
            known = {o.coding.code for o in lists.get(item.answers, ())} if item else set()
            if item is not None and value not in known:
                r.p.add(
                    (*path, "positive", i),
                    f"answer code `{value}` is not in the answer list `{item.answers}`",
                )
            else:
                positive.append(str(value))
    measurement = (
        r.matching(m, "measurement", path, _MEASUREMENT, "measurement code (`measure.quantity`)")
        if "measurement" in m
        else None
    )
    if measurement and item is not None and any(o.score is None for o in lists.get(item.answers, ())):
        r.p.add((*path, "measurement"), f"the answers of `{item.name}` have no scores to measure")
    if not (role and item and code):
        return None
    return ItemObservationSpec(role, item.name, code, tuple(positive), measurement)
