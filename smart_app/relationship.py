"""The dashboard's relationship panels (issue 10): goals, tasks, messages and the patient's timeline.

Every route takes the launch id from the URL and checks it against the browser's session, so the
clinician acts on the launched patient only; state-changing requests need the page's CSRF token. The
work is done by :mod:`fhir_bridge.relationship` (which queues the FHIR resources through the outbox
and audits each action); these functions only translate between the page and those services.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Response
from sqlalchemy import select

from fhir_bridge import services
from fhir_bridge.relationship import goals, messages, progress, tasks
from fhir_bridge.relationship.measures import COMPARATORS, MEASURES
from fhir_bridge.storage.models import AuditEvent, CareTask, Goal, Message, Tenant
from smart_app import session as launch_session
from smart_app import web
from smart_app.dashboard import json_body, json_response
from smart_app.session import LaunchContext

TIMELINE_ACTIONS = {
    "enrollment.create": "App prescribed (pairing code created)",
    "enrollment.claim": "Patient linked the app (consent recorded)",
    "enrollment.end": "App enrollment ended (consent withdrawn)",
    "goal.set": "Goal set",
    "goal.edit": "Goal edited",
    "task.assign": "Task assigned",
    "task.cancel": "Task cancelled",
    "task.complete": "Task completed (reported by the app)",
    "message.send": "Message sent to the patient",
    "message.receive": "Message from the patient",
    "alert.acknowledge": "Alert acknowledged",
    "follow-up.request": "Follow-up requested",
}


def _ms(value: datetime | None) -> float | None:
    return value.timestamp() * 1000 if value is not None else None


def _clinician(ctx: LaunchContext) -> str | None:
    """The clinician as a FHIR reference, when the launch named a Practitioner(Role)."""
    if ctx.fhir_user and ctx.fhir_user.split("/")[0] in {"Practitioner", "PractitionerRole"}:
        return ctx.fhir_user
    return None


def goal_view(goal: Goal) -> dict[str, Any]:
    measure = MEASURES.get(goal.measure or "")
    return {
        "id": str(goal.id),
        "description": goal.description,
        "status": goal.lifecycle_status,
        "target": {
            "measure": goal.measure,
            "label": measure.label if measure else goal.measure,
            "comparator": goal.comparator,
            "words": COMPARATORS.get(goal.comparator or "", ""),
            "value": goal.target_value,
            "due_date": goal.due_date.isoformat() if goal.due_date else None,
        }
        if goal.measure
        else None,
        "progress": progress.summary(goal),
        "updated": _ms(goal.updated_at),
    }


def task_view(task: CareTask) -> dict[str, Any]:
    return {
        "id": str(task.id),
        "kind": task.kind,
        "measure": task.measure,
        "title": task.title,
        "due_date": task.due_date.isoformat() if task.due_date else None,
        "status": task.status,
        "assigned": _ms(task.created_at),
        "completed": _ms(task.completed_at),
    }


def message_view(message: Message) -> dict[str, Any]:
    return {
        "id": str(message.id),
        "from": "care team" if message.direction == "to-patient" else "patient",
        "direction": message.direction,
        "text": message.text,
        "sent": _ms(message.sent_at),
        "unread": message.direction == "to-clinician" and message.read_at is None,
        "in_response_to": str(message.in_response_to) if message.in_response_to else None,
    }


def _timeline(session: Any, ctx: LaunchContext) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(AuditEvent)
        .where(
            AuditEvent.tenant_id == ctx.tenant_id,
            AuditEvent.patient_id == ctx.patient_id,
            AuditEvent.action.in_(TIMELINE_ACTIONS),
            AuditEvent.outcome == "success",
        )
        .order_by(AuditEvent.id.desc())
        .limit(100)
    ).all()
    return [
        {
            "at": _ms(row.at),
            "action": row.action,
            "label": TIMELINE_ACTIONS[row.action],
            "who": row.actor_id
            if row.actor_type == "user"
            else {"vendor": "the app", "system": "automatic"}.get(row.actor_type, row.actor_type),
        }
        for row in rows
    ]


def state(ctx: LaunchContext) -> dict[str, Any]:
    with services.current().db.sessions() as session:
        return {
            "goals": [goal_view(g) for g in goals.for_patient(session, ctx.tenant_id, ctx.patient_id)],
            "tasks": [task_view(t) for t in tasks.for_patient(session, ctx.tenant_id, ctx.patient_id)],
            "messages": [message_view(m) for m in messages.thread(session, ctx.tenant_id, ctx.patient_id)],
            "unread": messages.unread(session, ctx.tenant_id, ctx.patient_id),
            "notice": messages.crisis_notice(session.get(Tenant, ctx.tenant_id)),
            "timeline": _timeline(session, ctx),
            "measures": {
                k: {"label": m.label, "questionnaire": m.questionnaire is not None}
                for k, m in MEASURES.items()
            },
        }


def get(launch_id: str) -> Response:
    ctx = launch_session.load(launch_id)
    return json_response(state(ctx))


def _checked(launch_id: str) -> LaunchContext:
    ctx = launch_session.load(launch_id)
    svc = services.current()
    web.check_csrf(svc.secret_key, ctx.launch_id, svc.settings.public_url)
    return ctx


def set_goal(launch_id: str) -> Response:
    ctx = _checked(launch_id)
    body = json_body()
    target = body.get("target") or {}
    if not isinstance(target, dict):
        target = {"measure": "?"}
    with services.current().db.transaction() as session:
        goal = goals.create(
            session,
            tenant_id=ctx.tenant_id,
            patient_id=ctx.patient_id,
            actor=ctx.actor,
            expressed_by=f"Patient/{ctx.patient_id}",
            description=body.get("description"),
            target=goals.check_target(
                target.get("measure"), target.get("comparator"), target.get("value"), target.get("due_date")
            ),
        )
        view = goal_view(goal)
    return json_response(view, status=201)


def edit_goal(launch_id: str, goal_id: str) -> Response:
    ctx = _checked(launch_id)
    body = json_body()
    changes: dict[str, Any] = {k: body[k] for k in ("description", "status", "target") if k in body}
    with services.current().db.transaction() as session:
        goal = goals.update(
            session,
            tenant_id=ctx.tenant_id,
            patient_id=ctx.patient_id,
            goal_id=goal_id,
            actor=ctx.actor,
            changes=changes,
        )
        view = goal_view(goal)
    return json_response(view)


def assign_task(launch_id: str) -> Response:
    ctx = _checked(launch_id)
    body = json_body()
    with services.current().db.transaction() as session:
        task = tasks.assign(
            session,
            tenant_id=ctx.tenant_id,
            patient_id=ctx.patient_id,
            actor=ctx.actor,
            kind=body.get("kind"),
            measure=body.get("measure"),
            title=body.get("title"),
            due=body.get("due_date"),
        )
        view = task_view(task)
    return json_response(view, status=201)


def cancel_task(launch_id: str, task_id: str) -> Response:
    ctx = _checked(launch_id)
    with services.current().db.transaction() as session:
        task = tasks.cancel(
            session, tenant_id=ctx.tenant_id, patient_id=ctx.patient_id, task_id=task_id, actor=ctx.actor
        )
        view = task_view(task)
    return json_response(view)


def send_message(launch_id: str) -> Response:
    ctx = _checked(launch_id)
    body = json_body()
    with services.current().db.transaction() as session:
        message = messages.send_to_patient(
            session,
            tenant_id=ctx.tenant_id,
            patient_id=ctx.patient_id,
            actor=ctx.actor,
            sender=_clinician(ctx),
            text=body.get("text"),
            in_response_to=body.get("in_response_to"),
        )
        view = message_view(message)
    return json_response(view, status=201)


def mark_read(launch_id: str) -> Response:
    ctx = _checked(launch_id)
    with services.current().db.transaction() as session:
        count = messages.mark_read(session, ctx.tenant_id, ctx.patient_id)
    return json_response({"read": count})
