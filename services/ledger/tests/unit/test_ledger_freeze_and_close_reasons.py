"""Rules of the bank on why accounts are frozen and closed: every freeze and every closing
names its reason, and freezes stack, so that lifting one (the customer's own) never lifts
another (a court's). Subscribers learn the reason, and whether the account is still frozen,
from the published event alone."""

from __future__ import annotations

import pytest

from ledger.domain import commands as c
from ledger.domain.errors import AccountFrozen, InvalidAccount
from ledger.integration import to_integration
from services.ledger.tests.unit.ledger_world import World, funded, transfer


def test_a_card_frozen_by_a_court_stays_frozen_when_the_customer_lifts_her_own_freeze(world):
    settlement, card = funded(world)
    world.one(c.FreezeAccount(card, "customer_request", requested_by="alice"))
    world.one(c.FreezeAccount(card, "court_order", requested_by="staff-olga"))
    assert world.account(card).freeze_reasons == ("court_order", "customer_request")

    assert world.one(c.UnfreezeAccount(card, "customer_request", requested_by="alice")).state == "frozen"
    assert world.account(card).freeze_reasons == ("court_order",)
    with pytest.raises(AccountFrozen):
        world.one(transfer("rent", (card, -100), (settlement, 100)))

    assert world.one(c.UnfreezeAccount(card, "court_order", requested_by="staff-olga")).state == "open"
    assert world.account(card).freeze_reasons == ()
    world.one(transfer("rent-once-unfrozen", (card, -100), (settlement, 100)))


def test_each_freeze_and_its_lifting_is_an_event_naming_its_reason_and_who_asked(world):
    _, card = funded(world)
    since = len(world.saved_events)
    world.one(c.FreezeAccount(card, "fraud_suspected", requested_by="antifraud"))
    world.one(c.UnfreezeAccount(card, "fraud_suspected", requested_by="staff-olga"))
    said = [(type(e).__qualname__, e.reason, e.requested_by) for e in world.saved_events[since:]]
    assert said == [("Account.Frozen", "fraud_suspected", "antifraud"),
                    ("Account.Unfrozen", "fraud_suspected", "staff-olga")]


def test_freezing_again_for_the_same_reason_or_lifting_a_freeze_it_has_not_changes_nothing(world):
    _, card = funded(world)
    world.one(c.FreezeAccount(card, "compliance_review"))
    since = len(world.saved_events)
    assert world.one(c.FreezeAccount(card, "compliance_review")).state == "frozen"
    assert world.one(c.UnfreezeAccount(card, "court_order")).state == "frozen"
    assert world.events_of(card, since) == [], "a repeat is no new event"
    assert world.account(card).freeze_reasons == ("compliance_review",)


def test_a_reason_the_bank_does_not_have_is_refused_by_name_and_changes_nothing(world):
    _, card = funded(world)
    since = len(world.saved_events)
    for command in (c.FreezeAccount(card, "because"), c.UnfreezeAccount(card, "because"), c.CloseAccount(card, "because")):
        with pytest.raises(InvalidAccount, match="'because' is no reason to"):
            world.one(command)
    assert world.events_of(card, since) == [] and world.account(card).state == "open"


def test_a_closed_account_says_why(world):
    shop = world.open("card", owner="shop")
    assert world.one(c.CloseAccount(shop, "customer_deceased", requested_by="staff-olga")).state == "closed"
    assert world.account(shop).close_reason == "customer_deceased"
    assert world.saved_events[-1].reason == "customer_deceased"


@pytest.mark.parametrize("freeze", ["court_order", "compliance_review", "fraud_suspected"])
def test_an_empty_account_under_a_freeze_the_customer_did_not_ask_for_does_not_close_until_it_is_lifted(world, freeze):
    # A closed account can no longer be unfrozen: closed under a bailiff's arrest, it would
    # stay arrested with nobody able to answer the bailiff.
    shop = world.open("card", owner="shop")
    world.one(c.FreezeAccount(shop, "customer_request", requested_by="shop"))
    world.one(c.FreezeAccount(shop, freeze, requested_by="staff-olga"))
    since = len(world.saved_events)
    with pytest.raises(AccountFrozen, match=f"frozen for {freeze}: that freeze must be lifted before the account closes"):
        world.one(c.CloseAccount(shop, "customer_request", requested_by="shop"))
    assert world.events_of(shop, since) == [] and world.account(shop).state == "frozen"

    world.one(c.UnfreezeAccount(shop, freeze, requested_by="staff-olga"))
    assert world.one(c.CloseAccount(shop, "customer_request", requested_by="shop")).state == "closed", (
        "her own freeze does not keep her account open")


def test_a_freeze_and_the_closing_it_forbids_in_one_batch_are_judged_in_order(world):
    shop = world.open("card", owner="shop")
    outcomes = world.run(c.FreezeAccount(shop, "court_order"), c.CloseAccount(shop, "bank_decision"))
    assert outcomes[0].state == "frozen" and isinstance(outcomes[1], AccountFrozen)
    assert world.account(shop).state == "frozen"


def test_a_freeze_stored_before_freezes_had_reasons_is_lifted_by_any_unfreeze(world):
    _, card = funded(world)
    account = world.account(card)
    account._freeze(timestamp=world.now, customer_id="alice")  # as such an event replays: no reason
    account.collect_events()
    assert account.freeze_reasons == ("not_recorded",) and account.state == "frozen"
    assert world.one(c.UnfreezeAccount(card, "customer_request")).state == "open"
    assert world.account(card).freeze_reasons == ()


def published_since(world: World, since: int) -> list[tuple[str, int, dict]]:
    return [(e.type, e.schema_version, e.payload) for e in
            (to_integration(event, position) for position, event in enumerate(world.saved_events[since:], start=1))
            if e is not None]


def test_a_subscriber_learns_the_reason_and_the_freezes_left_from_each_published_freeze(world):
    # Cards unblocks Alice's card on the event that leaves no freeze, not on the first unfreeze.
    _, card = funded(world)
    since = len(world.saved_events)
    world.one(c.FreezeAccount(card, "customer_request", requested_by="alice"))
    world.one(c.FreezeAccount(card, "court_order", requested_by="staff-olga"))
    world.one(c.UnfreezeAccount(card, "customer_request", requested_by="alice"))
    world.one(c.UnfreezeAccount(card, "court_order", requested_by="staff-olga"))
    account_id = str(card)
    assert published_since(world, since) == [
        ("ledger.account_frozen", 2, {"account_id": account_id, "reason": "customer_request",
                                      "freezes_left": ["customer_request"]}),
        ("ledger.account_frozen", 2, {"account_id": account_id, "reason": "court_order",
                                      "freezes_left": ["court_order", "customer_request"]}),
        ("ledger.account_unfrozen", 2, {"account_id": account_id, "reason": "customer_request",
                                        "freezes_left": ["court_order"]}),
        ("ledger.account_unfrozen", 2, {"account_id": account_id, "reason": "court_order", "freezes_left": []}),
    ]


def test_a_published_closing_names_its_reason(world):
    shop = world.open("card", owner="shop")
    since = len(world.saved_events)
    world.one(c.CloseAccount(shop, "product_ended"))
    assert published_since(world, since) == [
        ("ledger.account_closed", 2, {"account_id": str(shop), "reason": "product_ended"})]


def test_freezes_and_closings_stored_before_they_had_reasons_publish_what_they_can(world):
    # Republished from the start (a broker that lost its data, an analyst's replay), old
    # events still say what they can: one without a reason left one freeze or, lifted, none;
    # one with a reason but no list of freezes left says it does not know them.
    _, card = funded(world)
    spare = world.open("savings")
    account = world.account(card)
    account._freeze(timestamp=world.now, customer_id="alice")  # as such events replay: no reason
    account._unfreeze(timestamp=world.now, customer_id="alice")
    account._freeze(timestamp=world.now, customer_id="alice", reason="court_order")  # no freezes_left
    closing = world.account(spare)
    closing._close(timestamp=world.now, customer_id="alice")
    old = [*account.collect_events(), *closing.collect_events()]
    assert [(e.type, e.schema_version, e.payload) for e in (to_integration(event, 1) for event in old)] == [
        ("ledger.account_frozen", 2, {"account_id": str(card), "reason": "not_recorded", "freezes_left": ["not_recorded"]}),
        ("ledger.account_unfrozen", 2, {"account_id": str(card), "reason": "not_recorded", "freezes_left": []}),
        ("ledger.account_frozen", 2, {"account_id": str(card), "reason": "court_order", "freezes_left": None}),
        ("ledger.account_closed", 2, {"account_id": str(spare), "reason": None}),
    ]
