"""The clinician dashboard: its page, the JSON it draws from, and the actions a clinician takes.

Every route takes the launch id from the URL and checks it against the browser's session
(:func:`smart_app.session.load`), so the patient is always the one this launch was granted. Reads go
to the EHR with the clinician's token; a panel whose search fails says so and the others still show.
Writes (follow-up requests) go through the outbox, which gives them the same no-loss,
no-duplicate delivery as vendor data; state-changing requests need the page's CSRF token.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import re
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import orjson
from flask import Response, render_template, request
from sqlalchemy import select

from auth.smart_launch import can_read
from fhir_bridge import audit, services
from fhir_bridge.errors import BadRequest, Conflict, NotFound, Unprocessable
from fhir_bridge.rules import engine as rules_engine
from fhir_bridge.storage.models import Alert, OutboxItem, utcnow
from mappings.identity import CANONICAL
from smart_app import prescribe, summary, web
from smart_app import session as launch_session
from smart_app.ehr import EhrReader, EhrReadError
from smart_app.session import LaunchContext, SessionExpired

log = logging.getLogger(__name__)

PAGE_SIZE = "1000"
FOLLOW_UP_SYSTEM = CANONICAL + "/sid/follow-up"  # same convention as mappings.identity
FOLLOW_UP_REASONS = {
    "no-response": "No response to treatment",
    "worsening": "Symptoms worsening",
    "disengaged": "Not using the app",
    "alliance-drop": "Alliance with the app dropping",
    "safety": "Safety concern",
    "other": "Other",
}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

ReaderFactory = Callable[[LaunchContext], EhrReader]


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status=status, mimetype="application/json")


# -- page -------------------------------------------------------------------------------------


def page(launch_id: str) -> str:
    ctx = launch_session.load(launch_id)
    svc = services.current()
    return render_template(
        "smart/dashboard.html",
        ctx=ctx,
        csrf=web.csrf_token(svc.secret_key, ctx.launch_id),
        api=svc.settings.url(f"/app/{ctx.launch_id}/api"),
    )


# -- reading the EHR --------------------------------------------------------------------------


def _problem(panel: str, what: str, exc: EhrReadError) -> dict[str, Any]:
    status = f" (HTTP {exc.status})" if exc.status else ""
    return {
        "panel": panel,
        "code": "ehr-search-failed",
        "message": f"The EHR did not return {what}{status}. The other panels are complete; "
        "reload in a minute, and tell hospital IT if it keeps happening.",
    }


def _patient_banner(reader: EhrReader, ctx: LaunchContext) -> dict[str, Any]:
    resource = reader.read("Patient", ctx.patient_id)
    if resource.get("resourceType") != "Patient" or resource.get("id") != ctx.patient_id:
        raise EhrReadError("the EHR returned another resource than the launched patient")
    names = resource.get("name") or []
    name = next((n for n in names if isinstance(n, dict) and n.get("use") == "official"), None)
    name = name or (names[0] if names and isinstance(names[0], dict) else {})
    text = name.get("text")
    if not isinstance(text, str) or not text:
        given = " ".join(g for g in name.get("given") or [] if isinstance(g, str))
        family = name.get("family") if isinstance(name.get("family"), str) else ""
        text = f"{given} {family}".strip()
    birth = resource.get("birthDate")
    gender = resource.get("gender")
    return {
        "name": text[:200] or "(no name on record)",
        "birthDate": birth if isinstance(birth, str) and len(birth) <= 10 else None,
        "gender": gender if isinstance(gender, str) and len(gender) <= 20 else None,
    }


def build_summary(ctx: LaunchContext, reader: EhrReader) -> dict[str, Any]:
    """Everything the dashboard draws, read from the EHR for the launched patient only."""
    problems: list[dict[str, Any]] = []
    pid = ctx.patient_id
    foreign = [0]

    def observations() -> summary.ObservationDigest:
        pages = reader.search("Observation", {"patient": pid, "_count": PAGE_SIZE})
        return summary.digest_observations(pages, patient_id=pid, fhir_base=ctx.fhir_base)

    def flags() -> list[dict[str, Any]]:
        # R4 defines no `status` search parameter for Flag: active ones are picked out below.
        pages = reader.search("Flag", {"patient": pid, "_count": "100"})
        return summary.alert_items(
            pages, kind="Flag", patient_id=pid, fhir_base=ctx.fhir_base, foreign=foreign
        )

    def tasks() -> list[dict[str, Any]]:
        pages = reader.search("Task", {"patient": pid, "_count": "100"})
        return summary.alert_items(
            pages, kind="Task", patient_id=pid, fhir_base=ctx.fhir_base, foreign=foreign
        )

    jobs: dict[str, Callable[[], Any]] = {}
    if can_read(ctx.scope, "Observation"):
        jobs["observations"] = observations
    else:
        problems.append(
            {
                "panel": "all",
                "code": "not-permitted",
                "message": "The EHR did not grant this app access to the patient's observations, so no "
                "trends can be shown. Hospital IT should compare the app's scopes with /registration.",
            }
        )
    if can_read(ctx.scope, "Flag"):
        jobs["flags"] = flags
    if can_read(ctx.scope, "Task"):
        jobs["tasks"] = tasks
    if can_read(ctx.scope, "Patient"):
        jobs["patient"] = lambda: _patient_banner(reader, ctx)

    results: dict[str, Any] = {}
    what = {
        "observations": ("trends", "the patient's observations"),
        "flags": ("alerts", "the patient's flags"),
        "tasks": ("alerts", "the patient's tasks"),
        "patient": ("banner", "the patient's name"),
    }
    # The searches are independent; running them side by side keeps server time near the slowest one.
    with ThreadPoolExecutor(max_workers=4) as pool:
        # Each job runs in a copy of this request's context (Flask keeps its app context in contextvars).
        futures = {name: pool.submit(contextvars.copy_context().run, job) for name, job in jobs.items()}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except EhrReadError as exc:
                if exc.unauthorized:
                    raise SessionExpired(
                        "The EHR session for this dashboard has expired. Open the app again from the "
                        "patient's chart."
                    ) from None
                log.warning("ehr read failed", extra={"tenant": ctx.tenant_id, "http_status": exc.status})
                panel, label = what[name]
                problems.append(_problem(panel, label, exc))

    digest: summary.ObservationDigest = results.get("observations") or summary.ObservationDigest()
    foreign[0] += digest.foreign
    if foreign[0]:
        # Never shown, always noticed: an EHR that answers a patient search with another patient's data.
        log.warning(
            "dropped resources of another patient", extra={"tenant": ctx.tenant_id, "count": foreign[0]}
        )
    phq9 = digest.series.get("phq9", summary.Series())
    gad7 = digest.series.get("gad7", summary.Series())
    return {
        "patient": results.get("patient"),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "series": summary.to_json_series(digest),
        "markers": {
            "phq9": summary.phq9_markers(phq9),
            "gad7": {
                "latest": {
                    "t": gad7.t[-1],
                    "v": gad7.v[-1],
                    "band": summary.band(gad7.v[-1], summary.GAD7_BANDS),
                }
            }
            if gad7.t
            else {},
        },
        "bands": {"phq9": summary.PHQ9_BANDS, "gad7": summary.GAD7_BANDS},
        "engagement": summary.engagement(digest, today=summary.today_utc()),
        "alerts": {
            "ehr": (results.get("flags") or []) + (results.get("tasks") or []),
            "bridge": open_alerts(ctx),
        },
        "enrollment": prescribe.status(ctx),
        "problems": problems,
        "dropped": {"other_patient": foreign[0], "unreadable": digest.unreadable},
    }


def open_alerts(ctx: LaunchContext) -> list[dict[str, Any]]:
    with services.current().db.transaction() as session:
        rows = session.scalars(
            select(Alert)
            .where(
                Alert.tenant_id == ctx.tenant_id, Alert.patient_id == ctx.patient_id, Alert.status == "open"
            )
            .order_by(Alert.fired_at.desc())
        ).all()
        return [
            {
                "id": str(row.id),
                "rule": row.rule_id,
                "priority": row.priority,
                "reason": row.reason[:500],
                "at": row.fired_at.timestamp() * 1000,
            }
            for row in rows
        ]


def data(launch_id: str, make_reader: ReaderFactory) -> Response:
    ctx = launch_session.load(launch_id)
    # A token check up front: an expired session is one clear answer, not four failed panels.
    launch_session.access_token(ctx)
    return json_response(build_summary(ctx, make_reader(ctx)))


# -- actions ----------------------------------------------------------------------------------


def json_body() -> dict[str, Any]:
    if request.mimetype != "application/json":
        raise BadRequest("Send the action as JSON.", code="unsupported-media-type")
    try:
        body = orjson.loads(request.get_data(cache=False))
    except orjson.JSONDecodeError:
        raise BadRequest("The action's body is not valid JSON.", code="invalid-json") from None
    if not isinstance(body, dict):
        raise BadRequest("The action's body must be a JSON object.", code="invalid-json")
    return body


def acknowledge(launch_id: str, alert_id: str) -> Response:
    ctx = launch_session.load(launch_id)
    svc = services.current()
    web.check_csrf(svc.secret_key, ctx.launch_id, svc.settings.public_url)
    with svc.db.transaction() as session:
        try:
            alert = session.get(Alert, uuid.UUID(alert_id), with_for_update=True)
        except ValueError:
            alert = None
        # Another patient's or tenant's alert is "not found", never "forbidden" (no oracle).
        if alert is None or alert.tenant_id != ctx.tenant_id or alert.patient_id != ctx.patient_id:
            raise NotFound("There is no such alert for this patient.", code="alert-not-found")
        if alert.status != "open":
            raise Conflict("This alert was already acknowledged.", code="alert-not-open")
        alert.status = "acknowledged"
        alert.acknowledged_at = utcnow()
        alert.acknowledged_by = ctx.actor[:255]
        # The EHR side: Flag inactive / Task completed, through the outbox (fhir_bridge.rules).
        rules_engine.acknowledged(session, alert, alert.acknowledged_at)
        audit.record(
            session,
            actor_type="user",
            actor_id=ctx.actor[:255],
            action="alert.acknowledge",
            tenant_id=ctx.tenant_id,
            patient_id=ctx.patient_id,
            target=f"alert/{alert.id}",
            detail={"rule": alert.rule_id[:100]},
        )
    log.info("alert acknowledged", extra={"tenant": ctx.tenant_id, "alert": alert_id})
    return json_response({"id": alert_id, "status": "acknowledged"})


def follow_up_task(ctx: LaunchContext, *, reason: str, note: str, ident_value: str) -> dict[str, Any]:
    label = FOLLOW_UP_REASONS[reason]
    task: dict[str, Any] = {
        "resourceType": "Task",
        "identifier": [{"system": FOLLOW_UP_SYSTEM, "value": ident_value}],
        "status": "requested",
        "intent": "order",
        "priority": "urgent" if reason == "safety" else "routine",
        "code": {"text": "Schedule follow-up visit"},
        "description": f"Schedule a follow-up visit: {label}.",
        "for": {"reference": f"Patient/{ctx.patient_id}"},
        "authoredOn": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if ctx.fhir_user and ctx.fhir_user.split("/")[0] in {"Practitioner", "PractitionerRole"}:
        task["requester"] = {"reference": ctx.fhir_user}
    if note:
        task["note"] = [{"text": note}]
    return task


def request_follow_up(launch_id: str) -> Response:
    """Queue a ``Task`` "schedule follow-up visit" for the EHR; the same request id never queues twice."""
    ctx = launch_session.load(launch_id)
    svc = services.current()
    web.check_csrf(svc.secret_key, ctx.launch_id, svc.settings.public_url)
    body = json_body()
    reason = body.get("reason")
    if reason not in FOLLOW_UP_REASONS:
        raise Unprocessable(
            "Choose a reason for the follow-up: " + ", ".join(FOLLOW_UP_REASONS) + ".", code="invalid-reason"
        )
    note = body.get("note") or ""
    if not isinstance(note, str) or len(note) > 500:
        raise Unprocessable("The note must be text of at most 500 characters.", code="invalid-note")
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
        raise Unprocessable("The request has no valid request_id.", code="invalid-request-id")
    ident_value = hashlib.sha256(f"{ctx.launch_id}|{request_id}".encode()).hexdigest()[:40]
    task = follow_up_task(ctx, reason=reason, note=note.strip(), ident_value=ident_value)
    with svc.db.transaction() as session:
        existing = session.scalar(
            select(OutboxItem).where(
                OutboxItem.tenant_id == ctx.tenant_id,
                OutboxItem.resource_type == "Task",
                OutboxItem.ident_system == FOLLOW_UP_SYSTEM,
                OutboxItem.ident_value == ident_value,
            )
        )
        if existing is None:
            audit.record(
                session,
                actor_type="user",
                actor_id=ctx.actor[:255],
                action="follow-up.request",
                tenant_id=ctx.tenant_id,
                patient_id=ctx.patient_id,
                target=f"Task?identifier={ident_value}",
                detail={"reason": reason},
            )
            session.add(
                OutboxItem(
                    tenant_id=ctx.tenant_id,
                    record_id=None,
                    group_key=ident_value,
                    resource_type="Task",
                    ident_system=FOLLOW_UP_SYSTEM,
                    ident_value=ident_value,
                    body=orjson.dumps(task),
                    priority=0,
                )
            )
    log.info("follow-up requested", extra={"tenant": ctx.tenant_id})
    return json_response(
        {"status": "queued", "identifier": ident_value}, status=202 if existing is None else 200
    )
