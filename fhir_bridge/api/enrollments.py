"""Enrollment routes for vendors: claim a pairing code, read, list and end their own enrollments."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request
from marshmallow import RAISE, Schema, fields, validate

from fhir_bridge import enrollment, services
from fhir_bridge.api.common import current_vendor, load, read_json, requires_scope
from fhir_bridge.errors import BadRequest
from fhir_bridge.storage.models import Enrollment

bp = Blueprint("enrollments", __name__, url_prefix="/api/v1/enrollments")


class ClaimSchema(Schema):
    class Meta:
        unknown = RAISE

    code = fields.String(required=True, validate=validate.Length(min=1, max=64))
    app_user_id = fields.String(required=True, validate=validate.Length(min=1, max=128))


def _iso(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def as_json(item: Enrollment) -> dict[str, Any]:
    """What a vendor may know of an enrollment: never the EHR patient id (vendors never name patients)."""
    return {
        "id": str(item.id),
        "app_user_id": item.app_user_id,
        "status": item.status,
        "tenant": item.tenant_id,
        "claimed_at": _iso(item.claimed_at),
        "ended_at": _iso(item.ended_at),
    }


@bp.post("/claim")
@requires_scope("enrollments")
def claim() -> tuple[Response, int]:
    """Claim a pairing code for one of the vendor's app users."""
    body = load(ClaimSchema(), read_json("application/json"))
    svc = services.current()
    item = enrollment.claim(
        svc.db,
        secret=svc.secret_key,
        vendor=current_vendor(),
        code=body["code"],
        app_user_id=body["app_user_id"],
        max_attempts=svc.settings.pairing_max_attempts,
    )
    response = jsonify(as_json(item))
    response.headers["Location"] = f"/api/v1/enrollments/{item.id}"
    return response, 201


@bp.get("")
@requires_scope("enrollments")
def list_enrollments() -> Response:
    status = request.args.get("status")
    if status is not None and status not in ("active", "ended"):
        raise BadRequest("status must be 'active' or 'ended'", code="invalid-parameter")
    limit_text = request.args.get("limit", "100")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 1000:
        raise BadRequest("limit must be a whole number from 1 to 1000", code="invalid-parameter")
    limit = int(limit_text)
    app_user_id = request.args.get("app_user_id")
    if app_user_id is not None and not enrollment.APP_USER_ID.fullmatch(app_user_id):
        raise BadRequest(
            "app_user_id must be 1-128 ASCII letters, digits and . _ : @ -", code="invalid-parameter"
        )
    items = enrollment.list_for_vendor(
        services.current().db,
        vendor=current_vendor(),
        status=status,
        app_user_id=app_user_id,
        limit=limit,
        after=request.args.get("after"),
    )
    body: dict[str, Any] = {"enrollments": [as_json(e) for e in items]}
    body["next"] = str(items[-1].id) if len(items) == limit else None
    return jsonify(body)


@bp.get("/<enrollment_id>")
@requires_scope("enrollments")
def get(enrollment_id: str) -> Response:
    item = enrollment.get_for_vendor(
        services.current().db, vendor=current_vendor(), enrollment_id=enrollment_id
    )
    return jsonify(as_json(item))


@bp.delete("/<enrollment_id>")
@requires_scope("enrollments")
def end(enrollment_id: str) -> Response:
    """End the enrollment: the app user's data is refused from now on."""
    vendor = current_vendor()
    item = enrollment.end(
        services.current().db,
        enrollment_id=enrollment_id,
        actor_type="vendor",
        actor_id=vendor.client_id,
        vendor=vendor,
    )
    return jsonify(as_json(item))
