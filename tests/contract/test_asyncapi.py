"""The published contract: every registered event appears in the AsyncAPI document, and the
document stands alone (every `$ref` in it points at something in it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, create_model

from kabinet_contracts.asyncapi import asyncapi_document
from kabinet_contracts.ledger import LEDGER_TOPIC
from kabinet_contracts.registry import REGISTRY, EventRegistry, EventType
from ledger.integration import PUBLISHED_AS


def published_document() -> dict:
    kabinet = Path(sys.executable).with_name("kabinet")
    output = subprocess.run([str(kabinet), "docs", "asyncapi"], check=True, capture_output=True, text=True).stdout
    return json.loads(output)


def refs(node) -> list[str]:
    """Every `$ref` value anywhere in a JSON document."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.append(value)
            else:
                found += refs(value)
    elif isinstance(node, list):
        for value in node:
            found += refs(value)
    return found


def resolves(document: dict, ref: str) -> bool:
    """Whether a local JSON pointer (`#/a/b`, RFC 6901) names something in the document."""
    if not ref.startswith("#/"):
        return False  # the document must stand alone: no references to other files
    node = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_kabinet_docs_asyncapi_lists_every_ledger_event():
    document = published_document()
    assert document["asyncapi"] == "3.0.0"
    channel = document["channels"]["ledger_events_v1"]
    assert channel["address"] == "ledger.events.v1"
    names = {document["components"]["messages"][m]["name"] for m in channel["messages"]}
    assert names == {
        "ledger.account_opened", "ledger.account_credit_limit_set", "ledger.account_frozen", "ledger.account_unfrozen",
        "ledger.account_closed", "ledger.transfer_posted", "ledger.hold_placed", "ledger.hold_captured", "ledger.hold_voided",
        "ledger.hold_expired",
    }
    payload = document["components"]["schemas"]["ledger_transfer_posted_v1_payload"]
    assert "legs" in payload["properties"] and "transfer_id" in payload["required"]


def test_every_ref_in_the_published_asyncapi_document_resolves_within_it():
    document = published_document()
    dangling = sorted({ref for ref in refs(document) if not resolves(document, ref)})
    assert dangling == [], f"$refs that point nowhere in the published AsyncAPI document: {dangling}"
    # The models inside payloads (a transfer's legs, a hold's amount) are schemas of their own.
    assert {"Leg", "MoneyDTO"} <= set(document["components"]["schemas"])
    assert not any("$defs" in schema for schema in document["components"]["schemas"].values())


def _registry_of(*payloads: type[BaseModel]) -> EventRegistry:
    registry = EventRegistry()
    for number, payload in enumerate(payloads, start=1):
        registry.register(EventType(f"test.event_{number}", 1, "test.events.v1", payload, "a test event"))
    return registry


def test_two_payloads_with_different_models_of_one_name_are_refused_not_published_with_a_ref_to_the_wrong_one():
    # Two models both called Amount (as two modules may have): one name under components/schemas.
    amount_in_minor_units = create_model("Amount", amount_minor=(int, ...))
    amount_as_text = create_model("Amount", amount=(str, ...))
    first = create_model("FirstPayload", amount=(amount_in_minor_units, ...))
    second = create_model("SecondPayload", amount=(amount_as_text, ...))
    with pytest.raises(ValueError, match="'Amount'"):
        asyncapi_document(_registry_of(first, second))


def test_two_payloads_sharing_one_model_publish_it_once():
    class Amount(BaseModel):
        amount_minor: int

    class FirstPayload(BaseModel):
        amount: Amount

    class SecondPayload(BaseModel):
        total: Amount

    document = asyncapi_document(_registry_of(FirstPayload, SecondPayload))
    assert document["components"]["schemas"]["Amount"] == Amount.model_json_schema()
    assert all(resolves(document, ref) for ref in refs(document))


def test_the_ledger_publishes_exactly_the_event_types_its_asyncapi_channel_documents():
    """What subscribers and analysts read off the document is what arrives: a domain event
    mapped to a public type the document lacks, or a documented type nothing publishes,
    fails here, whether or not an integration test happens to produce it."""
    published = {name for name, _ in PUBLISHED_AS.values()}
    assert len(published) == len(PUBLISHED_AS), "two domain events are published as one type"
    registered = {event_type.name for event_type in REGISTRY.all() if event_type.topic == LEDGER_TOPIC}
    document = asyncapi_document(REGISTRY)
    channel = document["channels"][LEDGER_TOPIC.replace(".", "_")]
    documented = {document["components"]["messages"][name]["name"] for name in channel["messages"]}
    assert published - documented == set(), "published, but not in the AsyncAPI document"
    assert documented - published == set(), "in the AsyncAPI document, but no domain event is published as it"
    assert registered == documented


def test_the_ledger_publishes_each_type_at_its_newest_documented_version():
    """A consumer upgraded to the newest version of the document reads what the ledger sends
    now; older versions stay documented for the records of them already on the topic."""
    newest: dict[str, int] = {}
    for event_type in REGISTRY.all():
        if event_type.topic == LEDGER_TOPIC:
            newest[event_type.name] = max(newest.get(event_type.name, 0), event_type.schema_version)
    assert dict(PUBLISHED_AS.values()) == newest
