"""Tasks between visits: the clinician asks the patient to fill a questionnaire, do a module or check in.

Each task is a FHIR ``Task`` in the EHR (``for`` the patient, ``focus`` the Questionnaire canonical when
it is one). A questionnaire or check-in task is completed when data of its measure arrives for the
patient after the task was assigned: the push path makes one call, :func:`on_accepted`, in the
transaction that accepts the records, which also feeds goal progress.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import bindparam, select, tuple_, union
from sqlalchemy.orm import Session

from fhir_bridge import audit
from fhir_bridge.delivery import outbox
from fhir_bridge.errors import Conflict, NotFound, Unprocessable
from fhir_bridge.relationship import events, goals, progress
from fhir_bridge.relationship.identity import TASK_SYSTEM, ident
from fhir_bridge.relationship.measures import MEASURES
from fhir_bridge.storage.models import CareTask, Enrollment, Goal, utcnow
from mappings import MappedResource

KINDS = ("questionnaire", "module", "check-in")
TASK_CODE_SYSTEM = "http://hl7.org/fhir/CodeSystem/task-code"


def task_resource(task: CareTask) -> dict[str, Any]:
    """The FHIR R4 Task: requested of the patient, by the clinician, until the data arrives."""
    resource: dict[str, Any] = {
        "resourceType": "Task",
        "identifier": [{"system": TASK_SYSTEM, "value": task.ident_value}],
        "status": task.status,
        "intent": "order",
        "code": {
            "coding": [
                {"system": TASK_CODE_SYSTEM, "code": "fulfill", "display": "Fulfill the focal request"}
            ],
            "text": task.kind,
        },
        "description": task.title,
        "for": {"reference": f"Patient/{task.patient_id}"},
        "owner": {"reference": f"Patient/{task.patient_id}"},
        "authoredOn": task.created_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "lastModified": task.updated_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    measure = MEASURES.get(task.measure or "")
    if task.kind == "questionnaire" and measure and measure.questionnaire:
        # R4 Task.focus is a Reference; a canonical Questionnaire is referenced by its URL.
        resource["focus"] = {"reference": measure.questionnaire, "display": measure.label}
    if task.due_date:
        resource["restriction"] = {"period": {"end": task.due_date.isoformat()}}
    if task.completed_at:
        resource["executionPeriod"] = {
            "start": resource["authoredOn"],
            "end": task.completed_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
    return resource


def _queue(session: Session, task: CareTask, now: datetime) -> None:
    outbox.put(
        session,
        tenant_id=task.tenant_id,
        resource=task_resource(task),
        ident_system=TASK_SYSTEM,
        ident_value=task.ident_value,
        now=now,
    )
    events.changed(session, task.tenant_id, task.patient_id, "task", str(task.id), now)


def assign(
    session: Session,
    *,
    tenant_id: str,
    patient_id: str,
    actor: str,
    kind: object,
    measure: object,
    title: object,
    due: object,
    now: datetime | None = None,
) -> CareTask:
    now = now or utcnow()
    if kind not in KINDS:
        raise Unprocessable(f"The task kind must be one of {', '.join(KINDS)}.", code="invalid-task-kind")
    measure_key: str | None = None
    if kind in ("questionnaire", "check-in"):
        if not isinstance(measure, str) or measure not in MEASURES:
            raise Unprocessable(
                f"A {kind} task names the measure it asks for: one of {', '.join(MEASURES)}.",
                code="invalid-task-measure",
            )
        if kind == "questionnaire" and MEASURES[measure].questionnaire is None:
            raise Unprocessable(f"{measure} is not a questionnaire.", code="invalid-task-measure")
        measure_key = measure
    text = (
        title
        if isinstance(title, str) and title.strip()
        else (MEASURES[measure_key].task_title if measure_key else "")
    )
    task_id = uuid.uuid4()
    task = CareTask(
        id=task_id,
        tenant_id=tenant_id,
        patient_id=patient_id,
        kind=str(kind),
        measure=measure_key,
        title=goals.check_text(text, field="title")[:200],
        due_date=goals.check_due(due),
        status="requested",
        created_by=actor[:255],
        created_at=now,
        updated_at=now,
        ident_value=ident("task", tenant_id, str(task_id)),
    )
    session.add(task)
    session.flush()
    _queue(session, task, now)
    audit.record(
        session,
        actor_type="user",
        actor_id=actor[:255],
        action="task.assign",
        tenant_id=tenant_id,
        patient_id=patient_id,
        target=f"task/{task.id}",
        detail={"kind": task.kind, "measure": task.measure or "-"},
        now=now,
    )
    return task


def cancel(session: Session, *, tenant_id: str, patient_id: str, task_id: str, actor: str) -> CareTask:
    now = utcnow()
    task = get(session, tenant_id, patient_id, task_id)
    if task.status != "requested":
        raise Unprocessable("Only an open task can be cancelled.", code="task-not-open")
    task.status, task.updated_at = "cancelled", now
    _queue(session, task, now)
    audit.record(
        session,
        actor_type="user",
        actor_id=actor[:255],
        action="task.cancel",
        tenant_id=tenant_id,
        patient_id=patient_id,
        target=f"task/{task.id}",
        now=now,
    )
    return task


def complete_by_app(
    session: Session, *, tenant_id: str, patient_id: str, task_id: str, vendor_client_id: str
) -> tuple[CareTask, bool]:
    """The app says the patient did the task (a module only the app can see); (task, changed).

    Completing a completed task again changes nothing; a cancelled task cannot be completed."""
    now = utcnow()
    task = get(session, tenant_id, patient_id, task_id)
    if task.status == "completed":
        return task, False
    if task.status != "requested":
        raise Conflict("The care team cancelled this task.", code="task-not-open")
    task.status, task.completed_at, task.updated_at = "completed", now, now
    _queue(session, task, now)
    audit.record(
        session,
        actor_type="vendor",
        actor_id=vendor_client_id,
        action="task.complete",
        tenant_id=tenant_id,
        patient_id=patient_id,
        target=f"task/{task.id}",
        detail={"kind": task.kind},
        now=now,
    )
    return task, True


def get(session: Session, tenant_id: str, patient_id: str, task_id: str) -> CareTask:
    try:
        key = uuid.UUID(task_id)
    except ValueError:
        key = None
    task = session.get(CareTask, key, with_for_update=True) if key else None
    if task is None or task.tenant_id != tenant_id or task.patient_id != patient_id:
        raise NotFound("There is no such task for this patient.", code="task-not-found")
    return task


def for_patient(session: Session, tenant_id: str, patient_id: str) -> list[CareTask]:
    return list(
        session.scalars(
            select(CareTask)
            .where(CareTask.tenant_id == tenant_id, CareTask.patient_id == patient_id)
            .order_by(CareTask.created_at)
        )
    )


def on_accepted(
    session: Session,
    *,
    open_tasks: Sequence[CareTask],
    live_goals: list[Goal],
    measures: dict[str, list[str | None]],
    resources: list[dict[str, Any]],
    now: datetime,
) -> None:
    """Records of ``measures`` (each with the times its data is from, None where unknown) were accepted
    for one patient: complete that patient's matching open tasks and note the values on their
    measurable goals. Only data from after the task was assigned completes it: an app sending its
    history (or a late sync of last month's questionnaire) has not done what was asked."""
    for task in open_tasks:
        measure = MEASURES.get(task.measure or "")
        if measure is None or measure.catalog_measure not in measures:
            continue
        if not any(_after_assignment(when, task.created_at) for when in measures[measure.catalog_measure]):
            continue
        task.status, task.completed_at, task.updated_at = "completed", now, now
        _queue(session, task, now)
        audit.record(
            session,
            actor_type="system",
            actor_id="push",
            action="task.complete",
            tenant_id=task.tenant_id,
            patient_id=task.patient_id,
            target=f"task/{task.id}",
            detail={"measure": measure.key},
            now=now,
        )
    for goal in progress.note_accepted(live_goals, resources, now):
        _goal_changed(session, goal, now)


# Clocks of phones and servers differ: data stamped this much before the assignment still counts.
CLOCK_SKEW = timedelta(minutes=5)


def _after_assignment(when: str | None, assigned_at: datetime) -> bool:
    """Whether data from ``when`` (a FHIR date or dateTime; None when unknown) is newer than the task.

    A date without a time (daily steps) counts from the day of the assignment on.
    """
    if not when:
        return True
    assigned = assigned_at if assigned_at.tzinfo else assigned_at.replace(tzinfo=UTC)
    try:
        if len(when) <= 10:
            return date.fromisoformat(when) >= assigned.date()
        moment = datetime.fromisoformat(when)
    except ValueError:
        return True  # mapped resources carry valid FHIR times; never block a task on our parsing
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment >= assigned - CLOCK_SKEW


def _effective(resource: dict[str, Any]) -> str | None:
    """When a mapped resource's data is from: effective[x] (the period's start) or authored."""
    period = resource.get("effectivePeriod")
    value = resource.get("effectiveDateTime") or (period or {}).get("start") or resource.get("authored")
    return str(value) if value else None


def _goal_changed(session: Session, goal: Goal, now: datetime) -> None:
    """Progress is computed here, not written to the EHR (which holds the data itself): vendors are told."""
    events.changed(session, goal.tenant_id, goal.patient_id, "goal", str(goal.id), now)


class _Accepted(Protocol):
    measure: str
    enrollment: Enrollment
    resources: Sequence[MappedResource]


# Built once: constructing the statement costs more than running it on the push path.
_WITH_WORK = union(
    select(CareTask.tenant_id, CareTask.patient_id).where(
        tuple_(CareTask.tenant_id, CareTask.patient_id).in_(bindparam("pairs", expanding=True)),
        CareTask.status == "requested",
        CareTask.measure.is_not(None),
    ),
    select(Goal.tenant_id, Goal.patient_id).where(
        tuple_(Goal.tenant_id, Goal.patient_id).in_(bindparam("pairs", expanding=True)),
        Goal.measure.is_not(None),
        Goal.lifecycle_status.in_(progress.ACTIVE),
    ),
)


def on_push(session: Session, prepared: Sequence[_Accepted], now: datetime) -> None:
    """The push path's one call (``fhir_bridge.push.write_accepted``), once per push.

    One indexed query finds which of the batch's patients have open tasks or measurable goals; most
    pushes find none and cost nothing more. Otherwise, per such patient: which measures arrived (native
    records by name; FHIR pushes by Questionnaire canonical or Observation code) and their values.
    """
    # Enrollments first (a batch is mostly one app user's): ORM attribute reads once per enrollment.
    enrollments = {id(p.enrollment): p.enrollment for p in prepared}.values()
    patients = {(e.tenant_id, e.patient_id) for e in enrollments}
    if not patients:
        return
    # One round trip, no ORM objects, for the usual answer "nothing to do for these patients".
    pairs = sorted(patients)
    hits: set[tuple[str, str]] = set()
    for start in range(0, len(pairs), 400):
        chunk = {"pairs": pairs[start : start + 400]}
        hits.update((t, p) for t, p in session.connection().execute(_WITH_WORK, chunk))
    if not hits:
        return
    tasks_of: dict[tuple[str, str], list[CareTask]] = defaultdict(list)
    goals_of: dict[tuple[str, str], list[Goal]] = defaultdict(list)
    for tenant_id, patient_id in sorted(hits):
        tasks_of[(tenant_id, patient_id)] = list(
            session.scalars(
                select(CareTask).where(
                    CareTask.tenant_id == tenant_id,
                    CareTask.patient_id == patient_id,
                    CareTask.status == "requested",
                    CareTask.measure.is_not(None),
                )
            )
        )
        goals_of[(tenant_id, patient_id)] = list(
            session.scalars(
                select(Goal).where(
                    Goal.tenant_id == tenant_id,
                    Goal.patient_id == patient_id,
                    Goal.measure.is_not(None),
                    Goal.lifecycle_status.in_(progress.ACTIVE),
                )
            )
        )
    for key in sorted(set(tasks_of) | set(goals_of)):
        measures: dict[str, list[str | None]] = defaultdict(list)
        resources: list[dict[str, Any]] = []
        for item in prepared:
            if (item.enrollment.tenant_id, item.enrollment.patient_id) != key:
                continue
            when = _effective(item.resources[0].resource) if item.resources else None
            measures[item.measure].append(when)
            for mapped in item.resources:
                resources.append(mapped.resource)
                for found in _measures_in(mapped.resource):
                    measures[found].append(_effective(mapped.resource))
        on_accepted(
            session,
            open_tasks=tasks_of[key],
            live_goals=goals_of[key],
            measures=measures,
            resources=resources,
            now=now,
        )


def _measures_in(resource: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    if resource.get("resourceType") == "QuestionnaireResponse":
        canonical = str(resource.get("questionnaire") or "").split("|")[0]
        found.update(m.catalog_measure for m in MEASURES.values() if m.questionnaire == canonical)
    elif resource.get("resourceType") == "Observation":
        found.update(
            m.catalog_measure for m in MEASURES.values() if progress.value_of(resource, m.code) is not None
        )
    return found
