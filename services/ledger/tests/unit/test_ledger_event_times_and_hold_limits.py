"""Rules of the ledger: published events carry the posting time, and a held amount stays within what the store holds (in memory)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from kabinet_contracts.envelope import IntegrationEvent
from ledger.domain import commands as c
from ledger.domain.balance import Balance
from ledger.domain.batch import BALANCE_MINOR_MAX
from ledger.domain.errors import InvalidHold
from ledger.integration import to_integration
from services.ledger.tests.unit.ledger_world import T0, World, transfer


@pytest.fixture
def world() -> World:
    return World()


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
