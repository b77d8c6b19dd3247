"""The sandbox EHR: a SMART on FHIR authorization server, a FHIR R4 endpoint and a chart page.

DEVELOPMENT AND DEMO ONLY. It holds synthetic patients, signs people in without passwords, and
has switches that make it misbehave on purpose (fault injection). It exists so that
``fhir-bridge demo`` and the browser tests can launch the app from an "EHR" the way a hospital's
EHR would, and so the product can be tested against an EHR that answers correctly (and, on
demand, incorrectly). It is a separate WSGI application on its own port with its own database
file; the service never imports it.
"""

from fhir_bridge.sandbox.app import create_sandbox_app
from fhir_bridge.sandbox.runtime import SandboxConfig

__all__ = ["SandboxConfig", "create_sandbox_app"]
