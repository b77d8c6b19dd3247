"""Helpers that start real components for the tests (PostgreSQL, the third-party FHIR server, ...)."""
