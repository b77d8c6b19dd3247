"""What the care team shares with the vendor's app users: goals, tasks, messages (issue 10).

Reads list, for the vendor's app users with an active enrollment only, what changed after an opaque
cursor (oldest first): page while ``has_more``, keep the last ``next``, and poll with it (or catch up
after a webhook) to get only what changed since. A patient's message is posted
for one app user. An app user of another vendor, or whose enrollment ended, is 404 and nothing is
read, stored or sent (:mod:`fhir_bridge.relationship.access`). Responses never name the EHR patient.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime
from typing import Any

import orjson
from flask import Blueprint, Response, jsonify, request
from marshmallow import RAISE, Schema, fields, validate
from sqlalchemy import and_, or_, select

from fhir_bridge import enrollment as enrollments
from fhir_bridge import services
from fhir_bridge.api.common import current_vendor, load, read_json, requires_scope
from fhir_bridge.errors import BadRequest
from fhir_bridge.relationship import access, messages, progress, tasks
from fhir_bridge.relationship.measures import MEASURES
from fhir_bridge.storage.models import CareTask, Enrollment, Goal, Message, Tenant, VendorClient

bp = Blueprint("relationship", __name__, url_prefix="/api/v1")

READ_SCOPE = "relationship.read"
WRITE_SCOPE = "messages.write"
TASKS_SCOPE = "tasks.write"


class AppUserSchema(Schema):
    class Meta:
        unknown = RAISE

    app_user_id = fields.String(required=True, validate=validate.Length(min=1, max=128))


class MessageSchema(Schema):
    class Meta:
        unknown = RAISE

    app_user_id = fields.String(required=True, validate=validate.Length(min=1, max=128))
    text = fields.String(required=True, validate=validate.Length(min=1, max=messages.MAX_TEXT))
    in_response_to = fields.String(load_default=None, validate=validate.Length(max=64))
    client_message_id = fields.String(
        load_default=None, validate=validate.Regexp(r"^[A-Za-z0-9._:-]{1,128}$")
    )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def encode_cursor(at: datetime, item_id: uuid.UUID) -> str:
    raw = orjson.dumps([at.isoformat(), str(item_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        at_text, id_text = orjson.loads(raw)
        at = datetime.fromisoformat(at_text)
        if at.tzinfo is None:
            raise ValueError
        return at, uuid.UUID(id_text)
    except (binascii.Error, ValueError, TypeError, orjson.JSONDecodeError):
        raise BadRequest(
            "'after' must be the 'next' cursor of a previous page.", code="invalid-cursor"
        ) from None


def _page_args() -> tuple[int, tuple[datetime, uuid.UUID] | None, str | None]:
    limit_text = request.args.get("limit", "100")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 500:
        raise BadRequest("limit must be a whole number from 1 to 500", code="invalid-parameter")
    after = request.args.get("after")
    app_user_id = request.args.get("app_user_id")
    if app_user_id is not None and not enrollments.APP_USER_ID.fullmatch(app_user_id):
        raise BadRequest(
            "app_user_id must be 1-128 ASCII letters, digits and . _ : @ -", code="invalid-parameter"
        )
    return int(limit_text), decode_cursor(after) if after else None, app_user_id


def _enrolled(vendor: VendorClient, model: Any, app_user_id: str | None) -> Any:
    """Rows of ``model`` about patients of the vendor's active enrollments (one app user each)."""
    condition = and_(
        Enrollment.tenant_id == model.tenant_id,
        Enrollment.patient_id == model.patient_id,
        Enrollment.vendor_id == vendor.id,
        Enrollment.status == "active",
    )
    query = select(model, Enrollment).join(Enrollment, condition)
    if app_user_id is not None:
        query = query.where(Enrollment.app_user_id == app_user_id)
    return query


def _page(model: Any, column: Any, render: Any, extra: Any = None) -> Response:
    limit, after, app_user_id = _page_args()
    vendor = current_vendor()
    query = _enrolled(vendor, model, app_user_id)
    if extra is not None:
        query = query.where(extra(vendor))
    if after is not None:
        query = query.where(or_(column > after[0], and_(column == after[0], model.id > after[1])))
    query = query.order_by(column, model.id).limit(limit + 1)
    with services.current().db.sessions() as session:
        if app_user_id is not None:
            access.enrollment_for(session, vendor, app_user_id)
        rows = session.execute(query).all()
        page = rows[:limit]
        body: dict[str, Any] = {"items": [render(row[0], row[1]) for row in page]}
        # Where to go on from: after this page's last item, or (an empty page) where the caller was.
        # Polling with it later returns only what changed since.
        if page:
            body["next"] = encode_cursor(getattr(page[-1][0], column.key), page[-1][0].id)
        else:
            body["next"] = request.args.get("after")
        body["has_more"] = len(rows) > limit
        if model is Message and app_user_id is not None:
            enrolled = access.enrollment_for(session, vendor, app_user_id)
            body["notice"] = messages.crisis_notice(session.get(Tenant, enrolled.tenant_id))
        elif model is Message:
            body["notice"] = messages.crisis_notice(None)
    return jsonify(body)


def goal_json(goal: Goal, enrolled: Enrollment) -> dict[str, Any]:
    target = None
    if goal.measure and goal.comparator and goal.target_value is not None:
        target = {
            "measure": goal.measure,
            "label": MEASURES[goal.measure].label if goal.measure in MEASURES else goal.measure,
            "comparator": goal.comparator,
            "value": goal.target_value,
            "due_date": goal.due_date.isoformat() if goal.due_date else None,
        }
    return {
        "id": str(goal.id),
        "app_user_id": enrolled.app_user_id,
        "description": goal.description,
        "status": goal.lifecycle_status,
        "target": target,
        "progress": progress.summary(goal),
        "updated_at": _iso(goal.updated_at),
    }


def task_json(task: CareTask, enrolled: Enrollment) -> dict[str, Any]:
    return {
        "id": str(task.id),
        "app_user_id": enrolled.app_user_id,
        "kind": task.kind,
        "measure": task.measure,
        "title": task.title,
        "due_date": task.due_date.isoformat() if task.due_date else None,
        "status": task.status,
        "completed_at": _iso(task.completed_at),
        "updated_at": _iso(task.updated_at),
    }


def message_json(message: Message, enrolled: Enrollment) -> dict[str, Any]:
    return {
        "id": str(message.id),
        "app_user_id": enrolled.app_user_id,
        "direction": message.direction,
        "from": "care-team" if message.direction == "to-patient" else "patient",
        "text": message.text,
        "in_response_to": str(message.in_response_to) if message.in_response_to else None,
        "sent_at": _iso(message.sent_at),
    }


@bp.get("/goals")
@requires_scope(READ_SCOPE)
def list_goals() -> Response:
    return _page(Goal, Goal.updated_at, goal_json)


@bp.get("/tasks")
@requires_scope(READ_SCOPE)
def list_tasks() -> Response:
    return _page(CareTask, CareTask.updated_at, task_json)


def _own_messages(vendor: VendorClient) -> Any:
    """The care team's messages, and the patient's messages sent through this vendor's app only."""
    mine = select(Enrollment.id).where(Enrollment.vendor_id == vendor.id)
    return or_(Message.direction == "to-patient", Message.enrollment_id.in_(mine))


@bp.get("/messages")
@requires_scope(READ_SCOPE)
def list_messages() -> Response:
    return _page(Message, Message.sent_at, message_json, _own_messages)


@bp.post("/messages")
@requires_scope(WRITE_SCOPE)
def post_message() -> tuple[Response, int]:
    """A patient's message to their care team, sent from the app."""
    body = load(MessageSchema(), read_json("application/json"))
    vendor = current_vendor()
    enrollments.check_app_user_id(body["app_user_id"])
    with services.current().db.transaction() as session:
        enrolled = access.enrollment_for(session, vendor, body["app_user_id"])
        message, created = messages.from_patient(
            session,
            enrollment=enrolled,
            vendor_client_id=vendor.client_id,
            text=body["text"],
            client_message_id=body["client_message_id"],
            in_response_to=body["in_response_to"],
        )
        out = message_json(message, enrolled)
        out["notice"] = messages.crisis_notice(session.get(Tenant, enrolled.tenant_id))
    return jsonify(out), 201 if created else 200


@bp.post("/tasks/<task_id>/complete")
@requires_scope(TASKS_SCOPE)
def complete_task(task_id: str) -> tuple[Response, int]:
    """The app user did the task (e.g. a module in the app): it is completed, here and in the EHR."""
    body = load(AppUserSchema(), read_json("application/json"))
    vendor = current_vendor()
    enrollments.check_app_user_id(body["app_user_id"])
    with services.current().db.transaction() as session:
        enrolled = access.enrollment_for(session, vendor, body["app_user_id"])
        task, _changed = tasks.complete_by_app(
            session,
            tenant_id=enrolled.tenant_id,
            patient_id=enrolled.patient_id,
            task_id=task_id,
            vendor_client_id=vendor.client_id,
        )
        out = task_json(task, enrolled)
    return jsonify(out), 200
