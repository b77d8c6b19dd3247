"""The "EHR chart": a patient list whose buttons launch registered apps inside the chart, as an EHR does.

A launch creates a launch context (patient, their latest encounter, the signed-in practitioner)
and opens the app's launch URL with ``iss`` and ``launch`` in an iframe under a patient banner.
The sandbox's clinician is the first seeded practitioner; there is no password (dev/demo only).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, Response, render_template, request
from sqlalchemy import select

from fhir_bridge.errors import NotFound
from fhir_bridge.sandbox import runtime, web
from fhir_bridge.sandbox.admin import new_launch
from fhir_bridge.sandbox.models import SandboxClient

bp = Blueprint("sandbox_chart", __name__)


@bp.get("/")
def patient_list() -> Response:
    sandbox = runtime.current()
    with sandbox.db.read() as session:
        apps = session.scalars(select(SandboxClient).order_by(SandboxClient.name)).all()
        people = web.practitioners(session, sandbox.store)
        html = render_template(
            "sandbox/chart.html",
            patients=web.patients(session, sandbox.store),
            apps=[a for a in apps if a.launch_url],
            standalone_apps=[a for a in apps if a.standalone_url],
            user=people[0] if people else None,
            csrf_token=web.csrf_token(),
        )
    return Response(html, mimetype="text/html")


@bp.post("/chart/<patient_id>/launch")
def launch(patient_id: str) -> Response:
    """The EHR launch: a fresh launch context, then the app framed under the patient banner."""
    web.check_csrf()
    sandbox = runtime.current()
    with sandbox.db.write() as session:
        client = session.get(SandboxClient, request.form.get("client_id", ""))
        if client is None or not client.launch_url:
            raise NotFound("That app is not registered with a launch URL.", code="unknown-app")
        patients = {p.id: p for p in web.patients(session, sandbox.store)}
        if patient_id not in patients:
            raise NotFound("There is no such patient in the sandbox.", code="unknown-patient")
        context = new_launch(session, client, patient_id=patient_id)
        practitioners = {p.id: p for p in web.practitioners(session, sandbox.store)}
        app_name, launch_url = client.name, context["launch_url"]
    parts = urlsplit(launch_url)
    html = render_template(
        "sandbox/app_frame.html",
        app={"name": app_name},
        patient=patients[patient_id],
        encounter=context["encounter"],
        user=practitioners[context["practitioner"]],
        src=launch_url,
    )
    response = Response(html, mimetype="text/html")
    # The frame navigates between the app and our authorize endpoint during the launch: both allowed.
    response.headers["Content-Security-Policy"] = web.csp(
        frame_src=["'self'", f"{parts.scheme}://{parts.netloc}"]
    )
    return response
