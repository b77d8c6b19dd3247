"""How outbox items become Bundle entries: quirks, references, Provenance, and reading a refusal."""

from __future__ import annotations

import uuid

import orjson

from fhir_bridge.delivery.outbox import Item
from fhir_bridge.delivery.writers import Group, Plan, _culprit_index, identifier_query
from mappings.identity import device_resource, full_url

SYSTEM = "https://fhir-bridge.org/fhir/sid/resource"


def item(n: int, resource_type: str, value: str, body: dict[str, object]) -> Item:
    return Item(n, "t", uuid.uuid4(), "g", resource_type, SYSTEM, value, orjson.dumps(body), 0, 0)


def phq9_group() -> Group:
    qr_url = full_url(SYSTEM, "qr1")
    device = device_resource("acme", "Acme")
    qr = item(
        1,
        "QuestionnaireResponse",
        "qr1",
        {"resourceType": "QuestionnaireResponse", "author": {"reference": device.full_url}},
    )
    obs = item(
        2, "Observation", "obs1", {"resourceType": "Observation", "derivedFrom": [{"reference": qr_url}]}
    )
    return Group("g", [qr, obs], device)


def test_conditional_creates_keep_the_stored_bytes() -> None:
    group = phq9_group()
    plan = Plan([group], frozenset())
    qr, obs = plan.items
    assert (qr.method, qr.url, qr.if_none_exist) == (
        "POST",
        "QuestionnaireResponse",
        f"identifier={SYSTEM}|qr1",
    )
    entry = orjson.loads(obs.bundle_entry_json())
    assert entry["resource"] == orjson.loads(group.items[1].body), "sent as stored, references intact"
    assert entry["fullUrl"] == full_url(SYSTEM, "obs1")
    if_none_exist = plan.device_entries[0].if_none_exist
    assert if_none_exist is not None and if_none_exist.startswith("identifier=")


def test_types_without_conditional_create_are_put_to_their_identifier_and_references_follow() -> None:
    plan = Plan([phq9_group()], frozenset({"QuestionnaireResponse"}))
    qr, obs = plan.items
    assert (qr.method, qr.url, qr.resource["id"]) == ("PUT", "QuestionnaireResponse/qr1", "qr1")
    assert obs.resource["derivedFrom"] == [{"reference": "QuestionnaireResponse/qr1"}]


def test_references_to_resources_already_in_the_ehr_use_their_ids() -> None:
    plan = Plan([phq9_group()], frozenset(), known={full_url(SYSTEM, "qr1"): "QuestionnaireResponse/abc"})
    assert plan.items[1].resource["derivedFrom"] == [{"reference": "QuestionnaireResponse/abc"}]


def test_a_batch_provenance_is_the_same_for_the_same_batch_and_names_the_device() -> None:
    group = phq9_group()
    plan = Plan([group], frozenset(), provenance="conditional")
    device = group.device
    assert device is not None
    one = plan.provenance(device, ["urn:uuid:a"], group.items)
    two = plan.provenance(device, ["urn:uuid:a"], list(reversed(group.items)))
    other = plan.provenance(device, ["urn:uuid:a"], group.items[:1])
    assert one is not None and two is not None and other is not None
    assert one.if_none_exist == two.if_none_exist != other.if_none_exist
    assert one.if_none_exist is not None and one.if_none_exist.startswith("_tag=")
    assert one.resource["agent"][0]["who"] == {"reference": device.full_url}
    assert one.resource["agent"][0]["type"]["coding"][0]["code"] == "author"


def test_provenance_is_a_plain_create_by_default_and_can_be_switched_off() -> None:
    group = phq9_group()
    assert group.device is not None
    plain = Plan([group], frozenset()).provenance(group.device, ["urn:uuid:a"], group.items)
    assert plain is not None and (plain.method, plain.if_none_exist) == ("POST", None)
    assert Plan([group], frozenset(), provenance="off").provenance(group.device, ["x"], group.items) is None
    put = Plan([group], frozenset({"Provenance"})).provenance(group.device, ["x"], group.items)
    assert put is not None and put.method == "PUT" and put.url.startswith("Provenance/")


def test_identifier_queries_keep_the_system_one_token() -> None:
    assert identifier_query("https://x.org/a b", "v&1") == "identifier=https://x.org/a%20b|v%261"


def test_the_refused_entry_is_read_from_the_outcome() -> None:
    expression = {
        "resourceType": "OperationOutcome",
        "issue": [{"expression": ["Bundle.entry[3].resource.status"]}],
    }
    assert _culprit_index(expression, "") == 3
    sekmet = {"issue": [{"diagnostics": "Transaction rolled back: Entry 2 (POST Observation): failed"}]}
    assert _culprit_index(sekmet, "") == 2
    assert _culprit_index({"issue": [{"diagnostics": "something else"}]}, "400") is None


def test_upserts_are_conditional_updates_or_puts_to_the_identifier_under_the_quirk() -> None:
    body = {"resourceType": "Consent", "status": "inactive"}
    upsert = Item(1, "t", None, "c1", "Consent", SYSTEM, "c1", orjson.dumps(body), 0, 0, "upsert")
    (entry,) = Plan([Group("c1", [upsert])], frozenset()).items
    assert (entry.method, entry.url, entry.if_none_exist) == ("PUT", f"Consent?identifier={SYSTEM}|c1", None)
    assert orjson.loads(entry.bundle_entry_json())["request"] == {"method": "PUT", "url": entry.url}
    plan = Plan([Group("c1", [upsert])], frozenset({"Consent"}))
    (put,) = plan.items
    assert (put.method, put.url, put.resource["id"]) == ("PUT", "Consent/c1", "c1")
    assert plan.fixed_refs == {full_url(SYSTEM, "c1"): "Consent/c1"}
    assert Plan([Group("c1", [upsert])], frozenset()).fixed_refs == {}, "a search URL is no reference"
