"""Rules of the ledger: every published event carries the ledger's time (the batch's, which never goes back), and a
held amount stays within what the store holds (in memory)."""

from __future__ import annotations

from datetime import timedelta

from kabinet_contracts.envelope import IntegrationEvent
from ledger.domain import commands as c
from ledger.domain.balance import Balance
from ledger.domain.batch import BALANCE_MINOR_MAX
from ledger.domain.errors import InvalidHold
from ledger.integration import to_integration
from services.ledger.tests.unit.ledger_world import T0, World, transfer


def published(world: World, kind: str) -> list[IntegrationEvent]:
    return [to_integration(event, position) for position, event in enumerate(world.saved_events, start=1)
            if type(event).__qualname__ == kind]


def test_a_published_transfer_occurred_when_the_ledger_posted_it(world):
    # The ledger's clock (T0, as a test or a clock held at the last batch's time has it) is
    # the posting time its statements use; subscribers must see the same instant.
    settlement, card = world.open("settlement"), world.open()
    world.later(hours=3)
    world.one(transfer("top-up", (settlement, -500), (card, 500), code="top_up"))
    [event] = [e for e in published(world, "Transfer.Posted") if e.payload["transfer_id"] == "top-up"]
    assert event.occurred_at == T0 + timedelta(hours=3)


def test_no_hold_reserves_past_what_the_store_can_hold_and_the_batch_goes_on(world):
    # A bank-internal account may reserve without a funds check; its held amount still has
    # to fit the store's bigint, or the whole batch (every neighbour) fails at the commit.
    settlement, shop = world.open("settlement"), world.open(owner="shop")
    largest = c.AMOUNT_MINOR_MAX
    world.balances[settlement] = Balance(0, BALANCE_MINOR_MAX - largest + 1, 1)  # as after thousands of the largest holds
    refused, accepted = world.run(
        c.PlaceHold("too-far", settlement, shop, largest, "RUB", T0 + timedelta(days=1), "payout"),
        c.PlaceHold("fits", settlement, shop, 1, "RUB", T0 + timedelta(days=1), "payout"),
    )
    assert isinstance(refused, InvalidHold) and "the most a balance may hold" in str(refused)
    assert accepted.hold_id == "fits" and world.balance(settlement).held_minor == BALANCE_MINOR_MAX - largest + 2


def test_a_hold_and_its_capture_are_published_at_the_times_the_ledger_placed_and_captured_it(world):
    # One capture is published twice (hold_captured, and the capture's transfer_posted):
    # both carry the ledger's time, not the moment Python made the event object.
    card, shop = world.open(), world.open(owner="shop")
    world.balances[card] = world.balances[card].changed(10_000, 0)
    world.later(hours=3)
    world.one(c.PlaceHold("h1", card, shop, 700, "RUB", T0 + timedelta(days=2), "purchase"))
    world.later(hours=5)
    world.one(c.CaptureHold("h1", "cap1", 700))
    [placed], [captured] = published(world, "Hold.Placed"), published(world, "Hold.Captured")
    [capture_transfer] = published(world, "Transfer.Posted")
    assert placed.occurred_at == T0 + timedelta(hours=3)
    assert captured.occurred_at == capture_transfer.occurred_at == T0 + timedelta(hours=8)


def test_an_expired_hold_is_never_published_as_expiring_before_its_deadline():
    world = World(now=T0 + timedelta(days=3650))  # the ledger's clock ten years on, far from the wall clock
    card, shop = world.open(), world.open(owner="shop")
    world.balances[card] = world.balances[card].changed(10_000, 0)
    deadline = world.now + timedelta(hours=1)
    world.one(c.PlaceHold("h2", card, shop, 700, "RUB", deadline, "purchase"))
    world.later(hours=2)
    world.one(c.ExpireHold("h2"))
    [expired] = published(world, "Hold.Expired")
    assert expired.occurred_at == deadline + timedelta(hours=1)


def test_account_events_are_published_at_the_ledger_time(world):
    card = world.open()
    world.later(hours=1)
    world.one(c.SetCreditLimit(card, 500))
    world.later(hours=1)
    world.one(c.FreezeAccount(card, "customer_request"))
    world.later(hours=1)
    world.one(c.UnfreezeAccount(card, "customer_request"))
    times = {event.type: event.occurred_at for event in
             (to_integration(e, p) for p, e in enumerate(world.saved_events, start=1)) if event is not None}
    assert times == {"ledger.account_opened": T0, "ledger.account_credit_limit_set": T0 + timedelta(hours=1),
                     "ledger.account_frozen": T0 + timedelta(hours=2), "ledger.account_unfrozen": T0 + timedelta(hours=3)}
