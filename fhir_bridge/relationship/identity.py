"""Identifiers of the resources the relationship writes: deterministic, short, valid FHIR ids."""

from __future__ import annotations

import hashlib

from mappings.identity import CANONICAL

CONSENT_SYSTEM = f"{CANONICAL}/sid/consent"
GOAL_SYSTEM = f"{CANONICAL}/sid/goal"
TASK_SYSTEM = f"{CANONICAL}/sid/care-task"
MESSAGE_SYSTEM = f"{CANONICAL}/sid/message"


def ident(*parts: str) -> str:
    """32 hex characters of SHA-256 over the parts: the same inputs always give the same identifier."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
