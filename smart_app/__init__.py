"""The clinician-facing SMART on FHIR app: EHR and standalone launch, and the patient dashboard."""
