"""FHIR push for vendors that already speak FHIR, the CapabilityStatement, and the Questionnaire catalogue."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("fhir", __name__, url_prefix="/fhir")
