"""Rules of what the ledger publishes (in memory): every event about a customer's account or
a payment from it names her, never the bank; every amount a hold event publishes names its
currency; and events stored before they did still load, replay and publish."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from eventsourcing.persistence import StoredEvent

from kabinet_contracts.envelope import IntegrationEvent
from ledger.domain import commands as c
from ledger.domain.batch import capture_transfer_id
from ledger.domain.hold import Hold
from ledger.domain.transfer import Transfer
from ledger.integration import to_integration
from services.ledger.tests.unit.ledger_world import T0, World, transfer

DAY = timedelta(days=1)


def hold(hold_id: str, debit, credit, amount_minor: int, expires_at=T0 + DAY) -> c.PlaceHold:
    return c.PlaceHold(hold_id, debit, credit, amount_minor, "RUB", expires_at, "purchase")


def published(world: World) -> list[IntegrationEvent]:
    return [event for event in (to_integration(e, p) for p, e in enumerate(world.saved_events, start=1))
            if event is not None]


def a_day_of(world: World, owner: str):
    """Every kind of ledger event about an account of `owner` (the bank's own with "bank")."""
    settlement = world.open("settlement")
    kind = "suspense" if owner == "bank" else "card"
    card, spare = world.open(kind, owner=owner), world.open(kind, owner=owner)
    shop = world.open(owner="shop")
    if owner != "bank":
        world.one(c.SetCreditLimit(card, 5_000))
    world.one(transfer("top-up", (settlement, -100_000), (card, 100_000), code="top_up"))
    world.run(hold("purchase", card, shop, 50_000), hold("expiring", card, shop, 700, expires_at=T0 + DAY / 2))
    world.one(c.CaptureHold("purchase", "clearing-1", 30_000))
    world.one(c.VoidHold("purchase"))
    world.later(days=1)
    world.one(c.ExpireHold("expiring"))
    world.run(c.FreezeAccount(card, "customer_request"), c.UnfreezeAccount(card, "customer_request"),
              c.CloseAccount(spare, "customer_request"))
    return {"card": card, "spare": spare, "purchase": Hold.id_for("purchase"), "expiring": Hold.id_for("expiring"),
            "capture": Transfer.id_for(capture_transfer_id("purchase", "clearing-1"))}


def test_every_event_about_a_customers_account_or_payment_from_it_names_her(world):
    aggregates = a_day_of(world, "alice")
    hers = [e for e in published(world) if e.aggregate_id in {str(a) for a in aggregates.values()}]
    assert {e.type for e in hers} == {
        "ledger.account_opened", "ledger.account_credit_limit_set", "ledger.account_frozen", "ledger.account_unfrozen",
        "ledger.account_closed", "ledger.transfer_posted", "ledger.hold_placed", "ledger.hold_captured",
        "ledger.hold_voided", "ledger.hold_expired"}
    assert [(e.type, e.customer_id) for e in hers if e.customer_id != "alice"] == []
    [capture] = [e for e in hers if e.type == "ledger.transfer_posted"]
    assert capture.payload["customer_ids"] == ["alice"]


def test_the_bank_is_never_named_as_a_customer(world):
    # Its internal accounts freeze, close and hold like any (a suspense account reserving for
    # a disputed payment): the events are published, about no customer but the shop its
    # capture pays.
    aggregates = a_day_of(world, "bank")
    ours = [e for e in published(world) if e.aggregate_id in {str(a) for a in aggregates.values()}]
    assert {e.type for e in ours} >= {"ledger.account_frozen", "ledger.account_closed", "ledger.transfer_posted",
                                      "ledger.hold_placed", "ledger.hold_captured", "ledger.hold_expired"}
    assert [(e.type, e.customer_id) for e in ours if e.customer_id is not None] == [("ledger.transfer_posted", "shop")]
    [capture] = [e for e in ours if e.type == "ledger.transfer_posted"]
    assert capture.payload["customer_ids"] == []


def posted_to(world: World, command: c.PostTransfer) -> str | None:
    """The customer the transfer_posted of `command` is published for."""
    world.one(command)
    [posted] = [e for e in published(world) if e.type == "ledger.transfer_posted"
                and e.payload["transfer_id"] == command.transfer_id]
    assert posted.payload["customer_ids"] == list(command.customer_ids)  # the client's reference, as given
    return posted.customer_id


def test_a_card_payment_posted_without_customer_ids_names_the_cards_owner(world):
    card, shop = world.open(owner="alice", limit=1_000), world.open(owner="shop")
    assert posted_to(world, transfer("coffee", (card, -300), (shop, 300), code="card_purchase")) == "alice"


def test_a_transfer_is_published_for_its_payer_not_for_a_stranger_its_client_named(world):
    card, shop = world.open(owner="alice", limit=1_000), world.open(owner="shop")
    naming_mallory = c.PostTransfer("coffee", (c.Leg(card, -300, "RUB"), c.Leg(shop, 300, "RUB")), "card_purchase",
                                    customer_ids=("mallory",))
    assert posted_to(world, naming_mallory) == "alice"


def test_a_p2p_transfer_names_its_payer(world):
    bob, alice = world.open(owner="bob", limit=1_000), world.open(owner="alice")
    assert posted_to(world, transfer("gift", (alice, 100), (bob, -100))) == "bob"


def test_a_transfer_from_the_bank_names_the_customer_paid(world):
    settlement, card = world.open("settlement"), world.open(owner="alice")
    refund = c.PostTransfer("fee", (c.Leg(settlement, -5, "RUB"), c.Leg(card, 5, "RUB")), "refund",
                            customer_ids=("bank",))
    assert posted_to(world, refund) == "alice"


def test_a_transfer_between_internal_accounts_names_nobody(world):
    settlement, suspense = world.open("settlement"), world.open("suspense")
    assert posted_to(world, c.PostTransfer("sweep", (c.Leg(settlement, -5, "RUB"), c.Leg(suspense, 5, "RUB")),
                                           "adjustment", customer_ids=("alice",))) is None


def test_a_hold_capture_names_its_payer(world):
    card, shop = world.open(owner="alice", limit=1_000), world.open(owner="shop")
    world.one(hold("purchase", card, shop, 500))
    world.one(c.CaptureHold("purchase", "clearing-1", 300))
    [posted] = [e for e in published(world) if e.type == "ledger.transfer_posted"]
    assert posted.customer_id == "alice"


def test_every_amount_a_hold_event_publishes_names_its_currency(world):
    a_day_of(world, "alice")
    payloads = {e.type: e.payload for e in published(world) if e.type.startswith("ledger.hold_")}
    assert payloads["ledger.hold_placed"]["amount"]["currency"] == "RUB"
    assert {t: p["currency"] for t, p in payloads.items() if t != "ledger.hold_placed"} == dict.fromkeys(
        ("ledger.hold_captured", "ledger.hold_voided", "ledger.hold_expired"), "RUB")


def as_stored_before(world: World, event: Any) -> Any:
    """The event as the store gives back one stored before it named the customer (a
    transfer: its legs' customers) and who asked for it, and a hold's later events their
    currency."""
    mapper = world.app.mapper
    stored = mapper.to_stored_event(event)
    state = mapper.transcoder.decode(stored.state)
    added = ["customer_id", "debit_customer_id", "leg_owner_ids", "leg_customer_ids", "requested_by"]
    if type(event).__qualname__ in ("Hold.Captured", "Hold.Voided", "Hold.Expired"):
        added.append("currency")
    for field in added:
        state.pop(field, None)
    return mapper.to_domain_event(StoredEvent(stored.originator_id, stored.originator_version, stored.topic,
                                              mapper.transcoder.encode(state)))


def test_events_stored_before_they_named_the_customer_and_currency_still_replay_and_publish(world):
    ids = a_day_of(world, "alice")
    card, purchase, expiring = ids["card"], ids["purchase"], ids["expiring"]
    old = [as_stored_before(world, e) for e in world.saved_events]
    for aggregate_id in (card, ids["spare"], purchase, expiring):
        replayed = None
        for event in (e for e in old if e.originator_id == aggregate_id):
            replayed = event.mutate(replayed)
        live = world.store[aggregate_id]
        assert (replayed.version, replayed.state) == (live.version, live.state)
    republished = {e.type: e for e in (to_integration(event, p) for p, event in enumerate(old, start=1))
                   if e is not None and e.aggregate_id in (str(card), str(purchase), str(expiring))}
    assert republished["ledger.account_frozen"].customer_id is None
    assert republished["ledger.hold_placed"].customer_id is None
    assert republished["ledger.hold_captured"].payload["currency"] is None
    assert republished["ledger.hold_expired"].payload["currency"] is None


def test_a_transfer_stored_before_it_named_its_legs_customers_replays_and_names_its_clients_first_customer(world):
    alice, bob = world.open(owner="alice", limit=1_000), world.open(owner="bob")
    world.one(c.PostTransfer("gift", (c.Leg(alice, -100, "RUB"), c.Leg(bob, 100, "RUB")), "p2p",
                             customer_ids=("bank", "bob", "alice")))
    [new] = [e for e in world.saved_events if type(e).__qualname__ == "Transfer.Posted"]
    old = as_stored_before(world, new)
    assert "leg_owner_ids" not in old.__dict__ and "leg_customer_ids" not in old.__dict__
    replayed = old.mutate(None)
    assert (replayed.id, replayed.version, replayed.legs) == (new.originator_id, 1, new.legs)
    assert to_integration(new, 1).customer_id == "alice"
    assert to_integration(old, 1).customer_id == "bob"


def test_each_leg_of_a_published_transfer_names_its_accounts_customer_so_the_payee_learns_she_was_paid(world):
    # Notifications tells Bob "Alice sent you 100" from the event alone: no directory of accounts.
    alice, bob, fees = world.open(owner="alice", limit=1_000), world.open(owner="bob"), world.open("fee_income")
    world.one(c.PostTransfer("gift", (c.Leg(bob, 100, "RUB"), c.Leg(alice, -103, "RUB"), c.Leg(fees, 3, "RUB")), "p2p"))
    [posted] = [e for e in published(world) if e.type == "ledger.transfer_posted"]
    assert posted.schema_version == 3
    assert [(leg["amount_minor"], leg["customer_id"]) for leg in posted.payload["legs"]] == [
        (100, "bob"), (-103, "alice"), (3, None)]
    assert posted.customer_id == "alice", "the envelope names the payer first"


def test_a_transfer_stored_when_it_listed_its_customers_without_telling_legs_apart_still_publishes(world):
    alice, bob = world.open(owner="alice", limit=1_000), world.open(owner="bob")
    world.one(c.PostTransfer("gift", (c.Leg(bob, 100, "RUB"), c.Leg(alice, -100, "RUB")), "p2p"))
    [new] = [e for e in world.saved_events if type(e).__qualname__ == "Transfer.Posted"]
    mapper = world.app.mapper
    stored = mapper.to_stored_event(new)
    state = mapper.transcoder.decode(stored.state)
    del state["leg_owner_ids"]
    state["leg_customer_ids"] = ["alice", "bob"]  # payers first: as the ledger stored it then
    old = mapper.to_domain_event(StoredEvent(stored.originator_id, stored.originator_version, stored.topic,
                                             mapper.transcoder.encode(state)))
    published_old = to_integration(old, 1)
    assert published_old.customer_id == "alice"
    assert [leg["customer_id"] for leg in published_old.payload["legs"]] == [None, None], "whose leg is whose is unknown"
