"""Who the synthetic vendor plays: which sandbox patient gets which story (the walkthrough names them)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fhir_bridge.sandbox import seed, vendor_sim
from fhir_bridge.sandbox.synthetic import stories


def test_patient_n_gets_story_n_mod_5_and_patient_1_is_the_named_non_responder() -> None:
    cast = vendor_sim.cast(6)
    assert [p.patient_id for p in cast] == [seed.patient_id(n) for n in range(1, 7)]
    assert [p.story for p in cast] == [stories()[n % 5] for n in range(1, 7)]
    assert (cast[0].name, cast[0].story.key) == ("Alex Rivera", "non-responder")
    assert len({p.app_user_id for p in cast}) == 6


@pytest.mark.parametrize("count", [0, 7])
def test_only_the_seeded_patients_can_be_cast(count: int) -> None:
    with pytest.raises(ValueError, match="1 to 6"):
        vendor_sim.cast(count)


def test_the_plan_is_each_patients_story_for_the_window() -> None:
    end = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
    plan = vendor_sim.plan(2, days=30, end=end)
    assert [p.story.key for p, _ in plan.patients] == ["non-responder", "silent"]
    assert plan.total == sum(len(r) for _, r in plan.patients) > 0
    assert all(r["app_user_id"] == p.app_user_id for p, records in plan.patients for r in records)
    assert plan == vendor_sim.plan(2, days=30, end=end)
