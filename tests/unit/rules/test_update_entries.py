"""Outbox ``op = update`` items become conditional updates by identifier (or a PUT to the identifier
for tenants that write the type with PUT), never a create."""

from __future__ import annotations

import orjson

from fhir_bridge.delivery.outbox import Item
from fhir_bridge.delivery.writers import Group, Plan
from fhir_bridge.rules.engine import ALERT_SYSTEM, ALERT_UPDATE_SYSTEM


def _item(op: str) -> Item:
    flag = {
        "resourceType": "Flag",
        "identifier": [{"system": ALERT_SYSTEM, "value": "abc123"}],
        "status": "inactive",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/p1"},
    }
    return Item(
        id=1,
        tenant_id="t1",
        record_id=None,
        group_key="ack-abc123",
        resource_type="Flag",
        ident_system=ALERT_UPDATE_SYSTEM if op == "update" else ALERT_SYSTEM,
        ident_value="abc123",
        body=orjson.dumps(flag),
        attempts=0,
        priority=0,
        op=op,
    )


def test_an_update_item_is_a_conditional_update_on_the_identifier_in_its_body() -> None:
    item = _item("update")
    entry = Plan([Group(item.group_key, [item])], frozenset()).items[0]
    assert entry.method == "PUT" and entry.if_none_exist is None
    assert entry.url == "Flag?identifier=https://fhir-bridge.org/fhir/sid/alert|abc123"
    assert entry.bundle_entry()["request"] == {"method": "PUT", "url": entry.url}


def test_an_update_item_for_a_put_type_goes_to_the_identifier_as_id() -> None:
    item = _item("update")
    entry = Plan([Group(item.group_key, [item])], frozenset({"Flag"})).items[0]
    assert (entry.method, entry.url, entry.resource["id"]) == ("PUT", "Flag/abc123", "abc123")


def test_a_create_item_stays_a_conditional_create() -> None:
    item = _item("create")
    entry = Plan([Group(item.group_key, [item])], frozenset()).items[0]
    assert entry.method == "POST" and entry.if_none_exist == f"identifier={ALERT_SYSTEM}|abc123"
