"""Shared goals: set and edited by the clinician with the patient, written to the EHR as FHIR ``Goal``.

A goal is free text with an optional measurable target (a measure of :mod:`.measures`, a comparator,
a value and a due date). Every change rewrites the one outbox row of the goal (an upsert on its
identifier), so the EHR holds the latest version, and is audited with who and when.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_bridge import audit
from fhir_bridge.delivery import outbox
from fhir_bridge.errors import NotFound, Unprocessable
from fhir_bridge.relationship import events
from fhir_bridge.relationship.identity import GOAL_SYSTEM, ident
from fhir_bridge.relationship.measures import COMPARATORS, LOINC, MEASURES
from fhir_bridge.storage.models import Goal, utcnow

LIFECYCLE = ("proposed", "active", "on-hold", "completed", "cancelled")
MAX_TEXT = 500


@dataclass(frozen=True)
class Target:
    measure: str
    comparator: str
    value: float
    due: date | None


def check_target(measure: object, comparator: object, value: object, due: object) -> Target | None:
    """A target from its parts (all absent: no target); raises 422 naming the part that is wrong."""
    if measure in (None, "") and comparator in (None, "") and value in (None, ""):
        return None
    if not isinstance(measure, str) or measure not in MEASURES:
        raise Unprocessable(
            f"The target's measure must be one of: {', '.join(MEASURES)}.", code="invalid-goal-measure"
        )
    if comparator not in COMPARATORS:
        raise Unprocessable(
            f"The target's comparator must be one of {', '.join(COMPARATORS)}.",
            code="invalid-goal-comparator",
        )
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1_000_000:
        raise Unprocessable("The target value must be a number from 0 to 1000000.", code="invalid-goal-value")
    return Target(measure, str(comparator), float(value), check_due(due))


def check_due(due: object) -> date | None:
    if due in (None, ""):
        return None
    try:
        return date.fromisoformat(str(due)) if isinstance(due, str) and len(due) == 10 else _bad_due()
    except ValueError:
        return _bad_due()


def _bad_due() -> date:
    raise Unprocessable("The due date must be a date as YYYY-MM-DD.", code="invalid-due-date")


def check_text(text: object, *, field: str = "description") -> str:
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        raise Unprocessable(
            f"The {field} must be text of 1 to {MAX_TEXT} characters.", code=f"invalid-{field}"
        )
    return text.strip()


def goal_resource(goal: Goal) -> dict[str, Any]:
    """The FHIR R4 Goal: ``target`` when measurable, ``lifecycleStatus``, ``expressedBy``."""
    resource: dict[str, Any] = {
        "resourceType": "Goal",
        "identifier": [{"system": GOAL_SYSTEM, "value": goal.ident_value}],
        "lifecycleStatus": goal.lifecycle_status,
        "description": {"text": goal.description},
        "subject": {"reference": f"Patient/{goal.patient_id}"},
        "startDate": goal.created_at.date().isoformat(),
        "statusDate": goal.updated_at.date().isoformat(),
    }
    if goal.expressed_by:
        resource["expressedBy"] = {"reference": goal.expressed_by}
    if goal.measure and goal.comparator and goal.target_value is not None:
        measure = MEASURES[goal.measure]
        value = goal.target_value
        quantity: dict[str, Any] = {
            "value": int(value) if value.is_integer() else value,
            "system": "http://unitsofmeasure.org",
            "code": measure.unit,
        }
        if goal.comparator != "=":
            quantity["comparator"] = goal.comparator
        target: dict[str, Any] = {
            "measure": {"coding": [{"system": LOINC, "code": measure.code, "display": measure.display}]},
            "detailQuantity": quantity,
        }
        if goal.due_date:
            target["dueDate"] = goal.due_date.isoformat()
        resource["target"] = [target]
    elif goal.due_date:
        resource["target"] = [{"dueDate": goal.due_date.isoformat()}]
    return resource


def _queue(session: Session, goal: Goal, now: datetime) -> None:
    outbox.put(
        session,
        tenant_id=goal.tenant_id,
        resource=goal_resource(goal),
        ident_system=GOAL_SYSTEM,
        ident_value=goal.ident_value,
        now=now,
    )
    events.changed(session, goal.tenant_id, goal.patient_id, "goal", str(goal.id), now)


def create(
    session: Session,
    *,
    tenant_id: str,
    patient_id: str,
    actor: str,
    expressed_by: str | None,
    description: object,
    target: Target | None,
    status: object = "active",
    now: datetime | None = None,
) -> Goal:
    now = now or utcnow()
    if status not in LIFECYCLE:
        raise Unprocessable(f"The status must be one of {', '.join(LIFECYCLE)}.", code="invalid-goal-status")
    goal_id = uuid.uuid4()
    goal = Goal(
        id=goal_id,
        tenant_id=tenant_id,
        patient_id=patient_id,
        description=check_text(description),
        measure=target.measure if target else None,
        comparator=target.comparator if target else None,
        target_value=target.value if target else None,
        due_date=target.due if target else None,
        lifecycle_status=str(status),
        expressed_by=expressed_by,
        created_by=actor[:255],
        created_at=now,
        updated_at=now,
        ident_value=ident("goal", tenant_id, str(goal_id)),
    )
    session.add(goal)
    session.flush()
    _queue(session, goal, now)
    audit.record(
        session,
        actor_type="user",
        actor_id=actor[:255],
        action="goal.set",
        tenant_id=tenant_id,
        patient_id=patient_id,
        target=f"goal/{goal.id}",
        detail={"measure": goal.measure or "-"},
        now=now,
    )
    return goal


def update(
    session: Session,
    *,
    tenant_id: str,
    patient_id: str,
    goal_id: str,
    actor: str,
    changes: dict[str, Any],
    now: datetime | None = None,
) -> Goal:
    """Edit a goal of this patient (another patient's goal is 404); only the keys given change."""
    now = now or utcnow()
    goal = get(session, tenant_id, patient_id, goal_id, lock=True)
    if "description" in changes:
        goal.description = check_text(changes["description"])
    if "status" in changes:
        if changes["status"] not in LIFECYCLE:
            raise Unprocessable(
                f"The status must be one of {', '.join(LIFECYCLE)}.", code="invalid-goal-status"
            )
        goal.lifecycle_status = changes["status"]
    if "target" in changes:
        raw = changes["target"] or {}
        if not isinstance(raw, dict):
            raise Unprocessable("The target must be an object or null.", code="invalid-goal-target")
        target = check_target(
            raw.get("measure"), raw.get("comparator"), raw.get("value"), raw.get("due_date")
        )
        if target is None or target.measure != goal.measure:
            goal.latest_value, goal.latest_at = None, None
        goal.measure = target.measure if target else None
        goal.comparator = target.comparator if target else None
        goal.target_value = target.value if target else None
        goal.due_date = target.due if target else None
    goal.updated_at = now
    _queue(session, goal, now)
    audit.record(
        session,
        actor_type="user",
        actor_id=actor[:255],
        action="goal.edit",
        tenant_id=tenant_id,
        patient_id=patient_id,
        target=f"goal/{goal.id}",
        detail={"fields": ",".join(sorted(changes))[:100]},
        now=now,
    )
    return goal


def get(session: Session, tenant_id: str, patient_id: str, goal_id: str, *, lock: bool = False) -> Goal:
    try:
        key = uuid.UUID(goal_id)
    except ValueError:
        key = None
    goal = session.get(Goal, key, with_for_update=lock) if key else None
    if goal is None or goal.tenant_id != tenant_id or goal.patient_id != patient_id:
        raise NotFound("There is no such goal for this patient.", code="goal-not-found")
    return goal


def for_patient(session: Session, tenant_id: str, patient_id: str) -> list[Goal]:
    return list(
        session.scalars(
            select(Goal)
            .where(Goal.tenant_id == tenant_id, Goal.patient_id == patient_id)
            .order_by(Goal.created_at)
        )
    )
