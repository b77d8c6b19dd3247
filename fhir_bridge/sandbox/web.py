"""Helpers for the sandbox's HTML pages: CSRF tokens, the Content-Security-Policy, and chart look-ups."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import orjson
from flask import g, request, session
from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_bridge.errors import Forbidden
from fhir_bridge.sandbox.models import SearchEntry, StoredResource
from fhir_bridge.sandbox.store import FhirStore

BANNER = "Synthetic data for development and demos only. Not for clinical use."


def csp_nonce() -> str:
    nonce = g.get("csp_nonce")
    if not isinstance(nonce, str):
        nonce = secrets.token_urlsafe(16)
        g.csp_nonce = nonce
    return nonce


def csp(*, frame_src: list[str] | None = None, form_action: list[str] | None = None) -> str:
    """No third-party anything: our own styles (by nonce), our own forms, frames only for launched apps."""
    frames = " ".join(frame_src or []) or "'none'"
    forms = " ".join(["'self'", *(form_action or [])])
    return (
        f"default-src 'none'; style-src 'nonce-{csp_nonce()}'; img-src 'self' data:; "
        f"form-action {forms}; frame-src {frames}; frame-ancestors 'self'; base-uri 'none'"
    )


def csrf_token() -> str:
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def check_csrf() -> None:
    sent = request.form.get("csrf_token", "")
    expected = session.get("csrf")
    if not isinstance(expected, str) or not secrets.compare_digest(sent.encode(), expected.encode()):
        raise Forbidden(
            "This form has expired or did not come from the sandbox. Reload the page and try again.",
            code="csrf-failed",
        )


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    birth_date: str
    gender: str
    mrn: str


def _name(resource: dict[str, Any]) -> str:
    for name in resource.get("name") or []:
        if name.get("text"):
            return str(name["text"])
        parts = [*name.get("prefix", []), *name.get("given", []), name.get("family", "")]
        text = " ".join(p for p in parts if p)
        if text:
            return text
    return str(resource.get("id", "?"))


def _person(resource: dict[str, Any]) -> Person:
    mrn = next(
        (i.get("value", "") for i in resource.get("identifier") or [] if "mrn" in str(i.get("system", ""))),
        "",
    )
    return Person(
        id=resource["id"],
        name=_name(resource),
        birth_date=resource.get("birthDate", ""),
        gender=resource.get("gender", ""),
        mrn=mrn,
    )


def _all(session: Session, resource_type: str) -> list[dict[str, Any]]:
    bodies = session.scalars(
        select(StoredResource.body)
        .where(StoredResource.res_type == resource_type)
        .order_by(StoredResource.res_id)
    )
    return [orjson.loads(b) for b in bodies]


def patients(session: Session, store: FhirStore) -> list[Person]:
    people = [_person(r) for r in _all(session, "Patient")]
    return sorted(people, key=lambda p: [*p.name.split()[-1:], p.name])


def practitioners(session: Session, store: FhirStore) -> list[Person]:
    return [_person(r) for r in _all(session, "Practitioner")]


def latest_encounter(session: Session, patient_id: str) -> str | None:
    """The patient's most recently started encounter, the one an EHR launch puts in context."""
    S = SearchEntry
    in_progress = select(S.res_id).where(
        S.res_type == "Encounter", S.param == "patient", S.code == patient_id
    )
    dated = (
        select(S.res_id)
        .where(S.res_type == "Encounter", S.param == "date", S.res_id.in_(in_progress))
        .order_by(S.lo.desc(), S.res_id)
        .limit(1)
    )
    found = session.scalar(dated)
    if found is None:
        found = session.scalar(in_progress.limit(1))
    return found
