"""Loading specs: every mistake is reported at once, with file and line; the shipped catalogue is sound."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from mappings import MappingSpecError, load_catalog
from mappings.catalog import DEFAULT_FOLDER
from mappings.fhir_models import validate_resource


def _line(text: str, marker: str) -> int:
    """1-based line of the first line containing ``marker``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if marker in line:
            return number
    raise AssertionError(marker)


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def _problems(folder: Path, *, item_text_file: Path | None = None) -> list[tuple[str, int, str]]:
    with pytest.raises(MappingSpecError) as info:
        load_catalog(folder, item_text_file=item_text_file)
    return [(Path(p.file).name, p.line, p.message) for p in info.value.problems]


def test_three_different_mistakes_are_all_reported_with_file_and_line(tmp_path: Path) -> None:
    text = (DEFAULT_FOLDER / "phq2.yaml").read_text()
    text = text.replace("  name: PHQ2\n", "  name: PHQ2\n  colour: blue\n")  # unknown key
    text = text.replace(
        "code: [{system: http://loinc.org, code: 44255-8,", "code: [{code: 44255-8,"
    )  # code without system
    text = text.replace(
        'expression: "%scores.sum()"', 'expression: "%scores.sum("'
    )  # FHIRPath that does not parse
    _write(tmp_path, "phq2.yaml", text)

    problems = _problems(tmp_path)

    assert len(problems) == 3, problems
    assert {file for file, _, _ in problems} == {"phq2.yaml"}
    by_line = {line: message for _, line, message in problems}
    assert "unknown key" in by_line[_line(text, "colour: blue")]
    assert "missing required key `system`" in by_line[_line(text, "{code: 44255-8,")]
    assert "FHIRPath does not parse" in by_line[_line(text, '"%scores.sum("')]


def test_the_error_message_lists_every_problem_as_file_line_message(tmp_path: Path) -> None:
    text = (DEFAULT_FOLDER / "mood.yaml").read_text().replace("kind: observation", "kind: obsrvation")
    path = _write(tmp_path, "mood.yaml", text)
    with pytest.raises(MappingSpecError) as info:
        load_catalog(tmp_path)
    assert f"{path}:{_line(text, 'kind: obsrvation')}: kind: unknown kind `obsrvation`" in str(info.value)


def test_problems_in_several_files_are_reported_together(tmp_path: Path) -> None:
    gad7 = (DEFAULT_FOLDER / "gad7.yaml").read_text().replace("same_as: LA6570-1", "same_as: LA9999-9")
    hrv = (DEFAULT_FOLDER / "hrv.yaml").read_text().replace("accept_units: [s]", "accept_units: [s, /min]")
    steps = (
        (DEFAULT_FOLDER / "steps-daily.yaml")
        .read_text()
        .replace("  steps: {type: integer", "  steps: {type: integr")
    )
    _write(tmp_path, "gad7.yaml", gad7)
    _write(tmp_path, "hrv.yaml", hrv)
    _write(tmp_path, "steps-daily.yaml", steps)

    problems = _problems(tmp_path)

    assert ("gad7.yaml", _line(gad7, "LA9999-9")) in {(f, line) for f, line, _ in problems}
    assert any("not in the answer list" in m for f, _, m in problems if f == "gad7.yaml")
    assert any(f == "hrv.yaml" and "cannot be converted" in m for f, _, m in problems)
    assert any(f == "steps-daily.yaml" and "unknown field type 'integr'" in m for f, _, m in problems)


@pytest.mark.parametrize(
    ("spec", "old", "new", "marker", "message"),
    [
        ("mood.yaml", "version: 1", "version: 2", "version: 2", "unsupported spec format version"),
        ("mood.yaml", "id: mood", "id: Mood!", "id: Mood!", "not a valid measure id"),
        ("mood.yaml", "id: mood", "id: moods", "id: moods", "must match the file name"),
        ("mood.yaml", "max: 10,", "max: -1,", "max: -1", "min is greater than max"),
        (
            "sleep-duration.yaml",
            "system: http://loinc",
            "system: loinc",
            "system: loinc",
            "not an absolute URI",
        ),
        (
            "mood.yaml",
            "code: mood-rating, display",
            "code: mood-ratings, display",
            "mood-ratings",
            "is not a code of",
        ),
        (
            "sleep-duration.yaml",
            "{start: start, end: end}",
            "{start: start}",
            "{start: start}",
            "both `start",
        ),
        (
            "sleep-duration.yaml",
            "value: {field: duration}",
            "value: {field: length}",
            "length",
            "no field named",
        ),
        (
            "sleep-duration.yaml",
            "code: min, display: min}",
            "code: minutes, display: min}",
            "code: minutes",
            "unknown UCUM",
        ),
        ("phq9.yaml", "{min: 5, max: 9,", "{min: 6, max: 9,", "{min: 6, max: 9,", "without gaps"),
        ("phq9.yaml", "positive: [LA6569-3", "positive: [LA0000-0", "LA0000-0", "not in the answer list"),
        ("phq9.yaml", "    answers: LL359-1", "    answers: LL999-9", "LL999-9", "no answer list named"),
        ("phq9.yaml", "  - name: item2\n", "  - name: item1\n", "name: item1", "two items have the name"),
        ("phq9.yaml", "%scores.sum()", "%scores.count() * 10", "count()", "expected one number between"),
        ("phq9.yaml", "%scores.sum()", "%score.sum()", "%score.sum()", "FHIRPath fails"),
        (
            "dwai.yaml",
            "kind: questionnaire\n",
            "kind: questionnaire\nkind: observation\n",
            "kind: observation",
            "twice",
        ),
        ("dwai.yaml", "  - role: bond", "  - role: total", "role: total", "role `total` is used twice"),
        ("mood.yaml", "  rating: {type: integer", "  rating: [type: integer", "[type", "not valid YAML"),
    ],
)
def test_each_kind_of_mistake_names_its_line(
    tmp_path: Path, spec: str, old: str, new: str, marker: str, message: str
) -> None:
    original = (DEFAULT_FOLDER / spec).read_text()
    assert old in original
    text = original.replace(old, new, 1)
    _write(tmp_path, spec, text)
    # The line of `marker` inside the replacement (not an earlier, correct occurrence of the same text).
    start = original.index(old)
    expected = text.count("\n", 0, start) + 1 + new[: new.index(marker)].count("\n")
    problems = _problems(tmp_path)
    assert any(message in m and line == expected for _, line, m in problems), problems


def test_a_spec_whose_output_is_not_valid_fhir_is_refused(tmp_path: Path) -> None:
    # `text` must be a string in FHIR; a mapping there passes the spec grammar only as YAML.
    text = (DEFAULT_FOLDER / "mood.yaml").read_text().replace("text: Mood check-in", "text: 'x' ")
    text = text.replace("code: mood-rating, display", "code: 'mood-rating', display")
    text = text.replace("    text: Mood check-in\n", "")
    text = text.replace("max: 10,", "max: 3000000000,")  # valueInteger is a 32-bit integer in FHIR
    _write(tmp_path, "mood.yaml", text)
    problems = _problems(tmp_path)
    assert any("not valid FHIR R4" in m for _, _, m in problems), problems


def test_an_empty_folder_is_an_error(tmp_path: Path) -> None:
    assert _problems(tmp_path)[0][2].startswith("no mapping specs")


def test_the_shipped_catalogue_publishes_valid_questionnaires_and_code_system() -> None:
    catalog = load_catalog()
    questionnaires = catalog.questionnaires()
    assert {q["name"] for q in questionnaires} == {"PHQ9", "PHQ2", "GAD7", "GAD2", "DWAI"}
    for q in questionnaires:
        validate_resource(q)
        assert q["url"].startswith("https://fhir-bridge.org/fhir/Questionnaire/")
    code_system = catalog.code_system()
    validate_resource(code_system)
    defined = {c["code"] for c in code_system["concept"]}
    assert code_system["count"] == len(defined)
    # Every code of ours that a spec uses is defined in the published CodeSystem.
    own = re.compile(r"system: https://fhir-bridge.org/fhir/CodeSystem/fhir-bridge, code: ([a-z0-9.-]+)")
    used = {m for path in DEFAULT_FOLDER.glob("*.yaml") for m in own.findall(path.read_text())}
    assert used and used <= defined
    # D-WAI items are tagged with their theme.
    themes = {c["code"]: c["property"][0]["valueCode"] for c in code_system["concept"] if "property" in c}
    assert themes == {f"dwai-{i}": t for i, t in enumerate(["goal", "task", "bond"] * 2, start=1)}


def test_phq_and_gad_questionnaires_carry_the_pfizer_notice_and_answer_scores() -> None:
    catalog = load_catalog()
    for measure in ("phq9", "phq2", "gad7", "gad2"):
        q = catalog.questionnaire(measure)
        assert q is not None and "No permission required to reproduce" in q["copyright"]
    phq9 = catalog.questionnaire("phq9")
    assert phq9 is not None
    item1 = phq9["item"][0]
    assert item1["linkId"] == "44250-9" and item1["text"] == "Little interest or pleasure in doing things"
    assert [o["extension"][0]["valueDecimal"] for o in item1["answerOption"]] == [0, 1, 2, 3]
    difficulty = phq9["item"][-1]
    assert difficulty["required"] is False and all("extension" not in o for o in difficulty["answerOption"])
    assert catalog.questionnaire("mood") is None


LICENSED = """\
# A deployment's licensed D-WAI text (made-up text for the test).
dwai:
  copyright: Licensed to Example Hospital under agreement 42.
  items:
    item1: Licensed wording of the first statement.
  answers:
    dwai-agreement:
      dwai-agreement-5: Strongly agree
"""


def test_licensed_item_text_replaces_the_neutral_labels(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from mappings import MappingContext

    path = _write(tmp_path, "licensed.yaml", LICENSED)
    catalog = load_catalog(item_text_file=path)
    q = catalog.questionnaire("dwai")
    assert q is not None
    assert q["copyright"] == "Licensed to Example Hospital under agreement 42."
    assert q["item"][0]["text"] == "Licensed wording of the first statement."
    assert q["item"][1]["text"] == "D-WAI item 2 (task)"
    assert q["item"][0]["answerOption"][-1]["valueCoding"]["display"] == "Strongly agree"
    ctx = MappingContext("v", "r", "Patient/p", "urn:uuid:x", datetime(2024, 6, 1, tzinfo=UTC))
    data = {"authored": "2024-05-01T10:00:00Z", "answers": {f"item{i}": 5 for i in range(1, 7)}}
    qr = catalog.map("dwai", data, ctx).resources[0].resource
    assert qr["item"][0]["text"] == "Licensed wording of the first statement."
    assert qr["item"][0]["answer"][0]["valueCoding"]["display"] == "Strongly agree"
    # The shipped catalogue is unchanged.
    neutral = load_catalog().questionnaire("dwai")
    assert neutral is not None and neutral["item"][0]["text"] == "D-WAI item 1 (goal)"


def test_a_licensed_text_file_naming_unknown_things_is_refused_with_lines(tmp_path: Path) -> None:
    text = LICENSED.replace("item1:", "item7:").replace("dwai-agreement-5:", "dwai-agreement-9:")
    text += "mood:\n  items: {rating: x}\n"
    path = _write(tmp_path / "o", "licensed.yaml", text)
    shutil.copytree(DEFAULT_FOLDER, tmp_path / "specs")
    problems = _problems(tmp_path / "specs", item_text_file=path)
    found = {(f, line) for f, line, _ in problems}
    assert ("licensed.yaml", _line(text, "item7:")) in found
    assert ("licensed.yaml", _line(text, "dwai-agreement-9:")) in found
    assert ("licensed.yaml", _line(text, "mood:")) in found


def test_a_bad_licensed_text_file_stops_the_service_at_start_up(make_app: Any, tmp_path: Path) -> None:
    bad = _write(tmp_path, "licensed.yaml", "dwai:\n  items:\n    item9: nope\n")
    with pytest.raises(MappingSpecError, match=r"licensed\.yaml:3: dwai\.items\.item9: no item named"):
        make_app(item_text_file=str(bad))
    good = _write(tmp_path, "ok.yaml", LICENSED)
    assert make_app(item_text_file=str(good)).test_client().get("/healthz").status_code == 200
