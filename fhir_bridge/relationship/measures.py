"""Measures a goal can target and a task can ask for: a catalogue measure, its LOINC code, its form.

A goal's target names the measure by its key; the FHIR ``Goal.target.measure`` carries the LOINC code
of the value the app's data becomes (the PHQ-9 total, daily steps), so the EHR can compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass

LOINC = "http://loinc.org"


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    code: str
    display: str
    unit: str
    # The catalogue measure (``measure`` of a pushed record) whose data this is.
    catalog_measure: str
    # The Questionnaire canonical, for measures that are questionnaires.
    questionnaire: str | None = None

    @property
    def task_title(self) -> str:
        """What a task asking for this measure says when the clinician gives no description."""
        name = self.label.removesuffix(" total score")
        return (
            f"Fill in the {name} questionnaire" if self.questionnaire else f"Check in: {self.label.lower()}"
        )


MEASURES: dict[str, Measure] = {
    m.key: m
    for m in (
        Measure(
            "phq9",
            "PHQ-9 total score",
            "44261-6",
            "Patient Health Questionnaire 9 item (PHQ-9) total score [Reported]",
            "{score}",
            "phq9",
            "https://fhir-bridge.org/fhir/Questionnaire/phq9",
        ),
        Measure(
            "gad7",
            "GAD-7 total score",
            "70274-6",
            "Generalized anxiety disorder 7 item (GAD-7) total score [Reported.PHQ]",
            "{score}",
            "gad7",
            "https://fhir-bridge.org/fhir/Questionnaire/gad7",
        ),
        Measure(
            "steps", "Steps per day", "41950-7", "Number of steps in 24 hour Measured", "/d", "steps-daily"
        ),
    )
}

COMPARATORS = {"<": "below", "<=": "at most", ">=": "at least", ">": "above"}
