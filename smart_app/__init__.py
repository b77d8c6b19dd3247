"""The clinician-facing SMART on FHIR app: EHR and standalone launch, and the patient dashboard.

``init_app(app)`` registers the blueprint and what it keeps per process; ``create_app`` calls it.
The EHR is read through a reader factory (the project's FHIR client with the launch's token), which
tests may replace with one that fakes the EHR at the transport.
"""

from __future__ import annotations

from smart_app.views import bp, init_app

__all__ = ["bp", "init_app"]
