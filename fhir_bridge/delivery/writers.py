"""Turning claimed outbox groups into FHIR writes, one way per EHR: transaction, batch, or single requests.

Every write is idempotent, so any of them may be repeated after a crash or an ambiguous failure:
resources are conditional creates on their deterministic identifier (``ifNoneExist`` /
``If-None-Exist``), or, for types a tenant's quirks exclude from conditional create, a ``PUT`` to the
identifier value (a valid FHIR id by contract). The app's ``Device`` is a conditional create too, and
each batch gets one ``Provenance`` per Device naming it, made idempotent by a tag derived from the
batch's contents.

``transaction`` (the default) sends everything in one atomic Bundle; the server resolves the
``urn:uuid:`` references. When the EHR refuses a transaction (4xx other than 408/429), the groups
are split in halves and retried until the refusing group is found, so one bad record is
dead-lettered and the rest of the batch is delivered; a group is all-or-nothing. ``batch`` and
``single`` cannot rely on the server to resolve ``urn:uuid:`` references, so they write in rounds:
first what references nothing unwritten (the Device), then what references only written resources,
rewriting references to the ids the EHR assigned. There an entry can fail on its own, and what
depends on it is held back with it.

Writers never raise for a FHIR failure: they return one :class:`Written` per item, and the worker
turns those into outbox state.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol
from urllib.parse import quote

import orjson

from fhir_bridge.delivery.outbox import Item
from fhir_bridge.fhir_client import (
    FhirAuthError,
    FhirBadResponse,
    FhirClient,
    FhirError,
    FhirRejectedError,
    FhirResponse,
    outcome_text,
    parse_etag,
    parse_location,
)
from mappings import MappedResource
from mappings.identity import CANONICAL, full_url

log = logging.getLogger(__name__)

PROVENANCE_TAG_SYSTEM = f"{CANONICAL}/CodeSystem/delivery-batch"
PARTICIPANT_TYPES = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
STRATEGIES = ("transaction", "batch", "single")
# How each batch's Provenance is written: a plain create (default: every EHR that takes Provenance
# takes that; a batch repeated after a lost answer may then leave a second Provenance for the same
# resources, never a second resource), a conditional create on its batch tag (EHRs that search
# Provenance by ``_tag``), or not at all (EHRs that refuse Provenance writes).
PROVENANCE_MODES = ("plain", "conditional", "off")
ProvenanceMode = Literal["plain", "conditional", "off"]

State = Literal["delivered", "rejected", "failed", "held"]


@dataclass(frozen=True)
class Written:
    """What happened to one item's resource.

    ``delivered``: the EHR holds it (``ehr_id``, ``ehr_version``). ``rejected``: the EHR refused it, or
    something it depends on, for good. ``failed``: temporary; ``reached`` says whether the EHR may have
    seen the request. ``held``: never sent (the lease ran short); give it back untouched.
    """

    state: State
    ehr_id: str | None = None
    ehr_version: str | None = None
    status: int | None = None
    message: str = ""
    outcome: dict[str, Any] | None = None
    retry_after: float | None = None
    reached: bool = True
    auth_problem: bool = False


@dataclass
class Group:
    """Resources that travel together (one record), and the app Device they reference, if any."""

    key: str
    items: list[Item]
    device: MappedResource | None = None


class Entry:
    """One resource to write, with how to write it.

    The resource stays the bytes the outbox holds until something needs to look inside (an id to
    set, a reference to rewrite): most entries go into the Bundle without being parsed at all.
    """

    def __init__(
        self,
        resource_type: str,
        full_url: str,
        resource: dict[str, Any] | bytes,
        method: Literal["POST", "PUT"],
        url: str,
        if_none_exist: str | None,
        *,
        item: Item | None = None,
        group: Group | None = None,
    ) -> None:
        self.resource_type = resource_type
        self.full_url = full_url
        self._raw = resource if isinstance(resource, bytes) else None
        self._parsed = resource if isinstance(resource, dict) else None
        self.method = method
        self.url = url
        self.if_none_exist = if_none_exist
        self.item = item
        self.group = group
        self.depends_on: set[str] = set()

    @property
    def resource(self) -> dict[str, Any]:
        """The resource as a dict (parsed on first use; from then on the dict is what is sent)."""
        if self._parsed is None:
            assert self._raw is not None
            self._parsed = orjson.loads(self._raw)
            self._raw = None
        return self._parsed

    def mentions(self, urns: Mapping[str, str]) -> bool:
        """Whether any of ``urns`` may occur in the resource (a cheap test before parsing)."""
        if self._raw is None:
            return True
        return any(match.decode() in urns for match in _URN.findall(self._raw))

    @property
    def device_url(self) -> str | None:
        """The urn:uuid: of the app Device this entry's record came from, if any."""
        if self.group is None or self.group.device is None:
            return None
        return self.group.device.full_url

    def _request(self) -> dict[str, Any]:
        request: dict[str, Any] = {"method": self.method, "url": self.url}
        if self.if_none_exist:
            request["ifNoneExist"] = self.if_none_exist
        return request

    def bundle_entry(self) -> dict[str, Any]:
        return {"fullUrl": self.full_url, "resource": self.resource, "request": self._request()}

    def bundle_entry_json(self) -> bytes:
        body = self._raw if self._raw is not None else orjson.dumps(self._parsed)
        return (
            b'{"fullUrl":'
            + orjson.dumps(self.full_url)
            + b',"resource":'
            + body
            + b',"request":'
            + orjson.dumps(self._request())
            + b"}"
        )


_URN = re.compile(rb"urn:uuid:[0-9a-fA-F-]{36}")


class Writer(Protocol):
    def write(self, groups: Sequence[Group]) -> dict[int, Written]: ...


Guard = Callable[[], bool]


def identifier_query(system: str, value: str) -> str:
    """``identifier=system|value`` as FHIR search syntax (escaped so a URL system stays one token)."""
    return f"identifier={quote(system, safe=':/.-_~')}|{quote(value, safe='')}"


def walk_references(node: Any) -> Iterator[dict[str, Any]]:
    """Every ``Reference``-shaped dict (one with a string ``reference``) anywhere in a resource."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node
        for value in node.values():
            if isinstance(value, dict | list):
                yield from walk_references(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_references(value)


def _rewrite(resource: dict[str, Any], mapping: dict[str, str]) -> None:
    for ref in walk_references(resource):
        target = mapping.get(ref["reference"])
        if target is not None:
            ref["reference"] = target


def _now_instant() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Plan:
    """The entries for a list of groups under one tenant's quirks."""

    def __init__(
        self,
        groups: Sequence[Group],
        put_types: frozenset[str],
        known: Mapping[str, str] | None = None,
        *,
        provenance: ProvenanceMode = "plain",
    ) -> None:
        self.put_types = put_types
        self.provenance_mode = provenance
        self.groups = list(groups)
        self.devices: dict[str, MappedResource] = {}
        self.items: list[Entry] = []
        for group in self.groups:
            if group.device is not None:
                self.devices.setdefault(group.device.full_url, group.device)
        self.device_entries = [self._device_entry(device) for device in self.devices.values()]
        # urn:uuid: -> Type/id where we know the id before writing: resources written with PUT, and
        # resources of the same records delivered earlier (``known``, a retried dead letter's siblings).
        self.fixed_refs: dict[str, str] = {
            e.full_url: e.url for e in self.device_entries if e.method == "PUT"
        }
        for group in self.groups:
            for item in group.items:
                entry = self._item_entry(item, group)
                self.items.append(entry)
                if entry.method == "PUT" and "?" not in entry.url:
                    self.fixed_refs[entry.full_url] = entry.url
        self.fixed_refs.update(known or {})
        if self.fixed_refs:
            for entry in self.items:
                if entry.mentions(self.fixed_refs):
                    _rewrite(entry.resource, self.fixed_refs)

    def link_dependencies(self) -> None:
        """Fill each item's ``depends_on``: the urn:uuid: entries it references (for writing in rounds)."""
        defined = {e.full_url for e in self.items} | set(self.devices)
        for entry in self.items:
            entry.depends_on = {
                ref["reference"]
                for ref in walk_references(entry.resource)
                if ref["reference"].startswith("urn:uuid:")
            }
            entry.depends_on.discard(entry.full_url)
            if entry.depends_on - defined:
                # A contract breach upstream: a urn:uuid: that nothing in the request defines.
                entry.depends_on.add("!unresolvable")

    def _device_entry(self, device: MappedResource) -> Entry:
        resource = dict(device.resource)
        if "Device" in self.put_types:
            resource["id"] = device.identifier_value
            return Entry(
                "Device", device.full_url, resource, "PUT", f"Device/{device.identifier_value}", None
            )
        return Entry(
            "Device",
            device.full_url,
            resource,
            "POST",
            "Device",
            identifier_query(device.identifier_system, device.identifier_value),
        )

    def _item_entry(self, item: Item, group: Group) -> Entry:
        url_full = full_url(item.ident_system, item.ident_value)
        if item.resource_type in self.put_types:
            resource = orjson.loads(item.body)
            resource["id"] = item.ident_value
            return Entry(
                item.resource_type,
                url_full,
                resource,
                "PUT",
                f"{item.resource_type}/{item.ident_value}",
                None,
                item=item,
                group=group,
            )
        if item.method == "upsert":
            # Conditional update: creates the resource the first time, replaces it afterwards.
            return Entry(
                item.resource_type,
                url_full,
                item.body,
                "PUT",
                f"{item.resource_type}?{identifier_query(item.ident_system, item.ident_value)}",
                None,
                item=item,
                group=group,
            )
        entry = Entry(
            item.resource_type,
            url_full,
            item.body,
            "POST",
            item.resource_type,
            identifier_query(item.ident_system, item.ident_value),
            item=item,
            group=group,
        )
        if b'"id"' in item.body:
            entry.resource.pop("id", None)  # the EHR assigns ids to what it creates
        return entry

    def provenance(
        self, device: MappedResource, targets: Sequence[str], key_items: Sequence[Item]
    ) -> Entry | None:
        """One Provenance naming the app Device as author of ``targets`` (None when the tenant says off).

        Its tag is a digest of the batch's identifiers, so the same batch always carries the same tag.
        """
        if self.provenance_mode == "off":
            return None
        digest = hashlib.sha256(
            "\n".join(sorted(f"{i.ident_system}|{i.ident_value}" for i in key_items)).encode()
        ).hexdigest()
        resource: dict[str, Any] = {
            "resourceType": "Provenance",
            "meta": {"tag": [{"system": PROVENANCE_TAG_SYSTEM, "code": digest}]},
            "target": [{"reference": ref} for ref in targets],
            "recorded": _now_instant(),
            "activity": {"coding": [{"system": DATA_OPERATION, "code": "CREATE", "display": "create"}]},
            "agent": [
                {
                    "type": {
                        "coding": [{"system": PARTICIPANT_TYPES, "code": "author", "display": "Author"}]
                    },
                    "who": {"reference": device.full_url},
                }
            ],
        }
        urn = f"urn:uuid:{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
        if "Provenance" in self.put_types:
            resource["id"] = digest
            return Entry("Provenance", urn, resource, "PUT", f"Provenance/{digest}", None)
        if self.provenance_mode == "plain":
            return Entry("Provenance", urn, resource, "POST", "Provenance", None)
        query = f"_tag={quote(PROVENANCE_TAG_SYSTEM, safe=':/.-_~')}|{digest}"
        return Entry("Provenance", urn, resource, "POST", "Provenance", query)


def _status_of(text: Any) -> int | None:
    if isinstance(text, str) and text[:3].isdigit():
        return int(text[:3])
    return None


def _written_from_entry_response(response: dict[str, Any]) -> Written:
    """Interpret ``Bundle.entry.response`` of a transaction-response or batch-response."""
    status = _status_of(response.get("status"))
    outcome = response.get("outcome") if isinstance(response.get("outcome"), dict) else None
    if status is None:
        return Written("failed", message="the EHR's response entry has no status", reached=True)
    if 200 <= status < 300:
        located = parse_location(str(response.get("location") or ""))
        version = (located[2] if located else None) or parse_etag(response.get("etag"))
        if located is None:
            return Written("failed", status=status, message="the EHR's response entry has no location")
        return Written("delivered", ehr_id=located[1], ehr_version=version, status=status)
    detail = outcome_text(outcome)
    message = f"{status}" + (f" {detail}" if detail else "")
    if status in {408, 429} or status >= 500:
        return Written("failed", status=status, message=message, outcome=outcome)
    return Written("rejected", status=status, message=message, outcome=outcome)


def _written_from_error(exc: FhirError) -> Written:
    if isinstance(exc, FhirRejectedError):
        return Written("rejected", status=exc.status, message=exc.message, outcome=exc.outcome)
    return Written(
        "failed",
        status=exc.status,
        message=exc.message,
        outcome=exc.outcome,
        retry_after=exc.retry_after,
        reached=exc.reached,
        auth_problem=isinstance(exc, FhirAuthError),
    )


def _written_from_response(response: FhirResponse) -> Written:
    ehr_id = response.resource_id
    if ehr_id is None:
        return Written("failed", status=response.status, message="the EHR did not say where it put it")
    return Written("delivered", ehr_id=ehr_id, ehr_version=response.version, status=response.status)


def make_outcome(
    message: str, *, code: str = "processing", extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    issues: list[dict[str, Any]] = [{"severity": "error", "code": code, "diagnostics": message}]
    if extra and isinstance(extra.get("issue"), list):
        issues += [issue for issue in extra["issue"] if isinstance(issue, dict)]
    return {"resourceType": "OperationOutcome", "issue": issues}


def _culprit_index(outcome: dict[str, Any] | None, message: str) -> int | None:
    """Which Bundle entry a transaction failure names: ``Bundle.entry[N]`` in an issue's expression or
    location (the FHIR way), or a leading ``Entry N`` in its diagnostics (sekmet's way)."""
    texts: list[str] = []
    for issue in (outcome or {}).get("issue") or []:
        if isinstance(issue, dict):
            texts += [
                t
                for t in (issue.get("expression") or []) + (issue.get("location") or [])
                if isinstance(t, str)
            ]
            if isinstance(issue.get("diagnostics"), str):
                texts.append(issue["diagnostics"])
    texts.append(message)
    for text in texts:
        for marker in ("Bundle.entry[", "Entry "):
            at = text.find(marker)
            if at >= 0:
                digits = ""
                for char in text[at + len(marker) :]:
                    if not char.isdigit():
                        break
                    digits += char
                if digits:
                    return int(digits)
    return None


def _same(a: Sequence[Group], b: Sequence[Group]) -> bool:
    """The very same groups (identity: comparing them by value would compare every body)."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


class TransactionWriter:
    """All groups in one transaction Bundle; halves on refusal until the refusing group is isolated."""

    def __init__(
        self,
        client: FhirClient,
        *,
        put_types: frozenset[str],
        guard: Guard | None = None,
        known: Mapping[str, str] | None = None,
        provenance: ProvenanceMode = "plain",
    ) -> None:
        self.client = client
        self.put_types = put_types
        self.guard = guard or (lambda: True)
        self.known = known
        self.provenance = provenance
        self.requests = 0
        self._prepared: tuple[list[Group], list[Entry], bytes] | None = None

    def prepare(self, groups: Sequence[Group]) -> None:
        """Build the first request of :meth:`write` for these groups now, so that ``write`` only sends.

        Why: the worker calls this when it claims a batch, while the batch before it is still with
        the EHR. Built at send time, the plan and the Bundle's bytes (a few milliseconds for 100
        resources, longer while the loop's other thread holds the GIL recording the previous batch)
        were time the EHR sat idle between two Bundles. Later requests (halves after a refusal) are
        built when they are needed, as before.
        """
        groups = list(groups)
        self._prepared = (groups, *self._build(groups))

    def write(self, groups: Sequence[Group]) -> dict[int, Written]:
        results: dict[int, Written] = {}
        self._transact(list(groups), results)
        return results

    def _build(self, groups: list[Group]) -> tuple[list[Entry], bytes]:
        plan = Plan(groups, self.put_types, self.known, provenance=self.provenance)
        entries = self._entries(plan)
        bundle = (
            b'{"resourceType":"Bundle","type":"transaction","entry":['
            + b",".join(e.bundle_entry_json() for e in entries)
            + b"]}"
        )
        return entries, bundle

    def _transact(self, groups: list[Group], results: dict[int, Written]) -> None:
        if self.requests and not self.guard():
            for group in groups:
                for item in group.items:
                    results[item.id] = Written("held", message="lease ran short before this request")
            return
        prepared, self._prepared = self._prepared, None
        if prepared is not None and _same(prepared[0], groups):
            entries, bundle = prepared[1], prepared[2]
        else:
            entries, bundle = self._build(groups)
        self.requests += 1
        try:
            response = self.client.bundle(bundle, idempotent=False)
            answers = response.get("entry") or []
            if len(answers) != len(entries):
                raise FhirBadResponse(
                    f"transaction-response has {len(answers)} entries for {len(entries)} sent", status=200
                )
        except FhirRejectedError as exc:
            if len(groups) > 1:
                middle = len(groups) // 2
                self._transact(groups[:middle], results)
                self._transact(groups[middle:], results)
            else:
                self._dead_letter(groups[0], entries, exc, results)
            return
        except FhirError as exc:
            failure = _written_from_error(exc)
            for group in groups:
                for item in group.items:
                    results[item.id] = failure
            return
        for entry, answer in zip(entries, answers, strict=True):
            if entry.item is None:
                continue
            written = (
                _written_from_entry_response(answer.get("response") or {})
                if isinstance(answer, dict)
                else None
            )
            if written is None or written.state != "delivered":
                # A transaction is all-or-nothing: a 200 with a non-2xx entry is a broken answer.
                written = Written("failed", status=200, message="transaction-response entry without success")
            results[entry.item.id] = written

    def _entries(self, plan: Plan) -> list[Entry]:
        entries = list(plan.device_entries) + plan.items
        for device in plan.devices.values():
            mine = [e for e in plan.items if e.device_url == device.full_url]
            if mine:
                targets = [plan.fixed_refs.get(e.full_url, e.full_url) for e in mine]
                provenance = plan.provenance(device, targets, [e.item for e in mine if e.item is not None])
                if provenance is None:
                    continue
                if plan.fixed_refs:
                    _rewrite(provenance.resource, plan.fixed_refs)
                entries.append(provenance)
        return entries

    def _dead_letter(
        self, group: Group, entries: list[Entry], exc: FhirRejectedError, results: dict[int, Written]
    ) -> None:
        index = _culprit_index(exc.outcome, exc.message)
        culprit = entries[index].item if index is not None and 0 <= index < len(entries) else None
        own = exc.outcome or make_outcome(exc.message)
        for item in group.items:
            if culprit is None or item.id == culprit.id:
                results[item.id] = Written("rejected", status=exc.status, message=exc.message, outcome=own)
            else:
                note = (
                    f"not written: {culprit.resource_type} {culprit.ident_value} of the same record was "
                    f"refused by the EHR, and a record is written whole or not at all"
                )
                results[item.id] = Written(
                    "rejected", status=exc.status, message=note, outcome=make_outcome(note, extra=exc.outcome)
                )


class RoundsWriter:
    """Batch or single writes in dependency order, for EHRs without (working) transactions."""

    def __init__(
        self,
        client: FhirClient,
        *,
        mode: Literal["batch", "single"],
        put_types: frozenset[str],
        device_ids: dict[str, str] | None = None,
        guard: Guard | None = None,
        known: Mapping[str, str] | None = None,
        provenance: ProvenanceMode = "plain",
    ) -> None:
        self.client = client
        self.known = known
        self.provenance = provenance
        self.mode = mode
        self.put_types = put_types
        # Devices already in this EHR (urn -> Device/id), shared across batches of one tenant.
        self.device_ids = device_ids if device_ids is not None else {}
        self.guard = guard or (lambda: True)
        self.requests = 0

    def write(self, groups: Sequence[Group]) -> dict[int, Written]:
        plan = Plan(groups, self.put_types, self.known, provenance=self.provenance)
        plan.link_dependencies()
        resolved: dict[str, str] = {}
        failed: dict[str, Written] = {}
        results: dict[int, Written] = {}
        pending: list[Entry] = []
        for device_entry in plan.device_entries:
            known = self.device_ids.get(device_entry.full_url)
            if known is not None:
                resolved[device_entry.full_url] = known
            else:
                pending.append(device_entry)
        pending += plan.items

        while pending:
            ready: list[Entry] = []
            waiting: list[Entry] = []
            for entry in pending:
                blockers = [failed[d] for d in entry.depends_on if d in failed]
                if "!unresolvable" in entry.depends_on:
                    self._settle(
                        entry,
                        Written("rejected", message="references a urn:uuid: that is not part of its record"),
                        results,
                        failed,
                    )
                elif blockers:
                    self._settle(entry, _held_back(blockers), results, failed)
                elif entry.depends_on <= resolved.keys():
                    ready.append(entry)
                else:
                    waiting.append(entry)
            if not ready:
                for entry in waiting:
                    self._settle(entry, Written("rejected", message="circular references"), results, failed)
                break
            if self.requests and not self.guard():
                for entry in ready + waiting:
                    self._settle(entry, Written("held", message="lease ran short"), results, failed)
                break
            for entry in ready:
                _rewrite(entry.resource, resolved)
            for entry, written in zip(ready, self._send(ready), strict=True):
                if written.state == "delivered" and written.ehr_id:
                    resolved[entry.full_url] = f"{entry.resource_type}/{written.ehr_id}"
                    if entry.resource_type == "Device" and entry.item is None:
                        self.device_ids[entry.full_url] = resolved[entry.full_url]
                self._settle(entry, written, results, failed)
            pending = waiting

        self._provenance(plan, resolved)
        return results

    def _settle(
        self, entry: Entry, written: Written, results: dict[int, Written], failed: dict[str, Written]
    ) -> None:
        if written.state != "delivered":
            failed[entry.full_url] = written
        if entry.item is not None:
            results[entry.item.id] = written

    def _send(self, entries: list[Entry]) -> list[Written]:
        if self.mode == "batch":
            return self._send_batch(entries)
        out: list[Written] = []
        for position, entry in enumerate(entries):
            if position and not self.guard():
                out += [Written("held", message="lease ran short")] * (len(entries) - position)
                break
            self.requests += 1
            try:
                if entry.method == "PUT" and "?" in entry.url:
                    written = _written_from_response(self.client.update_where(entry.resource, entry.url))
                elif entry.method == "PUT":
                    written = _written_from_response(self.client.update(entry.resource))
                else:
                    written = _written_from_response(
                        self.client.create(entry.resource, if_none_exist=entry.if_none_exist)
                    )
            except FhirError as exc:
                written = _written_from_error(exc)
            out.append(written)
            if written.state == "failed" and (not written.reached or written.status in {429, 503}):
                # The EHR is down or asks us to back off: the rest of this round would fare the same.
                out += [written] * (len(entries) - position - 1)
                break
        return out

    def _send_batch(self, entries: list[Entry]) -> list[Written]:
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": [e.bundle_entry() for e in entries]}
        self.requests += 1
        try:
            response = self.client.bundle(bundle, idempotent=False)
        except FhirError as exc:
            return [_written_from_error(exc)] * len(entries)
        answers = response.get("entry") or []
        if len(answers) != len(entries):
            broken = Written("failed", status=200, message="batch-response entry count does not match")
            return [broken] * len(entries)
        return [
            _written_from_entry_response(a.get("response") or {})
            if isinstance(a, dict)
            else Written("failed")
            for a in answers
        ]

    def _provenance(self, plan: Plan, resolved: dict[str, str]) -> None:
        """Best effort here: the resources are already written; a missing Provenance is logged."""
        for device in plan.devices.values():
            mine = [e for e in plan.items if e.device_url == device.full_url and e.full_url in resolved]
            if not mine or device.full_url not in resolved or not self.guard():
                continue
            entry = plan.provenance(
                device, [resolved[e.full_url] for e in mine], [e.item for e in mine if e.item is not None]
            )
            if entry is None:
                continue
            _rewrite(entry.resource, resolved)
            self.requests += 1
            try:
                if entry.method == "PUT":
                    self.client.update(entry.resource)
                else:
                    self.client.create(entry.resource, if_none_exist=entry.if_none_exist)
            except FhirError as exc:
                log.warning("provenance not written", extra={"http_status": exc.status, "count": len(mine)})


def _held_back(blockers: list[Written]) -> Written:
    """An entry whose dependency failed shares its fate: refused for good, or retried later."""
    rejected = [b for b in blockers if b.state == "rejected"]
    if rejected:
        note = "not written: a resource it references was refused by the EHR"
        return Written(
            "rejected",
            status=rejected[0].status,
            message=note,
            outcome=make_outcome(note, extra=rejected[0].outcome),
        )
    first = blockers[0]
    return Written(
        "failed" if first.state == "failed" else "held",
        status=first.status,
        message="waiting for a resource it references: " + first.message,
        retry_after=first.retry_after,
        reached=False,
        auth_problem=first.auth_problem,
    )


def make_writer(
    strategy: str,
    client: FhirClient,
    *,
    put_types: frozenset[str],
    device_ids: dict[str, str],
    guard: Guard | None = None,
    known: Mapping[str, str] | None = None,
    provenance: ProvenanceMode = "plain",
) -> Writer:
    if strategy == "transaction":
        return TransactionWriter(client, put_types=put_types, guard=guard, known=known, provenance=provenance)
    if strategy in ("batch", "single"):
        return RoundsWriter(
            client,
            mode="batch" if strategy == "batch" else "single",
            put_types=put_types,
            device_ids=device_ids,
            guard=guard,
            known=known,
            provenance=provenance,
        )
    raise ValueError(f"unknown write strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
