"""The suite's table and comparison: what people read to judge the targets (no timings here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.__main__ import main as bench_main
from bench.results import Condition, Figure, table
from fhir_bridge.cli import cli


def push_row(values: list[float], floor: list[float]) -> Figure:
    return Figure(
        "push_batch_sqlite",
        "push batch 1,000, SQLite",
        "rec/s",
        values,
        floor,
        "marshmallow + orjson",
        [Condition("value", ">=", 10_000), Condition("ratio", ">=", 0.5)],
    )


def test_a_figure_is_judged_on_its_median_and_its_ratio_to_the_same_runs_floor() -> None:
    row = push_row([9_000, 12_000, 30_000], [20_000, 22_000, 24_000])
    assert row.median == 12_000
    assert row.ratio == pytest.approx(12_000 / 22_000)
    assert row.met is True
    assert push_row([12_000], [30_000]).met is False, "fast enough, but under half the floor"
    assert push_row([], []).met is None


def test_a_lower_is_better_target_and_a_row_without_a_floor() -> None:
    p99 = Figure("p99", "push p99", "ms", [12, 25, 18], target=[Condition("value", "<=", 20)])
    assert p99.met is True
    assert p99.ratio is None
    assert Figure("x", "no target", "ms", [1]).met is None


def test_the_table_has_one_row_per_figure_with_spread_floor_ratio_target_and_verdict() -> None:
    text = table([push_row([9_000, 12_000, 30_000], [20_000, 22_000, 24_000])])
    header, _, row = text.splitlines()
    assert [c.strip() for c in header.split("|")] == [
        "figure",
        "median",
        "min-max",
        "floor (same run)",
        "ratio",
        "target",
        "met?",
    ]
    assert [c.strip() for c in row.split("|")] == [
        "push batch 1,000, SQLite (rec/s)",
        "12,000",
        "9,000-30,000",
        "22,000",
        "0.55",
        ">= 10,000 rec/s and ratio >= 0.5",
        "yes",
    ]


def test_compare_prints_the_change_of_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in (("a", 10_000.0), ("b", 12_500.0)):
        figures = [push_row([value], [22_000]).to_json()]
        (tmp_path / f"{name}.json").write_text(
            json.dumps({"started": name, "quick": False, "figures": figures})
        )
    assert bench_main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("push batch"))
    assert [c.strip() for c in row.split("|")][1:] == [
        "10,000",
        "12,500",
        "+25.0%",
        "0.45",
        "0.57",
        "NO -> yes",
    ]


def test_the_suite_refuses_an_unknown_benchmark_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_main(["--only", "nonsense"])
    assert "unknown benchmark(s): nonsense" in capsys.readouterr().err


def test_fhir_bridge_bench_is_the_same_entry_point(tmp_path: Path) -> None:
    for name, value in (("a", 1.0), ("b", 2.0)):
        figures = [Figure("k", "thing", "x", [value]).to_json()]
        (tmp_path / f"{name}.json").write_text(json.dumps({"started": name, "figures": figures}))
    result = CliRunner().invoke(cli, ["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert "+100.0%" in result.output
