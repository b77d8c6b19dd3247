"""SMART scopes: parsing both syntaxes, narrowing a request to what an app may have, and what a grant allows.

v2 (SMART 2.x): ``patient/Observation.rs``, ``user/*.cruds``, ``patient/Observation.rs?category=survey``.
v1 (SMART 1.0): ``patient/Observation.read`` means ``.rs``, ``.write`` ``.cud``, ``.*`` ``.cruds``.
(http://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

LEVELS = ("patient", "user", "system")
_RESOURCE_SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]{1,63})\.([a-z*]+)(\?.*)?$")
_V2_LETTERS = re.compile(r"^c?r?u?d?s?$")
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}

# Scopes that are not about resources: what the app may learn (context, identity) and keep (refresh).
CONTEXT_SCOPES = frozenset(
    {
        "launch",
        "launch/patient",
        "launch/encounter",
        "openid",
        "fhirUser",
        "profile",
        "offline_access",
        "online_access",
    }
)


class ScopeError(ValueError):
    """A scope that looks like a resource scope but is malformed (e.g. ``patient/Observation.sr``)."""


@dataclass(frozen=True)
class ResourceScope:
    level: str
    resource_type: str
    permissions: frozenset[str]
    constraint: tuple[tuple[str, str], ...]
    text: str

    def covers(self, other: ResourceScope) -> bool:
        """Whether holding ``self`` is enough to be granted ``other``."""
        return (
            self.level == other.level
            and self.resource_type in ("*", other.resource_type)
            and other.permissions <= self.permissions
            and set(self.constraint) <= set(other.constraint)
        )


def parse_resource_scope(text: str) -> ResourceScope | None:
    """The resource scope ``text`` names, None if it is not a resource scope at all."""
    if "/" not in text or text.split("/", 1)[0] not in LEVELS:
        return None
    match = _RESOURCE_SCOPE.match(text)
    if not match:
        raise ScopeError(f"malformed scope {text[:80]!r}")
    level, resource_type, perms, query = match.groups()
    if perms in _V1:
        letters = _V1[perms]
    elif _V2_LETTERS.match(perms) and perms:
        letters = perms
    else:
        raise ScopeError(
            f"scope {text[:80]!r}: permissions must be read, write, * or letters of cruds in order"
        )
    constraint: tuple[tuple[str, str], ...] = ()
    if query:
        try:
            pairs = parse_qsl(query[1:], keep_blank_values=False, strict_parsing=True)
        except ValueError:
            raise ScopeError(f"scope {text[:80]!r}: malformed constraint") from None
        constraint = tuple(sorted(pairs))
    return ResourceScope(level, resource_type, frozenset(letters), constraint, text)


def split(scope: str | None) -> list[str]:
    seen: list[str] = []
    for item in (scope or "").split():
        if item not in seen:
            seen.append(item)
    return seen


def narrow(requested: Iterable[str], allowed: Iterable[str], *, levels: Iterable[str]) -> list[str]:
    """The requested scopes this app may have at these levels, in the requested (v1 or v2) form.

    Scopes it may not have are dropped rather than refused, as SMART lets an EHR grant less than asked.
    """
    levels = set(levels)
    allowed = list(allowed)
    allowed_resource = [s for s in (_safe_parse(a) for a in allowed) if s is not None]
    granted: list[str] = []
    for text in requested:
        parsed = parse_resource_scope(text)
        if parsed is None:
            ok = text in allowed and text in CONTEXT_SCOPES
        else:
            ok = parsed.level in levels and any(a.covers(parsed) for a in allowed_resource)
        if ok and text not in granted:
            granted.append(text)
    return granted


def _safe_parse(text: str) -> ResourceScope | None:
    try:
        return parse_resource_scope(text)
    except ScopeError:
        return None


@dataclass(frozen=True)
class Rule:
    """One way a grant allows an interaction: in one patient's compartment or not, maybe constrained."""

    patient: str | None
    constraint: tuple[tuple[str, str], ...] = ()

    @property
    def unrestricted(self) -> bool:
        return self.patient is None and not self.constraint


class Grant:
    """What one access token allows: its scopes, read against the patient it was launched with."""

    def __init__(self, scope: str, *, patient: str | None) -> None:
        self.scope = scope
        self.patient = patient
        self.resource_scopes = [s for s in (_safe_parse(t) for t in split(scope)) if s is not None]

    def rules(self, resource_type: str, interaction: str) -> list[Rule]:
        """Empty when nothing in the grant allows ``interaction`` (one of c, r, u, d, s) on the type."""
        rules: list[Rule] = []
        for s in self.resource_scopes:
            if s.resource_type not in ("*", resource_type) or interaction not in s.permissions:
                continue
            if s.level == "patient":
                if self.patient is None:
                    continue  # a patient scope without a patient in context grants nothing
                rules.append(Rule(self.patient, s.constraint))
            else:
                rules.append(Rule(None, s.constraint))
        if any(r.unrestricted for r in rules):
            return [Rule(None)]
        return rules
