"""fhir-bridge: carries what mental-health apps collect into hospital EHRs through FHIR R4."""

from fhir_bridge.app import create_app

__all__ = ["create_app"]
