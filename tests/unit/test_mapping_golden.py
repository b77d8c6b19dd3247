"""Golden examples: each input in mappings/examples becomes exactly the FHIR (or rejections) beside it.

The expected files are what `fhir-bridge map MEASURE INPUT` prints with its default options, so these
tests check the command vendors and hospital IT use as well as the engine behind it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fhir_bridge.cli import cli
from mappings import load_catalog

EXAMPLES = Path(__file__).resolve().parents[2] / "mappings" / "examples"
CASES = sorted(EXAMPLES.glob("*/*.input.json"))


def _expected(case: Path) -> Path:
    return case.with_name(case.name.replace(".input.json", ".expected.json"))


def _map(measure: str, path: Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["map", measure, str(path)])
    return result.exit_code, result.stdout


def test_every_measure_has_golden_examples_and_every_input_its_expected_output() -> None:
    measures = set(load_catalog().measures())
    covered = {case.parent.name for case in CASES}
    assert covered == measures
    for case in CASES:
        assert _expected(case).exists(), f"{case.name} has no expected output"
    for measure in measures:
        successes = [
            c for c in CASES if c.parent.name == measure and "resourceType" in _expected(c).read_text()
        ]
        assert successes, f"{measure} has no example that maps successfully"


@pytest.mark.parametrize("case", CASES, ids=lambda p: f"{p.parent.name}/{p.name.removesuffix('.input.json')}")
def test_golden_example(case: Path) -> None:
    expected_text = _expected(case).read_text()
    exit_code, printed = _map(case.parent.name, case)
    assert json.loads(printed) == json.loads(expected_text)
    assert printed == expected_text  # byte for byte: key order and formatting are stable too
    assert exit_code == (1 if "rejections" in json.loads(expected_text) else 0)


def test_map_lists_the_catalogue() -> None:
    result = CliRunner().invoke(cli, ["map", "--list"])
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.splitlines()]
    assert listed == list(load_catalog().measures())
    assert "questionnaire" in result.output and "PHQ-9" in result.output


def test_map_options_change_identity_and_references(tmp_path: Path) -> None:
    case = EXAMPLES / "mood" / "check-in.input.json"
    default = CliRunner().invoke(cli, ["map", "mood", str(case)])
    options = [
        "--vendor",
        "acme",
        "--vendor-name",
        "Acme Mood",
        "--record-id",
        "r-9",
        "--patient",
        "Patient/123",
    ]
    custom = CliRunner().invoke(cli, ["map", "mood", str(case), *options])
    assert default.exit_code == custom.exit_code == 0
    bundle = json.loads(custom.stdout)
    device, observation = (e["resource"] for e in bundle["entry"])
    assert device["deviceName"][0]["name"] == "Acme Mood"
    assert observation["subject"] == {"reference": "Patient/123"}
    assert observation["device"] == {"reference": bundle["entry"][0]["fullUrl"]}
    assert observation["identifier"] != json.loads(default.stdout)["entry"][1]["resource"]["identifier"]


def test_map_explains_bad_input(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = CliRunner().invoke(cli, ["map", "mood", str(broken)])
    assert result.exit_code == 1 and "not valid JSON" in result.output
    unknown = CliRunner().invoke(cli, ["map", "no-such-measure", str(broken)])
    assert unknown.exit_code == 2 and "unknown measure" in unknown.output
    other = tmp_path / "record.json"
    other.write_text(json.dumps({"record_id": "r", "measure": "gad7", "data": {}}))
    mismatch = CliRunner().invoke(cli, ["map", "phq9", str(other)])
    assert mismatch.exit_code == 1 and "not 'phq9'" in mismatch.output
    usage = CliRunner().invoke(cli, ["map"])
    assert usage.exit_code == 2 and "MEASURE and FILE" in usage.output
