"""FHIR R4 models: the only module in the project that imports ``fhir.resources``.

``fhir.resources`` 8 defaults to R5, which EHRs do not speak. Its R4B models match R4 (4.0.1) for
every element we emit; the one trap is elements that exist only in R4B, which callers must never
set (the mapping golden tests compare exact JSON, so such an element would show up there).
Everything else in the project validates and parses FHIR through these names.
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.codesystem import CodeSystem
from fhir.resources.R4B.fhirresourcemodel import FHIRResourceModel
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.questionnaire import Questionnaire
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse
from pydantic import ValidationError

FHIR_VERSION = "4.0.1"

__all__ = [
    "FHIR_VERSION",
    "Bundle",
    "CodeSystem",
    "FHIRResourceModel",
    "Observation",
    "OperationOutcome",
    "Questionnaire",
    "QuestionnaireResponse",
    "ValidationError",
    "model_class",
    "validate_resource",
]


def model_class(resource_type: str) -> type[FHIRResourceModel]:
    """The R4B model for a resource type name; ``KeyError`` if FHIR has no such resource type."""
    try:
        cls = get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError, ImportError) as exc:
        raise KeyError(resource_type) from exc
    if not issubclass(cls, FHIRResourceModel):
        raise KeyError(resource_type)  # a datatype name (e.g. "Quantity"), not a resource
    return cls


def validate_resource(data: dict[str, Any]) -> FHIRResourceModel:
    """Full structural validation of one resource dict; raises ``ValidationError`` or ``KeyError``."""
    resource_type = data.get("resourceType")
    if not isinstance(resource_type, str):
        raise KeyError("resourceType")
    return model_class(resource_type).model_validate(data)
