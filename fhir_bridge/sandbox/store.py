"""The sandbox's FHIR store: resources as JSON rows, a search index, and the FHIR REST semantics on top.

It implements what a correct R4 server does for the interactions fhir-bridge uses: create (with
``If-None-Exist``), read, update (update-as-create), search with paging, and transaction/batch
Bundles (``urn:uuid:`` references resolved, ``ifNoneExist`` honoured, all-or-nothing for
transactions). Every write is validated with the R4 models and checked for references to
resources that do not exist. Access control is not decided here: callers pass the rules of the
token (:class:`fhir_bridge.sandbox.scopes.Grant`), and the store applies them in SQL, so a search
can never return, and a write can never create, something outside them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode

import orjson
from sqlalchemy import (
    ColumnElement,
    SQLColumnExpression,
    and_,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.orm import Session

from fhir_bridge.errors import BadRequest, BridgeError, Forbidden, NotFound, Unprocessable
from fhir_bridge.sandbox.fhirdates import DateFormatError, instant, micros, parse_range
from fhir_bridge.sandbox.models import SearchEntry, StoredResource
from fhir_bridge.sandbox.scopes import Rule
from fhir_bridge.sandbox.searchparams import (
    COMPARTMENT,
    MAX_US,
    PRIMARY_DATE,
    SUPPORTED_TYPES,
    SearchParam,
    index_rows,
    normalise_string,
    param,
    params_of,
    reference_key,
)
from mappings.fhir_models import ValidationError, validate_resource

ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
DEFAULT_COUNT = 50
MAX_COUNT = 1000
MAX_BUNDLE_ENTRIES = 5000

# Parameters that shape the result rather than filter it.
RESULT_PARAMS = frozenset({"_count", "_sort", "_offset", "_total", "_summary", "_format", "_pretty"})

# Required bindings on `status`-like elements: the R4 models do not check codes, a real EHR does.
REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Observation", "status"): frozenset(
        {
            "registered",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    ("QuestionnaireResponse", "status"): frozenset(
        {"in-progress", "completed", "amended", "entered-in-error", "stopped"}
    ),
    ("Flag", "status"): frozenset({"active", "inactive", "entered-in-error"}),
    ("Task", "status"): frozenset(
        {
            "draft",
            "requested",
            "received",
            "accepted",
            "rejected",
            "ready",
            "cancelled",
            "in-progress",
            "on-hold",
            "failed",
            "completed",
            "entered-in-error",
        }
    ),
    ("Task", "intent"): frozenset(
        {
            "unknown",
            "proposal",
            "plan",
            "order",
            "original-order",
            "reflex-order",
            "filler-order",
            "instance-order",
            "option",
        }
    ),
    ("Goal", "lifecycleStatus"): frozenset(
        {
            "proposed",
            "planned",
            "accepted",
            "active",
            "on-hold",
            "completed",
            "cancelled",
            "entered-in-error",
            "rejected",
        }
    ),
    ("Communication", "status"): frozenset(
        {
            "preparation",
            "in-progress",
            "not-done",
            "on-hold",
            "stopped",
            "completed",
            "entered-in-error",
            "unknown",
        }
    ),
    ("Consent", "status"): frozenset(
        {"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}
    ),
    ("Encounter", "status"): frozenset(
        {
            "planned",
            "arrived",
            "triaged",
            "in-progress",
            "onleave",
            "finished",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    ("Questionnaire", "status"): frozenset({"draft", "active", "retired", "unknown"}),
}


class Access(Protocol):
    """What the caller may do: the rules of its token (see :class:`fhir_bridge.sandbox.scopes.Grant`)."""

    def rules(self, resource_type: str, interaction: str) -> list[Rule]: ...


class FullAccess:
    """The EHR itself (seeding, the chart page): everything, unrestricted."""

    def rules(self, resource_type: str, interaction: str) -> list[Rule]:
        return [Rule(None)]


def now_utc() -> datetime:
    return datetime.now(UTC)


class PreconditionFailed(BridgeError):
    status, code = 412, "precondition-failed"


class NotAcceptable(BridgeError):
    status, code = 406, "not-acceptable"


@dataclass
class WriteOutcome:
    status: int  # 201 created, 200 matched (conditional create) or updated
    resource: dict[str, Any]

    @property
    def created(self) -> bool:
        return self.status == 201

    @property
    def location(self) -> str:
        r = self.resource
        return f"{r['resourceType']}/{r['id']}/_history/{r['meta']['versionId']}"

    @property
    def etag(self) -> str:
        return f'W/"{self.resource["meta"]["versionId"]}"'

    @property
    def last_modified(self) -> str:
        return str(self.resource["meta"]["lastUpdated"])


@dataclass
class Criterion:
    name: str
    modifier: str | None
    values: list[str]
    spec: SearchParam | None  # None for _id and _lastUpdated


@dataclass
class SearchQuery:
    resource_type: str
    criteria: list[Criterion] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    offset: int = 0
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (param, descending)
    # auto: a total on the first page (counting on every page of a long search costs as much again);
    # accurate: on every page; none: never.
    total: str = "auto"
    summary_count: bool = False
    # The filtering parameters as given (normalised order), for the Bundle's self and next links.
    echo: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class SearchPage:
    query: SearchQuery
    total: int | None
    rows: list[tuple[str, str, str]]  # (type, id, body json)
    has_more: bool


def validation_outcome(resource_type: str, exc: ValidationError, prefix: str) -> dict[str, Any]:
    """An OperationOutcome with one issue per problem, each naming the element (FHIRPath-style)."""
    issues = []
    for error in exc.errors()[:50]:
        path = prefix or resource_type
        for part in error.get("loc", ()):
            if isinstance(part, int):
                path += f"[{part}]"
            elif part not in ("__root__",):
                path += f".{part}"
        issues.append(
            {
                "severity": "error",
                "code": "structure" if error.get("type") == "extra_forbidden" else "value",
                "diagnostics": f"{path}: {error.get('msg', 'invalid')}",
                "expression": [path],
            }
        )
    return {"resourceType": "OperationOutcome", "issue": issues}


def _outcome(message: str, *, code: str, path: str | None) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": message}
    if path:
        issue["expression"] = [path]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def _walk_references(node: Any, path: str) -> Iterator[tuple[dict[str, Any], str]]:
    """Every Reference object (a dict whose ``reference`` is a string) with its element path."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node, path
        for key, value in node.items():
            if key == "contained":
                continue
            yield from _walk_references(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk_references(item, f"{path}[{i}]")


@dataclass
class _Batch:
    """Rows of new resources and their index entries, inserted together (Core executemany, no ORM)."""

    resources: list[dict[str, Any]] = field(default_factory=list)
    index: list[dict[str, Any]] = field(default_factory=list)

    def flush(self, session: Session) -> None:
        connection = session.connection()
        if self.resources:
            connection.execute(insert(StoredResource), self.resources)
        if self.index:
            connection.execute(insert(SearchEntry), self.index)
        self.resources, self.index = [], []


class FhirStore:
    """FHIR REST semantics over the sandbox tables; ``base_url`` is the FHIR base (``.../fhir``)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    # -- validation ------------------------------------------------------------------------------

    def check_type(self, resource_type: str) -> None:
        if resource_type not in SUPPORTED_TYPES:
            raise NotFound(
                f"This server does not store {resource_type[:64]!r} resources. "
                f"Supported: {', '.join(SUPPORTED_TYPES)}.",
                code="unsupported-resource-type",
            )

    def validate(self, data: Any, *, expected_type: str | None, path: str | None = None) -> dict[str, Any]:
        """The resource as a dict if it is a valid R4 resource of a type we store; 400/422 otherwise."""
        where = path or "resource"
        if not isinstance(data, dict):
            raise BadRequest(f"{where} must be a JSON object (a FHIR resource).", code="not-a-resource")
        rtype = data.get("resourceType")
        if not isinstance(rtype, str):
            raise BadRequest(f"{where} has no resourceType.", code="not-a-resource", fhir_path=path)
        if expected_type is not None and rtype != expected_type:
            raise BadRequest(
                f"{where} is a {rtype[:64]}, but the URL names {expected_type}.",
                code="resource-type-mismatch",
                fhir_path=path,
            )
        self.check_type(rtype)
        prefix = path or rtype
        try:
            validate_resource(data)
        except ValidationError as exc:
            outcome = validation_outcome(rtype, exc, prefix)
            first = outcome["issue"][0]["diagnostics"] if outcome["issue"] else "invalid resource"
            raise Unprocessable(
                f"The {rtype} is not valid FHIR R4: {first}", code="invalid-resource", details=outcome
            ) from None
        for (bound_type, element), codes in REQUIRED_CODES.items():
            value = data.get(element)
            if bound_type == rtype and value is not None and value not in codes:
                message = f"{prefix}.{element}: {str(value)[:40]!r} is not one of {', '.join(sorted(codes))}"
                raise Unprocessable(
                    message,
                    code="invalid-code",
                    details=_outcome(message, code="code-invalid", path=f"{prefix}.{element}"),
                )
        return dict(data)

    # -- reading ---------------------------------------------------------------------------------

    def get(self, session: Session, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        body = session.scalar(
            select(StoredResource.body).where(
                StoredResource.res_type == resource_type, StoredResource.res_id == resource_id
            )
        )
        return orjson.loads(body) if body is not None else None

    def exists(self, session: Session, resource_type: str, resource_id: str) -> bool:
        return (
            session.scalar(
                select(func.count())
                .select_from(StoredResource)
                .where(StoredResource.res_type == resource_type, StoredResource.res_id == resource_id)
            )
            or 0
        ) > 0

    def read(self, session: Session, resource_type: str, resource_id: str, access: Access) -> dict[str, Any]:
        """Read by id within the caller's rules: 404 if absent, 403 if outside them."""
        self.check_type(resource_type)
        rules = self._rules_or_forbid(access, resource_type, "r")
        resource = self.get(session, resource_type, resource_id)
        if resource is None:
            raise NotFound(f"{resource_type}/{resource_id[:64]} does not exist.", code="not-found")
        if not self._within(session, resource_type, resource_id, rules):
            raise Forbidden(
                f"{resource_type}/{resource_id[:64]} is outside what this access token allows "
                "(scopes and patient compartment).",
                code="outside-grant",
            )
        return resource

    def _rules_or_forbid(self, access: Access, resource_type: str, interaction: str) -> list[Rule]:
        rules = access.rules(resource_type, interaction)
        if not rules:
            verb = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}[interaction]
            raise Forbidden(
                f"The access token has no scope that allows to {verb} {resource_type} resources.",
                code="insufficient-scope",
            )
        return rules

    def _within(self, session: Session, resource_type: str, resource_id: str, rules: list[Rule]) -> bool:
        if any(r.unrestricted for r in rules):
            return True
        found = session.scalar(
            select(func.count())
            .select_from(StoredResource)
            .where(
                StoredResource.res_type == resource_type,
                StoredResource.res_id == resource_id,
                self._rules_clause(resource_type, rules),
            )
        )
        return (found or 0) > 0

    # -- searching -------------------------------------------------------------------------------

    def parse_search(
        self, resource_type: str, pairs: Sequence[tuple[str, str]], *, lenient: bool = False
    ) -> SearchQuery:
        """Check every parameter and value up front; anything unknown or malformed is a 400.

        ``lenient`` (the client sent ``Prefer: handling=lenient``) skips unknown parameters instead;
        the Bundle's self link then shows which parameters were applied, as FHIR asks.
        """
        self.check_type(resource_type)
        query = SearchQuery(resource_type)
        for raw_name, raw_value in pairs:
            name, _, modifier = raw_name.partition(":")
            value = raw_value.strip()
            if name in RESULT_PARAMS:
                self._result_param(query, name, value)
                continue
            if "." in name:
                raise BadRequest(
                    f"Chained search parameters ({raw_name[:64]}) are not supported.",
                    code="unsupported-search",
                )
            spec = param(resource_type, name)
            if spec is None and name not in ("_id", "_lastUpdated"):
                if lenient and "." not in name:
                    continue
                known = ", ".join(["_id", "_lastUpdated", *(p.name for p in params_of(resource_type))])
                raise BadRequest(
                    f"Unknown search parameter {name[:64]!r} for {resource_type}. Supported: {known}.",
                    code="unknown-search-parameter",
                )
            self._check_modifier(resource_type, name, spec, modifier or None)
            values = [v for v in value.split(",") if v != ""]
            if not values:
                raise BadRequest(f"Search parameter {raw_name[:64]!r} has no value.", code="invalid-search")
            for v in values:
                self._check_value(name, spec, v)
            # The same parameter twice means AND: each occurrence is its own criterion.
            query.criteria.append(Criterion(name, modifier or None, values, spec))
            query.echo.append((raw_name, value))
        return query

    def _result_param(self, query: SearchQuery, name: str, value: str) -> None:
        if name == "_count":
            if not value.isdigit() or int(value) > MAX_COUNT:
                raise BadRequest(f"_count must be an integer from 0 to {MAX_COUNT}.", code="invalid-search")
            query.count = int(value)
        elif name == "_offset":
            if not value.isdigit() or int(value) > 10_000_000:
                raise BadRequest("_offset must be a non-negative integer.", code="invalid-search")
            query.offset = int(value)
        elif name == "_sort":
            query.sort = []
            for item in value.split(","):
                descending = item.startswith("-")
                key = item[1:] if descending else item
                spec = param(query.resource_type, key)
                if key not in ("_id", "_lastUpdated") and (spec is None or spec.kind != "date"):
                    dates = [p.name for p in params_of(query.resource_type) if p.kind == "date"]
                    raise BadRequest(
                        f"Cannot sort {query.resource_type} by {key[:64]!r}. "
                        f"Sortable: _id, _lastUpdated{''.join(', ' + d for d in dates)}.",
                        code="unsupported-sort",
                    )
                query.sort.append((key, descending))
        elif name == "_total":
            if value not in ("none", "estimate", "accurate"):
                raise BadRequest("_total must be none, estimate or accurate.", code="invalid-search")
            query.total = "none" if value == "none" else "accurate"
        elif name == "_summary":
            if value not in ("count", "false"):
                raise BadRequest("_summary supports only count and false.", code="unsupported-search")
            query.summary_count = value == "count"
        elif name == "_format" and "json" not in value:
            raise NotAcceptable("This server speaks FHIR JSON only (_format=json).", code="not-acceptable")

    def _check_modifier(self, rtype: str, name: str, spec: SearchParam | None, modifier: str | None) -> None:
        if modifier is None:
            return
        kind = spec.kind if spec else "special"
        allowed = {"string": {"exact", "contains"}, "reference": set(SUPPORTED_TYPES)}.get(kind, set())
        if modifier not in allowed:
            raise BadRequest(
                f"Modifier :{modifier[:32]} is not supported on {rtype} {name}.", code="unsupported-search"
            )

    def _check_value(self, name: str, spec: SearchParam | None, value: str) -> None:
        if name == "_lastUpdated" or (spec is not None and spec.kind == "date"):
            _, text = _split_prefix(value)
            try:
                parse_range(text)
            except DateFormatError:
                raise BadRequest(
                    f"{name}: {value[:40]!r} is not a date. Use an optional prefix (eq, lt, le, gt, ge) "
                    "and a FHIR date, e.g. ge2024-05-01 or lt2024-05-01T12:00:00Z.",
                    code="invalid-search",
                ) from None

    def search(self, session: Session, query: SearchQuery, access: Access) -> SearchPage:
        rtype = query.resource_type
        rules = self._rules_or_forbid(access, rtype, "s")
        self._forbid_other_patients(query, rules)
        where = and_(
            StoredResource.res_type == rtype,
            *(self._criterion_clause(rtype, c) for c in query.criteria),
            self._rules_clause(rtype, rules),
        )
        total = None
        wants_total = query.total == "accurate" or (query.total == "auto" and query.offset == 0)
        if wants_total or query.summary_count:
            total = session.scalar(select(func.count()).select_from(StoredResource).where(where)) or 0
        if query.summary_count or query.count == 0:
            return SearchPage(query, total, [], False)
        # Sort and page narrow rows (ids), then fetch the page's bodies by primary key: sorting thousands
        # of rows with their JSON attached costs several times more.
        ids_stmt = select(StoredResource.res_id).where(where)
        ids_stmt = (
            ids_stmt.order_by(*self._order_by(rtype, query.sort)).offset(query.offset).limit(query.count + 1)
        )
        ids = list(session.scalars(ids_stmt))
        page_ids = ids[: query.count]
        bodies: dict[str, str] = {}
        if page_ids:
            found = session.execute(
                select(StoredResource.res_id, StoredResource.body).where(
                    StoredResource.res_type == rtype, StoredResource.res_id.in_(page_ids)
                )
            )
            bodies = {rid: body for rid, body in found}
        rows = [(rtype, rid, bodies[rid]) for rid in page_ids if rid in bodies]
        return SearchPage(query, total, rows, len(ids) > query.count)

    def _forbid_other_patients(self, query: SearchQuery, rules: list[Rule]) -> None:
        """A patient-scoped token naming another patient gets a clear 403, not a silently empty result."""
        patients = {r.patient for r in rules}
        if None in patients or len(patients) != 1:
            return
        (patient,) = patients
        rtype = query.resource_type
        for c in query.criteria:
            named: list[str] = []
            if rtype == "Patient" and c.name == "_id":
                named = c.values
            elif c.spec is not None and c.spec.kind == "reference" and c.name in ("patient", "subject"):
                for v in c.values:
                    ref_type, ref_id, _ = reference_key(v, self.base_url)
                    if ref_type in (None, "Patient") and (ref_id or v):
                        named.append(ref_id or v)
            if any(n != patient for n in named):
                raise Forbidden(
                    "This access token is limited to the patient it was launched with; "
                    "the search names another patient.",
                    code="outside-compartment",
                )

    def _rules_clause(self, rtype: str, rules: list[Rule]) -> ColumnElement[bool]:
        if any(r.unrestricted for r in rules):
            return true()
        clauses = []
        for rule in rules:
            parts: list[ColumnElement[bool]] = []
            if rule.patient is not None:
                if rtype == "Patient":
                    parts.append(StoredResource.res_id == rule.patient)
                elif rtype in COMPARTMENT:
                    spec = param(rtype, COMPARTMENT[rtype])
                    assert spec is not None
                    parts.append(
                        self._criterion_clause(
                            rtype, Criterion(spec.name, None, [f"Patient/{rule.patient}"], spec)
                        )
                    )
            try:
                constraint = self.parse_search(rtype, list(rule.constraint)).criteria
            except BridgeError:
                continue  # e.g. `*.rs?category=x` on a type without `category`: this rule grants nothing here
            parts.extend(self._criterion_clause(rtype, c) for c in constraint)
            clauses.append(and_(true(), *parts))
        return or_(false(), *clauses)

    def _criterion_clause(self, rtype: str, c: Criterion) -> ColumnElement[bool]:
        if c.name == "_id":
            return StoredResource.res_id.in_(c.values)
        if c.name == "_lastUpdated":
            column = StoredResource.last_updated_us
            return or_(*(_date_clause(column, column + 1, v) for v in c.values))
        spec = c.spec
        assert spec is not None
        S = SearchEntry
        matches: list[ColumnElement[bool]] = []
        for value in c.values:
            if spec.kind == "token":
                matches.append(_token_clause(value))
            elif spec.kind == "reference":
                matches.append(self._reference_clause(value, c.modifier, spec))
            elif spec.kind == "date":
                matches.append(_date_clause(S.lo, S.hi, value))
            elif spec.kind == "string":
                if c.modifier == "exact":
                    matches.append(S.code == value)
                else:
                    needle = _like_escape(normalise_string(value))
                    pattern = f"%{needle}%" if c.modifier == "contains" else f"{needle}%"
                    matches.append(S.value.like(pattern, escape="\\"))
            else:  # uri
                matches.append(S.value == value)
        sub = select(S.res_id).where(S.res_type == rtype, S.param == spec.name, or_(*matches))
        return StoredResource.res_id.in_(sub)

    def _reference_clause(self, value: str, modifier: str | None, spec: SearchParam) -> ColumnElement[bool]:
        S = SearchEntry
        ref_type, ref_id, key = reference_key(value, self.base_url)
        if modifier:  # subject:Patient=123
            return and_(S.system == modifier, S.code == (ref_id or value))
        if ref_type is not None:
            return S.value == key
        if "/" in value or "://" in value or value.startswith("urn:"):
            return S.value == key
        # A bare id: any indexed target type with that id (the parameter's targets already narrow it).
        return S.code == value

    def _order_by(self, rtype: str, sort: list[tuple[str, bool]]) -> list[Any]:
        order: list[Any] = []
        for key, descending in sort:
            if key == "_id":
                column: Any = StoredResource.res_id
            elif key == "_lastUpdated":
                column = StoredResource.last_updated_us
            elif key == PRIMARY_DATE.get(rtype):
                column = StoredResource.sort_lo
            else:
                S = SearchEntry
                column = (
                    select(func.min(S.lo))
                    .where(
                        S.res_type == StoredResource.res_type,
                        S.res_id == StoredResource.res_id,
                        S.param == key,
                    )
                    .scalar_subquery()
                )
            order.append(column.desc().nulls_last() if descending else column.asc().nulls_last())
        order.append(StoredResource.res_id.asc())  # stable pages
        return order

    # -- writing ---------------------------------------------------------------------------------

    def create(
        self,
        session: Session,
        data: Any,
        access: Access,
        *,
        expected_type: str | None = None,
        if_none_exist: str | None = None,
    ) -> WriteOutcome:
        resource = self.validate(data, expected_type=expected_type)
        rtype = resource["resourceType"]
        self._rules_or_forbid(access, rtype, "c")
        if if_none_exist:
            match = self._conditional_match(session, rtype, if_none_exist, path=None)
            if match is not None:
                return WriteOutcome(200, match)
        resource["id"] = str(uuid.uuid4())
        self._reject_unresolved(resource, rtype)
        outcome = self._store(session, resource, version=1)
        self._check_written(session, outcome.resource, access, "c")
        self.check_references(session, outcome.resource, rtype)
        return outcome

    def update(
        self,
        session: Session,
        resource_type: str,
        resource_id: str,
        data: Any,
        access: Access,
        *,
        if_match: str | None = None,
        path: str | None = None,
        check_references: bool = True,
    ) -> WriteOutcome:
        resource = self.validate(data, expected_type=resource_type, path=path)
        if not ID_PATTERN.match(resource_id):
            raise BadRequest("A resource id is 1-64 letters, digits, '-' or '.'.", code="invalid-id")
        if resource.get("id") != resource_id:
            raise BadRequest(
                f"The resource's id ({str(resource.get('id'))[:64]}) must equal the id in the URL "
                f"({resource_id}).",
                code="id-mismatch",
                fhir_path=path,
            )
        current = session.scalar(
            select(StoredResource.version).where(
                StoredResource.res_type == resource_type, StoredResource.res_id == resource_id
            )
        )
        if if_match is not None:
            wanted = if_match.strip().removeprefix("W/").strip('"')
            if current is None or str(current) != wanted:
                raise PreconditionFailed(
                    f"If-Match {if_match[:40]} does not match the current version "
                    f"({current if current is not None else 'none'}).",
                )
        if current is None:  # update as create: either permission will do
            interaction = "c" if access.rules(resource_type, "c") else "u"
            self._rules_or_forbid(access, resource_type, interaction)
        else:
            rules = self._rules_or_forbid(access, resource_type, "u")
            if not self._within(session, resource_type, resource_id, rules):
                raise Forbidden(
                    f"{resource_type}/{resource_id} is outside what this access token allows.",
                    code="outside-grant",
                )
            interaction = "u"
        self._reject_unresolved(resource, path or resource_type)
        outcome = self._store(session, resource, version=(current or 0) + 1)
        if current is not None:
            outcome.status = 200
        self._check_written(session, outcome.resource, access, interaction)
        if check_references:  # a transaction checks them once every entry is written
            self.check_references(session, outcome.resource, path or resource_type)
        return outcome

    def _conditional_match(
        self, session: Session, rtype: str, criteria: str, *, path: str | None
    ) -> dict[str, Any] | None:
        text = criteria.strip()
        if text.startswith(rtype + "?"):
            text = text[len(rtype) + 1 :]
        text = text.lstrip("?")
        try:
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise BadRequest(
                f"The conditional-create criteria {criteria[:100]!r} are not a search query string "
                "(e.g. identifier=system|value).",
                code="invalid-condition",
                fhir_path=path,
            ) from None
        query = self.parse_search(rtype, pairs)
        if not query.criteria:
            raise BadRequest(
                "Conditional create needs at least one search criterion.", code="invalid-condition"
            )
        query.count, query.total = 2, "none"
        bodies = self._identifier_match(session, query)
        if bodies is None:
            bodies = [body for _, _, body in self.search(session, query, FullAccess()).rows]
        if len(bodies) > 1:
            raise PreconditionFailed(
                f"The conditional-create criteria {criteria[:100]!r} match more than one {rtype}.",
                fhir_path=path,
            )
        return orjson.loads(bodies[0]) if bodies else None

    def _identifier_match(self, session: Session, query: SearchQuery) -> list[str] | None:
        """Fast path for the usual condition, one ``token=system|code``: a prepared statement, no query
        building (a Bundle of thousands of conditional creates spends most of its time here otherwise).
        None when the condition has another shape."""
        if len(query.criteria) != 1:
            return None
        (c,) = query.criteria
        if (
            c.spec is None
            or c.spec.kind != "token"
            or c.modifier
            or len(c.values) != 1
            or "|" not in c.values[0]
        ):
            return None
        system, code = c.values[0].split("|", 1)
        if not system or not code:
            return None
        rows = session.execute(
            _IDENTIFIER_MATCH,
            {"rtype": query.resource_type, "param": c.name, "system": system, "code": code},
        )
        return [body for (body,) in rows]

    def _store(
        self, session: Session, resource: dict[str, Any], *, version: int, batch: _Batch | None = None
    ) -> WriteOutcome:
        """Write one version. New resources may be queued in ``batch`` (one executemany per Bundle)."""
        rtype, rid = resource["resourceType"], resource["id"]
        moment = now_utc()
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = instant(moment)
        resource["meta"] = meta
        body = orjson.dumps(resource).decode()
        stamp = micros(moment)
        own = batch or _Batch()
        rows = index_rows(resource, self.base_url)
        primary = PRIMARY_DATE.get(rtype)
        sort_lo = min((r.lo for r in rows if r.param == primary and r.lo is not None), default=None)
        if version == 1:
            own.resources.append(
                {
                    "res_type": rtype,
                    "res_id": rid,
                    "version": 1,
                    "last_updated_us": stamp,
                    "sort_lo": sort_lo,
                    "body": body,
                }
            )
        else:
            session.execute(
                update(StoredResource)
                .where(StoredResource.res_type == rtype, StoredResource.res_id == rid)
                .values(version=version, last_updated_us=stamp, sort_lo=sort_lo, body=body)
            )
            session.execute(
                delete(SearchEntry).where(SearchEntry.res_type == rtype, SearchEntry.res_id == rid)
            )
        own.index.extend(
            {
                "res_type": rtype,
                "res_id": rid,
                "param": r.param,
                "system": r.system,
                "code": r.code,
                "value": r.value,
                "lo": r.lo,
                "hi": r.hi,
            }
            for r in rows
        )
        if batch is None:
            own.flush(session)
        return WriteOutcome(201, resource)

    def _check_written(
        self, session: Session, resource: dict[str, Any], access: Access, interaction: str
    ) -> None:
        """A write must land inside the caller's rules (e.g. a patient-scoped app writes for its patient)."""
        rtype, rid = resource["resourceType"], resource["id"]
        rules = access.rules(rtype, interaction)
        if not self._within(session, rtype, rid, rules):
            raise Forbidden(
                f"This access token may not write this {rtype}: it would be outside the patient "
                "compartment or scope constraints of the token.",
                code="outside-grant",
            )

    def _reject_unresolved(self, resource: dict[str, Any], path: str) -> None:
        for ref, where in _walk_references(resource, path):
            if ref["reference"].startswith("urn:"):
                raise Unprocessable(
                    f"{where}.reference is {ref['reference'][:80]!r}, which names nothing on this server. "
                    "urn:uuid: references are only resolved between entries of a transaction Bundle.",
                    code="unresolved-reference",
                    fhir_path=f"{where}.reference",
                )

    def check_references(
        self, session: Session, resource: dict[str, Any], path: str, *, known: set[str] | None = None
    ) -> None:
        """Referential integrity: every local reference to a type we store must point at a resource.

        ``known`` holds ``Type/id`` values known to exist (and grows as references are confirmed).
        """
        known = known if known is not None else set()
        for ref, where in _walk_references(resource, path):
            rtype, rid, key = reference_key(ref["reference"], self.base_url)
            if rtype not in SUPPORTED_TYPES or rid is None or key in known:
                continue
            if self.exists(session, rtype, rid):
                known.add(key)
            else:
                raise Unprocessable(
                    f"{where}.reference points at {rtype}/{rid[:64]}, which does not exist on this server.",
                    code="dangling-reference",
                    fhir_path=f"{where}.reference",
                )

    # -- Bundles ---------------------------------------------------------------------------------

    def transaction(self, session: Session, bundle: dict[str, Any], access: Access) -> dict[str, Any]:
        """All entries or none: the caller runs this inside one write transaction and rolls back on error."""
        entries = self._bundle_entries(bundle)
        results: list[dict[str, Any] | None] = [None] * len(entries)
        ids: dict[str, str] = {}  # fullUrl -> Type/id
        conditions: dict[tuple[str, str], str] = {}  # (type, ifNoneExist) -> Type/id, within this Bundle
        posts: list[tuple[int, dict[str, Any]]] = []
        puts: list[tuple[int, Any, str, str]] = []  # (index, resource, type, id)
        aliases: list[tuple[int, str]] = []  # entries answered by another entry's conditional create

        for i, entry in enumerate(entries):
            method, url, _ = self._entry_request(entry, i)
            where = f"Bundle.entry[{i}]"
            if method == "POST":
                resource = self.validate(entry.get("resource"), expected_type=url, path=f"{where}.resource")
                self._rules_or_forbid(access, resource["resourceType"], "c")
                condition = entry["request"].get("ifNoneExist")
                match = None
                if condition:
                    match = self._conditional_match(
                        session, resource["resourceType"], condition, path=f"{where}.request.ifNoneExist"
                    )
                if match is not None:
                    results[i] = self._entry_result(WriteOutcome(200, match))
                    self._remember(ids, entry, f"{match['resourceType']}/{match['id']}")
                    continue
                key = (resource["resourceType"], condition or "")
                if condition and key in conditions:  # the same conditional create twice in one Bundle
                    self._remember(ids, entry, conditions[key])
                    aliases.append((i, conditions[key]))
                    continue
                resource["id"] = str(uuid.uuid4())
                target = f"{resource['resourceType']}/{resource['id']}"
                self._remember(ids, entry, target)
                if condition:
                    conditions[key] = target
                posts.append((i, resource))
            elif method == "PUT":
                rtype, rid = self._put_target(session, url, where)
                self._remember(ids, entry, f"{rtype}/{rid}")
                data = entry.get("resource")
                if "?" in url and isinstance(data, dict):
                    data = {**data, "id": rid}  # a conditional update's body need not carry the id
                puts.append((i, data, rtype, rid))

        # FHIR's processing order: creates, then updates, then reads.
        written: list[tuple[int, dict[str, Any]]] = []
        batch = _Batch()
        for i, resource in posts:
            resolved = _resolve(resource, ids)
            self._reject_unresolved(resolved, f"Bundle.entry[{i}].resource")
            outcome = self._store(session, resolved, version=1, batch=batch)
            results[i] = self._entry_result(outcome)
            written.append((i, outcome.resource))
        batch.flush(session)
        for _, resource in written:
            self._check_written(session, resource, access, "c")
        for i, data, rtype, rid in puts:
            where = f"Bundle.entry[{i}].resource"
            outcome = self.update(
                session, rtype, rid, _resolve(data, ids), access, path=where, check_references=False
            )
            results[i] = self._entry_result(outcome)
            written.append((i, outcome.resource))
        known = {f"{r['resourceType']}/{r['id']}" for _, r in written}
        for i, resource in written:
            self.check_references(session, resource, f"Bundle.entry[{i}].resource", known=known)
        by_target = {f"{r['resourceType']}/{r['id']}": r for _, r in written}
        for i, target in aliases:
            results[i] = self._entry_result(WriteOutcome(200, by_target[target]))

        for i, entry in enumerate(entries):
            method, url, _ = self._entry_request(entry, i)
            if method == "GET":
                results[i] = self._get_entry(session, url, access, i)
        return {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [r or {"response": {"status": "200 OK"}} for r in results],
        }

    def batch(self, session: Session, bundle: dict[str, Any], access: Access) -> dict[str, Any]:
        """Each entry on its own (a savepoint each): one failing entry does not undo the others."""
        entries = self._bundle_entries(bundle)
        out: list[dict[str, Any]] = []
        for i, entry in enumerate(entries):
            try:
                with session.begin_nested():
                    out.append(self._batch_entry(session, entry, access, i))
            except BridgeError as err:
                outcome = err.details if isinstance(err.details, dict) else None
                outcome = outcome or _outcome(err.message, code=_issue_code(err.status), path=err.fhir_path)
                out.append({"response": {"status": _status_line(err.status), "outcome": outcome}})
        return {"resourceType": "Bundle", "type": "batch-response", "entry": out}

    def _batch_entry(self, session: Session, entry: dict[str, Any], access: Access, i: int) -> dict[str, Any]:
        method, url, _ = self._entry_request(entry, i)
        where = f"Bundle.entry[{i}]"
        if method == "GET":
            return self._get_entry(session, url, access, i)
        if method == "POST":
            outcome = self.create(
                session,
                entry.get("resource"),
                access,
                expected_type=url,
                if_none_exist=entry["request"].get("ifNoneExist"),
            )
        else:
            rtype, rid = self._put_target(session, url, where)
            data = entry.get("resource")
            if "?" in url and isinstance(data, dict):
                data = {**data, "id": rid}
            outcome = self.update(session, rtype, rid, data, access, path=f"{where}.resource")
        return self._entry_result(outcome)

    def _get_entry(self, session: Session, url: str, access: Access, i: int) -> dict[str, Any]:
        path, _, query_string = url.partition("?")
        parts = path.strip("/").split("/")
        if len(parts) == 2 and not query_string:
            resource = self.read(session, parts[0], parts[1], access)
            return {"resource": resource, "response": {"status": "200 OK"}}
        if len(parts) == 1:
            pairs = parse_qsl(query_string, keep_blank_values=True)
            page = self.search(session, self.parse_search(parts[0], pairs), access)
            return {"resource": orjson.loads(self.bundle_json(page)), "response": {"status": "200 OK"}}
        raise BadRequest(
            f"Bundle.entry[{i}].request.url {url[:100]!r} is neither Type/id nor Type?query.",
            code="invalid-entry",
            fhir_path=f"Bundle.entry[{i}].request.url",
        )

    def _bundle_entries(self, bundle: dict[str, Any]) -> list[dict[str, Any]]:
        entries = bundle.get("entry") or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise BadRequest("Bundle.entry must be a list of objects.", code="invalid-bundle")
        if len(entries) > MAX_BUNDLE_ENTRIES:
            raise BadRequest(
                f"A Bundle may carry at most {MAX_BUNDLE_ENTRIES} entries; this one has {len(entries)}.",
                code="bundle-too-large",
            )
        return entries

    def _entry_request(self, entry: dict[str, Any], i: int) -> tuple[str, str, dict[str, Any]]:
        request = entry.get("request")
        where = f"Bundle.entry[{i}].request"
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            raise BadRequest(f"{where}.method is required.", code="invalid-entry", fhir_path=where)
        method, url = request["method"], request.get("url")
        if method not in ("GET", "POST", "PUT"):
            raise BadRequest(
                f"{where}.method {method[:10]} is not supported here (GET, POST, PUT).",
                code="unsupported-interaction",
                fhir_path=f"{where}.method",
            )
        if not isinstance(url, str) or not url:
            raise BadRequest(f"{where}.url is required.", code="invalid-entry", fhir_path=f"{where}.url")
        if url.startswith(self.base_url + "/"):
            url = url[len(self.base_url) + 1 :]
        if method == "POST" and "/" in url.strip("/"):
            raise BadRequest(
                f"{where}.url of a POST is the resource type (e.g. Observation).",
                code="invalid-entry",
                fhir_path=f"{where}.url",
            )
        return method, url.strip("/"), request

    def conditional_update_id(self, session: Session, rtype: str, criteria: str, *, path: str | None) -> str:
        """Conditional update (``PUT Type?criteria``): the id of the one match, or a new id (create).
        More than one match is 412, as for conditional create."""
        self.check_type(rtype)
        match = self._conditional_match(session, rtype, criteria, path=path)
        return str(match["id"]) if match is not None else str(uuid.uuid4())

    def _put_target(self, session: Session, url: str, where: str) -> tuple[str, str]:
        """Where a Bundle PUT goes: ``Type/id``, or ``Type?criteria`` resolved as a conditional update."""
        if "?" in url:
            rtype, _, criteria = url.partition("?")
            if "/" in rtype or not criteria:
                raise BadRequest(
                    f"{where}.request.url of a conditional update is Type?criteria.",
                    code="invalid-entry",
                    fhir_path=f"{where}.request.url",
                )
            return rtype, self.conditional_update_id(session, rtype, criteria, path=f"{where}.request.url")
        return self._instance_url(url, where)

    def _instance_url(self, url: str, where: str) -> tuple[str, str]:
        parts = url.split("?")[0].split("/")
        if "?" in url or len(parts) != 2:
            raise BadRequest(
                f"{where}.request.url of a PUT must be Type/id or Type?criteria.",
                code="invalid-entry",
                fhir_path=f"{where}.request.url",
            )
        self.check_type(parts[0])
        if not ID_PATTERN.match(parts[1]):
            raise BadRequest(f"{where}.request.url has an invalid id.", code="invalid-id")
        return parts[0], parts[1]

    @staticmethod
    def _remember(ids: dict[str, str], entry: dict[str, Any], target: str) -> None:
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str) and full_url:
            ids[full_url] = target

    @staticmethod
    def _entry_result(outcome: WriteOutcome) -> dict[str, Any]:
        return {
            "response": {
                "status": "201 Created" if outcome.created else "200 OK",
                "location": outcome.location,
                "etag": outcome.etag,
                "lastModified": outcome.last_modified,
            }
        }

    # -- responses -------------------------------------------------------------------------------

    def bundle_json(
        self,
        page: SearchPage,
        *,
        extra: Iterable[tuple[str, str, str]] = (),
        link_base: str | None = None,
        next_url: str | None = None,
    ) -> bytes:
        """A searchset Bundle; stored JSON is spliced in as-is (no re-parsing of thousands of resources)."""
        query = page.query
        base = link_base or f"{self.base_url}/{query.resource_type}"

        def link(offset: int) -> str:
            params = list(query.echo)
            if query.sort:
                params.append(("_sort", ",".join(("-" if d else "") + k for k, d in query.sort)))
            params.append(("_count", str(query.count)))
            if query.total != "auto":
                params.append(("_total", query.total))
            if offset:
                params.append(("_offset", str(offset)))
            return f"{base}?{urlencode(params)}"

        links = [{"relation": "self", "url": link(query.offset)}]
        if next_url is not None:  # fault injection: a next link chosen by the test
            links.append({"relation": "next", "url": next_url})
        elif page.has_more:
            links.append({"relation": "next", "url": link(query.offset + query.count)})
        if query.offset > 0:
            links.append({"relation": "previous", "url": link(max(0, query.offset - query.count))})
        entries = [
            {
                "fullUrl": f"{self.base_url}/{t}/{i}",
                "resource": orjson.Fragment(body),
                "search": {"mode": "match"},
            }
            for t, i, body in [*page.rows, *extra]
        ]
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "meta": {"lastUpdated": instant(now_utc())},
            "type": "searchset",
        }
        if page.total is not None:
            bundle["total"] = page.total
        bundle["link"] = links
        if entries:
            bundle["entry"] = entries
        return orjson.dumps(bundle)

    def foreign_resource(
        self, session: Session, query: SearchQuery, patient: str | None
    ) -> tuple[str, str, str] | None:
        """A resource of the searched type belonging to someone other than ``patient`` (fault injection)."""
        rtype = query.resource_type
        stmt = select(StoredResource.res_type, StoredResource.res_id, StoredResource.body).where(
            StoredResource.res_type == rtype
        )
        if rtype == "Patient" and patient:
            stmt = stmt.where(StoredResource.res_id != patient)
        elif rtype in COMPARTMENT:
            S = SearchEntry
            mine = select(S.res_id).where(
                S.res_type == rtype, S.param == COMPARTMENT[rtype], S.code == patient
            )
            others = select(S.res_id).where(
                S.res_type == rtype,
                S.param == COMPARTMENT[rtype],
                S.code.is_not(None),
                S.code != (patient or ""),
            )
            stmt = stmt.where(StoredResource.res_id.in_(others), StoredResource.res_id.not_in(mine))
        row = session.execute(stmt.order_by(StoredResource.last_updated_us.desc()).limit(1)).first()
        return (row[0], row[1], row[2]) if row else None


_IDENTIFIER_MATCH = sql_text(
    "SELECT r.body FROM resources r WHERE r.res_type = :rtype AND r.res_id IN ("
    "SELECT s.res_id FROM search_index s WHERE s.res_type = :rtype AND s.param = :param "
    "AND s.code = :code AND s.system = :system) LIMIT 2"
)


def _resolve(node: Any, ids: dict[str, str]) -> Any:
    """A copy with every reference to a Bundle entry's fullUrl rewritten to that entry's Type/id."""
    if isinstance(node, dict):
        out = {key: _resolve(value, ids) for key, value in node.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in ids:
            out["reference"] = ids[ref]
        return out
    if isinstance(node, list):
        return [_resolve(item, ids) for item in node]
    return node


_PREFIXES = ("eq", "ne", "lt", "le", "gt", "ge", "sa", "eb", "ap")


def _split_prefix(value: str) -> tuple[str, str]:
    if value[:2] in _PREFIXES and value[2:3].isdigit():
        return value[:2], value[2:]
    return "eq", value


def _date_clause(
    lo_col: SQLColumnExpression[Any], hi_col: SQLColumnExpression[Any], value: str
) -> ColumnElement[bool]:
    """FHIR date prefixes on ranges (http://hl7.org/fhir/R4/search.html#prefix), target [lo, hi)."""
    prefix, text = _split_prefix(value)
    s_lo, s_hi = parse_range(text)
    contained = and_(lo_col >= s_lo, hi_col <= s_hi)
    if prefix == "eq":
        return contained
    if prefix == "ne":
        return ~contained
    if prefix == "gt":
        return hi_col > s_hi
    if prefix == "lt":
        return lo_col < s_lo
    if prefix == "ge":
        return or_(hi_col > s_hi, contained)
    if prefix == "le":
        return or_(lo_col < s_lo, contained)
    if prefix == "sa":
        return lo_col >= s_hi
    if prefix == "eb":
        return hi_col <= s_lo
    # ap: within a tenth of the distance to now either side, at least a day
    width = max(abs(micros(now_utc()) - s_lo) // 10, 86_400_000_000)
    return and_(hi_col > s_lo - width, lo_col < min(s_hi + width, MAX_US))


def _token_clause(value: str) -> ColumnElement[bool]:
    S = SearchEntry
    if "|" not in value:
        return S.code == value
    system, code = value.split("|", 1)
    if system == "":
        return and_(S.system.is_(None), S.code == code)
    if code == "":
        return S.system == system
    return and_(S.system == system, S.code == code)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _status_line(status: int) -> str:
    reasons = {
        400: "Bad Request",
        403: "Forbidden",
        404: "Not Found",
        409: "Conflict",
        412: "Precondition Failed",
    }
    return f"{status} {reasons.get(status, 'Unprocessable Entity' if status == 422 else 'Error')}"


def _issue_code(status: int) -> str:
    return {403: "forbidden", 404: "not-found", 409: "conflict", 412: "conflict"}.get(status, "invalid")


__all__ = [
    "Access",
    "FhirStore",
    "FullAccess",
    "NotAcceptable",
    "PreconditionFailed",
    "SearchPage",
    "SearchQuery",
    "WriteOutcome",
]
