"""Native push and delivery status routes (thin: the work is in fhir_bridge.push and fhir_bridge.status)."""

from __future__ import annotations

import threading
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from fhir_bridge import services, status
from fhir_bridge.api.common import current_vendor, read_json, requires_scope, vendor_gate
from fhir_bridge.errors import BadRequest
from fhir_bridge.push import Mapper, check_idempotency_key, push

bp = Blueprint("records", __name__, url_prefix="/api/v1")

MAPPER_KEY = "fhir_bridge.mapper"
# live: delivered as soon as possible. backfill: a patient's history (months of records at
# enrollment), delivered after every live item, in large Bundles, at the EHR's backfill rate limit.
PUSH_MODES = frozenset({"live", "backfill"})
_mapper_lock = threading.Lock()


def mapper() -> Mapper:
    """The mapping catalogue, loaded on first use and then shared by every request of this process."""
    found = current_app.extensions.get(MAPPER_KEY)
    if found is None:
        with _mapper_lock:
            found = current_app.extensions.get(MAPPER_KEY)
            if found is None:
                found = current_app.extensions[MAPPER_KEY] = Mapper(services.current().settings)
    assert isinstance(found, Mapper)
    return found


@bp.post("/records")
@requires_scope("records.write", in_transaction=True)
def push_records() -> Response:
    """A batch of 1..MAX_BATCH_RECORDS native records; one result per record, in order."""
    key = check_idempotency_key(request.headers.get("Idempotency-Key"))
    mode = request.args.get("mode", "live")
    if mode not in PUSH_MODES:
        raise BadRequest(
            f"Unknown mode {mode[:40]!r}: use mode=live (the default) or mode=backfill for history.",
            code="invalid-mode",
        )
    body: Any = read_json("application/json")
    limit = services.current().settings.max_batch_records
    if not isinstance(body, dict) or set(body) != {"records"} or not isinstance(body["records"], list):
        raise BadRequest('The body must be {"records": [ ... ]} and nothing else.', code="invalid-batch")
    records = body["records"]
    if not records:
        raise BadRequest("The batch is empty; send 1 or more records.", code="empty-batch")
    if len(records) > limit:
        raise BadRequest(
            f"The batch has {len(records)} records; at most {limit} are accepted per request. Split it.",
            code="batch-too-large",
        )
    outcome = push(
        services.current().db,
        mapper(),
        vendor=current_vendor(),
        records=records,
        body=request.get_data(cache=True),
        idempotency_key=key,
        backfill=mode == "backfill",
        gate=vendor_gate(),
    )
    response = Response(outcome.body, status=outcome.status, mimetype="application/json")
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.get("/submissions/<submission_id>")
@requires_scope("records.read")
def get_submission(submission_id: str) -> Response:
    return jsonify(
        status.submission(services.current().db, vendor=current_vendor(), submission_id=submission_id)
    )


@bp.get("/records/<record_id>")
@requires_scope("records.read")
def get_record(record_id: str) -> Response:
    return jsonify(status.record(services.current().db, vendor=current_vendor(), record_id=record_id))
