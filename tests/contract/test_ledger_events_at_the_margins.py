"""Rules of what the ledger publishes on ledger.events.v1, at the margins the other contract
tests leave (in memory, through the real mapping to integration events): every field of a
message says what happened (what an account is, which account pays a hold and which is paid,
when it lapses, what a capture and a release moved), in the account's own currency, not in
roubles assumed, at the ledger's exact time; each message keeps the id its position gives it
and its aggregate's own version; and the published document closes the envelope, every
payload and every list of reasons, as consumers validate them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from eventsourcing.persistence import StoredEvent

from kabinet_contracts.envelope import IntegrationEvent, event_id_for
from kabinet_contracts.ledger import LEDGER_TOPIC, AccountClosed, AccountClosedV1
from kabinet_contracts.registry import REGISTRY, EventRegistry, EventType
from ledger.domain import commands as c
from ledger.domain.batch import capture_transfer_id
from ledger.integration import to_integration
from services.ledger.tests.unit.ledger_world import T0, World, transfer
from tests.contract.test_ledger_published_events import DOCUMENT, schema_errors

DAY = timedelta(days=1)


@pytest.fixture
def world() -> World:
    return World()


def published(world: World) -> list[IntegrationEvent]:
    return [event for event in (to_integration(e, p) for p, e in enumerate(world.saved_events, start=1)) if event is not None]


def of_type(world: World, event_type: str) -> list[IntegrationEvent]:
    return [e for e in published(world) if e.type == event_type]


def a_dollar_card_day(world: World) -> dict[str, Any]:
    """Alice's dollar card: topped up, a purchase authorised, part cleared, the rest released,
    and a second authorisation left to lapse."""
    settlement = world.open("settlement", currency="USD")
    card = world.open("card", owner="alice", currency="USD")
    shop = world.open(owner="shop", currency="USD")
    world.one(c.SetCreditLimit(card, 5_000))
    world.one(transfer("top-up", (settlement, -100_000), (card, 100_000), code="top_up", currency="USD"))
    world.one(c.PlaceHold("purchase", card, shop, 50_000, "USD", T0 + 7 * DAY, "card_purchase"))
    world.one(c.CaptureHold("purchase", "clearing-1", 30_000))
    world.one(c.VoidHold("purchase"))
    world.one(c.PlaceHold("expiring", card, shop, 700, "USD", T0 + DAY / 2, "card_purchase"))
    world.later(days=1)
    world.one(c.ExpireHold("expiring"))
    return {"settlement": settlement, "card": card, "shop": shop}


def test_an_account_opening_publishes_its_owner_kind_currency_and_credit_limit(world):
    # Cards shows Alice's new dollar loan line and what she may spend on it from this event alone.
    loan = world.open("loan", owner="alice", currency="USD", limit=2_500)
    [opened] = [e for e in of_type(world, "ledger.account_opened") if e.aggregate_id == str(loan)]
    assert opened.payload == {"account_id": str(loan), "owner_id": "alice", "kind": "loan", "currency": "USD", "credit_limit_minor": 2_500}
    assert opened.customer_id == "alice"


def currencies_named(event: IntegrationEvent) -> set[str]:
    payload = event.payload
    if event.type == "ledger.hold_placed":
        return {payload["amount"]["currency"]}
    if event.type == "ledger.transfer_posted":
        return {leg["currency"] for leg in payload["legs"]}
    return {payload["currency"]}


def test_every_amount_the_ledger_publishes_about_a_dollar_card_is_in_dollars(world):
    # "500.00 USD authorised", never "500.00 RUB": no subscriber may assume the rouble.
    a_dollar_card_day(world)
    named: dict[str, set[str]] = {}
    for event in published(world):
        named.setdefault(event.type, set()).update(currencies_named(event))
    assert named == dict.fromkeys(
        (
            "ledger.account_opened",
            "ledger.account_credit_limit_set",
            "ledger.transfer_posted",
            "ledger.hold_placed",
            "ledger.hold_captured",
            "ledger.hold_voided",
            "ledger.hold_expired",
        ),
        {"USD"},
    )


def test_a_placed_hold_says_which_account_pays_which_is_paid_how_much_for_what_and_until_when(world):
    # Notifications: "Ozon: 500.00 USD reserved on your card until 2 December"; cards counts
    # the reservation against the card, not against the shop.
    ids = a_dollar_card_day(world)
    [placed, _] = of_type(world, "ledger.hold_placed")
    assert placed.payload == {
        "hold_id": "purchase",
        "debit_account_id": str(ids["card"]),
        "credit_account_id": str(ids["shop"]),
        "amount": {"amount_minor": 50_000, "currency": "USD"},
        "expires_at": "2026-12-02T09:00:00Z",
        "code": "card_purchase",
        "external_ref": None,
        "metadata": {},
    }


def test_a_capture_and_each_release_publish_the_amounts_they_moved_and_the_transfer_that_moved_them(world):
    # "300.00 USD paid, 200.00 USD returned to your card", and the capture's transfer found by its id.
    a_dollar_card_day(world)
    [captured] = of_type(world, "ledger.hold_captured")
    assert captured.payload == {
        "hold_id": "purchase",
        "capture_id": "clearing-1",
        "amount_minor": 30_000,
        "transfer_id": capture_transfer_id("purchase", "clearing-1"),
        "currency": "USD",
    }
    assert [e.payload["transfer_id"] for e in of_type(world, "ledger.transfer_posted") if e.payload["hold_id"] == "purchase"] == [
        captured.payload["transfer_id"]
    ]
    [voided] = of_type(world, "ledger.hold_voided")
    [expired] = of_type(world, "ledger.hold_expired")
    assert voided.payload == {"hold_id": "purchase", "released_minor": 20_000, "currency": "USD"}
    assert expired.payload == {"hold_id": "expiring", "released_minor": 700, "currency": "USD"}


def test_each_published_event_has_the_id_of_its_position_so_a_republished_one_is_known_as_a_duplicate(world):
    # Two events of one aggregate version never share an id; the same notification republished
    # (after a relay crash) keeps its id, whatever aggregate it is about.
    a_dollar_card_day(world)
    events = published(world)
    assert [e.event_id for e in events] == [event_id_for("ledger", e.position) for e in events]
    assert len({e.event_id for e in events}) == len(events)


def test_a_transfer_stored_before_its_timestamp_was_the_posting_time_is_published_at_its_posting_time(world):
    # Statements and balances at an instant read posted_at: an analyst replaying the topic must
    # find the transfer at the same instant, not when Python made the event object.
    settlement, card = world.open("settlement"), world.open()
    world.later(hours=3)
    world.one(transfer("top-up", (settlement, -500), (card, 500), code="top_up"))
    [new] = [e for e in world.saved_events if type(e).__qualname__ == "Transfer.Posted"]
    mapper = world.app.mapper
    stored = mapper.to_stored_event(new)
    state = mapper.transcoder.decode(stored.state)
    state["timestamp"] = T0 + timedelta(hours=3, seconds=2)  # made a moment after the batch's time, as then
    old = mapper.to_domain_event(
        StoredEvent(stored.originator_id, stored.originator_version, stored.topic, mapper.transcoder.encode(state))
    )
    assert old.timestamp != old.posted_at
    assert to_integration(old, 1).occurred_at == T0 + timedelta(hours=3)


def test_each_event_names_its_aggregates_own_version_counting_from_one_for_each_account_hold_and_transfer(world):
    # A subscriber applies an account's events in order and spots a gap by its versions
    # 1, 2, 3, ...: not by positions in the ledger's log, which every other account shares.
    a_dollar_card_day(world)
    versions: dict[str, list[int]] = {}
    for event in published(world):
        versions.setdefault(event.aggregate_id, []).append(event.aggregate_version)
    assert {a: v for a, v in versions.items() if v != list(range(1, len(v) + 1))} == {}
    assert max(len(v) for v in versions.values()) > 1


def test_every_event_is_published_at_the_ledgers_exact_time_to_the_microsecond():
    # An analyst joins the topic to statements by instant: a batch at 09:00:00.123456 is not 09:00:00.
    instant = T0.replace(microsecond=123_456)
    world = World(now=instant)
    settlement, card = world.open("settlement"), world.open(owner="alice")
    world.one(c.SetCreditLimit(card, 1_000))
    world.one(transfer("top-up", (settlement, -500), (card, 500), code="top_up"))
    world.one(c.PlaceHold("purchase", card, settlement, 300, "RUB", T0 + DAY, "card_purchase"))
    world.one(c.CaptureHold("purchase", "clearing-1", 100))
    world.one(c.VoidHold("purchase"))
    world.run(c.FreezeAccount(card, "customer_request"), c.UnfreezeAccount(card, "customer_request"))
    events = published(world)
    assert len({e.type for e in events}) == 8
    assert {(e.type, e.occurred_at) for e in events if e.occurred_at != instant} == set()


def envelope(**changes: Any) -> dict:
    event = {
        "event_id": str(event_id_for("ledger", 1)),
        "type": "ledger.account_closed",
        "schema_version": 2,
        "source": "ledger",
        "position": 1,
        "aggregate_id": "a1",
        "aggregate_version": 3,
        "occurred_at": "2026-11-25T09:00:00Z",
        "customer_id": "alice",
        "payload": {"account_id": "a1", "reason": "customer_request"},
    }
    return event | changes


def test_an_envelope_a_consumer_reads_has_a_position_from_one_a_bounded_customer_and_no_field_unknown_to_it():
    # Consumers read every record as an IntegrationEvent: position 0 is "nothing applied yet"
    # (the previous-position header of a partition's first record), never an event's own.
    assert not schema_errors(envelope(), {"$ref": "#/components/schemas/IntegrationEvent"})
    IntegrationEvent.model_validate(envelope())
    for wrong in ({"position": 0}, {"customer_id": "a" * 129}, {"account_id": "a1"}):
        assert schema_errors(envelope(**wrong), {"$ref": "#/components/schemas/IntegrationEvent"}), wrong
        with pytest.raises(ValueError):
            IntegrationEvent.model_validate(envelope(**wrong))


def ledger_payload_schemas() -> dict[str, dict]:
    schemas = DOCUMENT["components"]["schemas"]
    return {
        name: schemas[name]
        for name in schemas
        if any(name == f"{t.name.replace('.', '_')}_v{t.schema_version}_payload" for t in REGISTRY.all() if t.topic == LEDGER_TOPIC)
    }


def test_the_document_tells_consumers_no_ledger_payload_carries_a_field_it_does_not_describe():
    # A consumer generated from the document may refuse what it does not know: the ledger
    # promises it sends nothing else, in any payload or in the envelope.
    payloads = ledger_payload_schemas()
    assert len(payloads) == len([t for t in REGISTRY.all() if t.topic == LEDGER_TOPIC])
    loose = [
        name
        for name, schema in {**payloads, "IntegrationEvent": DOCUMENT["components"]["schemas"]["IntegrationEvent"]}.items()
        if schema.get("additionalProperties") is not False
    ]
    assert loose == []


def test_the_document_names_every_reason_a_freeze_a_closing_or_a_reversal_may_give_and_no_other():
    # Notifications words each reason ("closed at your request"); one the document does not
    # list would arrive with no wording, so the document lists them all, closed.
    def payload_errors(name: str, payload: dict) -> list[str]:
        return schema_errors(payload, {"$ref": f"#/components/schemas/{name}"})

    closed = {"account_id": "a1", "reason": "customer_deceased"}
    frozen = {"account_id": "a1", "reason": "court_order", "freezes_left": ["court_order", "not_recorded"]}
    reversal = {
        "transfer_id": "t1:reversal",
        "code": "reversal",
        "legs": [],
        "external_ref": None,
        "customer_ids": [],
        "metadata": {},
        "hold_id": None,
        "reverses": "t1",
        "reversal_reason": "duplicate",
    }
    assert payload_errors("ledger_account_closed_v2_payload", closed) == []
    assert payload_errors("ledger_account_frozen_v2_payload", frozen) == []
    assert payload_errors("ledger_transfer_posted_v3_payload", reversal) == []
    assert payload_errors("ledger_account_closed_v2_payload", closed | {"reason": "moved_abroad"})
    assert payload_errors("ledger_account_frozen_v2_payload", frozen | {"reason": "whim"})
    assert payload_errors("ledger_account_unfrozen_v2_payload", frozen | {"freezes_left": ["whim"]})
    assert payload_errors("ledger_transfer_posted_v3_payload", reversal | {"reversal_reason": "changed_mind"})


def test_a_posted_transfer_publishes_exactly_what_the_document_describes_and_nothing_more(world):
    # Alice's top-up, as notifications and an analyst read it: every field, and no other.
    ids = a_dollar_card_day(world)
    [top_up] = [e for e in of_type(world, "ledger.transfer_posted") if e.payload["transfer_id"] == "top-up"]
    assert top_up.payload == {
        "transfer_id": "top-up",
        "code": "top_up",
        "external_ref": None,
        "customer_ids": [],
        "metadata": {},
        "hold_id": None,
        "reverses": None,
        "reversal_reason": None,
        "legs": [
            {"account_id": str(ids["settlement"]), "amount_minor": -100_000, "currency": "USD", "customer_id": None},
            {"account_id": str(ids["card"]), "amount_minor": 100_000, "currency": "USD", "customer_id": "alice"},
        ],
    }
    assert (top_up.customer_id, top_up.schema_version) == ("alice", 3)
    assert schema_errors(top_up.payload, {"$ref": "#/components/schemas/ledger_transfer_posted_v3_payload"}) == []


def test_a_second_payload_for_an_event_type_and_version_already_registered_is_refused():
    # One (type, version) is one schema: a second would leave consumers and the document
    # each to pick one of two, and records of it on the topic readable two ways.
    registry = EventRegistry()
    first = registry.register(EventType("ledger.account_closed", 2, LEDGER_TOPIC, AccountClosed, "closed"))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(EventType("ledger.account_closed", 2, LEDGER_TOPIC, AccountClosedV1, "closed, again"))
    assert registry.get("ledger.account_closed", 2) is first
    assert registry.all() == [first]
