"""Declarative mappings from app data to FHIR R4 resources, and the engine that loads them."""
