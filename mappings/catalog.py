"""The catalogue: every measure spec in a folder, checked together and compiled once.

:func:`load_catalog` is what the service calls at start-up. It reads every ``*.yaml`` file, collects
every problem of every file (and of the catalogue as a whole: duplicate codes, codes of our CodeSystem
that no spec defines, a licensed-text file that names unknown items) and raises one
:class:`~mappings.specfile.MappingSpecError` listing them all with file and line. A catalogue that
loads maps every record it is given to valid FHIR, or to rejections; it never fails later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from mappings import fhir_models
from mappings.compiler import QuestionnaireMapper, _Mapper, compile_spec
from mappings.identity import CODE_SYSTEM_URL
from mappings.model import MappingContext, MapResult, Rejection
from mappings.records import RECORD_CONTEXT
from mappings.spec import ConceptDef, ItemSpec, QuestionnaireSpec, Spec, parse_spec
from mappings.specfile import LineDict, MappingSpecError, Problems, SpecProblem, load_yaml

DEFAULT_FOLDER = Path(__file__).resolve().parent / "catalog"
DEFAULT_FUTURE_TOLERANCE = timedelta(minutes=5)
CODE_SYSTEM_VERSION = "1.0.0"


class Catalog:
    """The loaded, compiled catalogue. Thread-safe: nothing in it changes after :func:`load_catalog`."""

    def __init__(
        self, mappers: dict[str, _Mapper], code_system: dict[str, Any], *, future_tolerance: timedelta
    ) -> None:
        self._mappers = mappers
        self._code_system = orjson.dumps(code_system)
        self._questionnaires = {
            measure: orjson.dumps(m.questionnaire())
            for measure, m in mappers.items()
            if isinstance(m, QuestionnaireMapper)
        }
        self.future_tolerance = future_tolerance

    def measures(self) -> tuple[str, ...]:
        """Measure ids, in file-name order."""
        return tuple(self._mappers)

    def __contains__(self, measure: object) -> bool:
        return measure in self._mappers

    def spec(self, measure: str) -> Spec:
        """The parsed spec of a measure (``KeyError`` if there is none): fields, codes, items."""
        return self._mappers[measure].spec

    def map(self, measure: str, data: Any, context: MappingContext) -> MapResult:
        """Validate and map one record's ``data``. Never raises for bad data: it returns rejections."""
        with self.batch(context.received_at) as map_one:
            return map_one(measure, data, context)

    @contextmanager
    def batch(self, received_at: datetime) -> Iterator[Callable[[Any, Any, MappingContext], MapResult]]:
        """:meth:`map` for many records received at one moment (a push): yields the per-record function.

        Why: the per-record context that tells the field checks what "in the future" means is the
        same for a whole batch, and entering it per record was a visible share of mapping. Every
        record mapped inside must carry this ``received_at`` in its context (checked).
        """
        if received_at.tzinfo is None:
            raise ValueError("MappingContext.received_at must be timezone-aware")
        mappers = self._mappers

        def map_one(measure: Any, data: Any, context: MappingContext) -> MapResult:
            if context.received_at is not received_at and context.received_at != received_at:
                raise ValueError("every record of a batch must be received at the batch's moment")
            mapper = mappers.get(measure) if isinstance(measure, str) else None
            if mapper is None:
                known = ", ".join(mappers)
                return MapResult(
                    rejections=(
                        Rejection("unknown-measure", "measure", f"Unknown measure; known measures: {known}."),
                    )
                )
            if not isinstance(data, dict):
                return MapResult(
                    rejections=(Rejection("wrong-type", "data", "The record's data must be a JSON object."),)
                )
            return mapper.map(data, context)

        with RECORD_CONTEXT({"latest": received_at + self.future_tolerance}):
            yield map_one

    def questionnaires(self) -> list[dict[str, Any]]:
        """The FHIR Questionnaires of the questionnaire measures (fresh copies; callers may change them)."""
        return [orjson.loads(q) for q in self._questionnaires.values()]

    def questionnaire(self, measure: str) -> dict[str, Any] | None:
        raw = self._questionnaires.get(measure)
        return None if raw is None else orjson.loads(raw)

    def code_system(self) -> dict[str, Any]:
        """Our CodeSystem (every code the catalogue uses under :data:`~mappings.identity.CODE_SYSTEM_URL`)."""
        return orjson.loads(self._code_system)  # type: ignore[no-any-return]


def load_catalog(
    folder: str | Path | None = None,
    *,
    item_text_file: str | Path | None = None,
    future_tolerance: timedelta = DEFAULT_FUTURE_TOLERANCE,
) -> Catalog:
    """Load, check and compile every spec; raise :class:`MappingSpecError` listing every problem.

    :param folder: the specs (default: the catalogue shipped in the package).
    :param item_text_file: licensed item text for instruments we ship with neutral labels (D-WAI);
        see ``mappings/README.md`` for its format.
    :param future_tolerance: how far past ``received_at`` a timestamp may lie (phone clocks drift).
    """
    root = Path(folder) if folder is not None else DEFAULT_FOLDER
    files = sorted(root.glob("*.yaml"))
    if not files:
        raise MappingSpecError([SpecProblem(str(root), 1, "no mapping specs (*.yaml) in this folder")])
    all_problems: list[Problems] = []
    specs: list[tuple[Spec, Problems]] = []
    for path in files:
        problems = Problems(str(path))
        all_problems.append(problems)
        tree = load_yaml(path, problems)
        if tree is None:
            continue
        spec = parse_spec(tree, str(path), problems)
        if spec is not None and spec.id != path.stem:
            problems.add(("id",), f"the id `{spec.id}` must match the file name ({path.stem}.yaml)")
        elif spec is not None:
            specs.append((spec, problems))

    _check_catalogue(all_problems, [s for s, _ in specs])
    if item_text_file is not None:
        override_problems = Problems(str(item_text_file))
        all_problems.append(override_problems)
        specs = _apply_item_text(specs, Path(item_text_file), override_problems)

    mappers: dict[str, _Mapper] = {}
    for spec, problems in specs:
        if not problems:  # FHIR checks of the output only make sense for a structurally sound spec
            mapper = compile_spec(spec, problems)
            if mapper is not None:
                mappers[spec.id] = mapper
    code_system = _code_system([c for s, _ in specs for c in s.concepts])
    if not any(all_problems):
        try:
            fhir_models.validate_resource(code_system)
        except (fhir_models.ValidationError, KeyError) as exc:
            all_problems[0].add_at(
                1, f"the CodeSystem built from the specs' concepts is not valid FHIR: {exc}"
            )
    found = [p for problems in all_problems for p in problems]
    if found:
        raise MappingSpecError(found)
    return Catalog(mappers, code_system, future_tolerance=future_tolerance)


def _check_catalogue(all_problems: list[Problems], specs: Sequence[Spec]) -> None:
    defined: dict[str, str] = {}
    for problems in all_problems:
        for code in sorted(problems.defined_codes):
            if code in defined:
                problems.add(("concepts",), f"concept `{code}` is already defined in {defined[code]}")
            defined[code] = problems.file
    for problems in all_problems:
        for path, code in problems.own_codes:
            if code not in defined:
                problems.add(
                    (*path, "code"),
                    f"`{code}` is not a code of {CODE_SYSTEM_URL}; define it under `concepts` in a spec",
                )
    seen_measurements: dict[str, str] = {}
    seen_urls: dict[str, str] = {}
    by_file = {p.file: p for p in all_problems}
    for spec in specs:
        problems = by_file[spec.file]
        codes: list[str] = []
        if isinstance(spec, QuestionnaireSpec):
            codes = [s.measurement for s in spec.scores if s.measurement]
            codes += [o.measurement for o in spec.item_observations if o.measurement]
            url = spec.questionnaire.url
            if url in seen_urls:
                problems.add(
                    ("questionnaire", "url"), f"the Questionnaire url is also used by {seen_urls[url]}"
                )
            seen_urls[url] = spec.file
        else:
            codes = [m.code for m in spec.measurements]
        for code in codes:
            if code in seen_measurements:
                problems.add((), f"measurement code `{code}` is also produced by {seen_measurements[code]}")
            seen_measurements[code] = spec.file


def _code_system(concepts: list[ConceptDef]) -> dict[str, Any]:
    entries = []
    for c in concepts:
        entry: dict[str, Any] = {"code": c.code, "display": c.display, "definition": c.definition}
        if c.properties:
            entry["property"] = [{"code": k, "valueCode": v} for k, v in c.properties]
        entries.append(entry)
    return {
        "resourceType": "CodeSystem",
        "url": CODE_SYSTEM_URL,
        "version": CODE_SYSTEM_VERSION,
        "name": "FhirBridge",
        "title": "fhir-bridge codes for app-collected mental-health data",
        "status": "active",
        "experimental": False,
        "publisher": "fhir-bridge",
        "description": (
            "Codes for what mental-health apps collect and LOINC has no code for: app engagement, the "
            "Digital Working Alliance Inventory (D-WAI), a mood check-in rating, GAD-2 total and the "
            "severity bands the bridge records as Observation.interpretation."
        ),
        "caseSensitive": True,
        "content": "complete",
        "count": len(entries),
        "property": [
            {
                "code": "theme",
                "description": "The working-alliance theme (bond, task or goal) an alliance item probes.",
                "type": "code",
            }
        ],
        "concept": entries,
    }


def _apply_item_text(
    specs: list[tuple[Spec, Problems]], path: Path, problems: Problems
) -> list[tuple[Spec, Problems]]:
    """Replace item text, answer displays and copyright from a deployment's licensed-text file.

    Format (YAML)::

        dwai:                       # measure id
          copyright: "..."          # optional: the licence notice to publish in the Questionnaire
          items:
            item1: "..."            # item name -> licensed text
          answers:
            dwai-agreement:         # answer list -> code -> display
              dwai-agreement-1: "..."
    """
    tree = load_yaml(path, problems)
    if tree is None:
        return specs
    if not isinstance(tree, LineDict):
        problems.add((), "expected a mapping of measure id to its texts")
        return specs
    by_id = {spec.id: spec for spec, _ in specs}
    replaced: dict[str, Spec] = {}
    for measure, node in tree.items():
        spec = by_id.get(measure)
        if not isinstance(spec, QuestionnaireSpec):
            problems.add((measure,), "no questionnaire measure with this id in the catalogue")
            continue
        if not isinstance(node, LineDict) or set(node) - {"copyright", "items", "answers"}:
            problems.add((measure,), "expected a mapping with `copyright`, `items` and/or `answers`")
            continue
        items = {i.name: i for i in spec.items}
        new_items: dict[str, ItemSpec] = {}
        for name, text in _text_map(node.get("items"), (measure, "items"), problems).items():
            if name not in items:
                problems.add((measure, "items", name), f"no item named `{name}` in {measure}")
            else:
                new_items[name] = dataclasses.replace(items[name], text=text)
        lists = dict(spec.answer_lists)
        answers_node = node.get("answers")
        if answers_node is not None and not isinstance(answers_node, LineDict):
            problems.add((measure, "answers"), "expected a mapping of answer list to code -> display")
            answers_node = None
        for list_name, codes in (answers_node or {}).items():
            if list_name not in lists:
                problems.add((measure, "answers", list_name), f"no answer list `{list_name}` in {measure}")
                continue
            displays = _text_map(codes, (measure, "answers", list_name), problems)
            known = {o.coding.code for o in lists[list_name]}
            for code in sorted(set(displays) - known):
                problems.add((measure, "answers", list_name, code), f"`{code}` is not in the answer list")
            lists[list_name] = tuple(
                dataclasses.replace(o, coding=dataclasses.replace(o.coding, display=displays[o.coding.code]))
                if o.coding.code in displays
                else o
                for o in lists[list_name]
            )
        meta = spec.questionnaire
        if "copyright" in node:
            text = node["copyright"]
            if isinstance(text, str) and text.strip():
                meta = dataclasses.replace(meta, copyright=text.strip())
            else:
                problems.add((measure, "copyright"), "expected a non-empty text")
        replaced[measure] = dataclasses.replace(
            spec,
            questionnaire=meta,
            answer_lists=lists,
            items=tuple(new_items.get(i.name, i) for i in spec.items),
        )
    return [(replaced.get(spec.id, spec), p) for spec, p in specs]


def _text_map(node: Any, path: tuple[str, ...], problems: Problems) -> dict[str, str]:
    if node is None:
        return {}
    if not isinstance(node, LineDict):
        problems.add(path, "expected a mapping of name to text")
        return {}
    out: dict[str, str] = {}
    for key, value in node.items():
        if isinstance(value, str) and value.strip():
            out[key] = value.strip()
        else:
            problems.add((*path, key), "expected a non-empty text")
    return out
