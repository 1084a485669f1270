"""A hold is settled in a bounded number of captures: its stream, which the single writer
replays whenever it loads the hold, never grows without end."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ledger.domain import commands as c
from ledger.domain.errors import CaptureExceedsHold
from ledger.domain.hold import CAPTURES_PER_HOLD_MAX, Hold
from services.ledger.tests.unit.ledger_world import T0, World, transfer


def test_a_hold_takes_a_bounded_number_of_captures_and_what_is_left_is_released_by_its_void():
    world = World()
    settlement, card, shop = world.open("settlement"), world.open("card"), world.open("card", owner="shop")
    world.one(transfer("fund", (settlement, -20_000), (card, 20_000), code="top_up"))
    world.one(c.PlaceHold("auth-1", card, shop, 10_000, "RUB", T0 + timedelta(days=1), "card_purchase"))
    world.run(*[c.CaptureHold("auth-1", f"part-{n}", 1) for n in range(CAPTURES_PER_HOLD_MAX)])

    one_more = c.CaptureHold("auth-1", "part-last", 1)
    other_payment = transfer("rent", (card, -100), (settlement, 100))
    refused, paid = world.run(one_more, other_payment)
    assert isinstance(refused, CaptureExceedsHold) and str(CAPTURES_PER_HOLD_MAX) in str(refused)
    assert paid.transfer_id == "rent"  # its neighbour in the batch is not failed with it
    again = world.run(one_more)[0]  # a repeat is refused alike
    assert isinstance(again, CaptureExceedsHold) and str(again) == str(refused)

    with pytest.raises(CaptureExceedsHold):  # the aggregate guards the rule itself too
        world.store[Hold.id_for("auth-1")].capture("auth-1", "part-last", 1, "auth-1:capture:part-last", "alice", T0,
                                                   "payments")

    left = 20_000 - CAPTURES_PER_HOLD_MAX
    assert world.one(c.VoidHold("auth-1")).remaining_minor == 0
    assert world.balance(card).posted_minor == left - 100 and world.balance(card).held_minor == 0
    assert world.balance(shop).posted_minor == CAPTURES_PER_HOLD_MAX
