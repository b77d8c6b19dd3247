"""The production :class:`~smart_app.ehr.EhrReader`: the project's FHIR client with the launch's token."""

from __future__ import annotations

from smart_app.ehr import EhrReader
from smart_app.session import LaunchContext


def client_reader(ctx: LaunchContext) -> EhrReader:
    raise NotImplementedError("waiting for fhir_bridge.fhir_client (issue 5)")
