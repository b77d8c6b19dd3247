"""Delivery to the EHR: the outbox worker, its claiming and bookkeeping, and the per-EHR write strategies."""

from fhir_bridge.delivery.worker import BackgroundWorker, Policy, Worker

__all__ = ["BackgroundWorker", "Policy", "Worker"]
