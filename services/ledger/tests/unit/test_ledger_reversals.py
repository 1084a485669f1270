"""Rules of reversals (storno): a posted transfer stays in the history, and its reversal, a
transfer of the same legs negated, stands beside it; at most one per transfer."""

from __future__ import annotations

import pytest

from ledger.domain import commands as c
from ledger.domain.batch import capture_transfer_id, reversal_transfer_id
from ledger.domain.errors import (
    AccountFrozen,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidHold,
    InvalidTransfer,
    TransferNotFound,
)
from ledger.domain.transfer import Transfer
from services.ledger.tests.unit.ledger_world import T0, World, transfer

DAY_S = 86_400


def paid_by_mistake(world: World) -> tuple:
    """Alice (1,000 on her card) paid Bob 300 with a 5 fee; returns the accounts."""
    settlement, fees = world.open("settlement"), world.open("fee_income")
    alice, bob = world.open(), world.open(owner="bob")
    world.one(transfer("fund", (settlement, -1_000), (alice, 1_000), code="top_up"))
    world.one(c.PostTransfer("p2p-1", (c.Leg(alice, -305, "RUB"), c.Leg(bob, 300, "RUB"), c.Leg(fees, 5, "RUB")),
                             "p2p", external_ref="sbp-77", metadata={"message": "rent"}))
    return alice, bob, fees


def test_a_reversal_moves_every_leg_back_and_names_the_transfer_it_reverses(world):
    alice, bob, fees = paid_by_mistake(world)
    result = world.one(c.ReverseTransfer("p2p-1", "posted_in_error", requested_by="staff-7"))
    assert (result.transfer_id, result.code) == ("p2p-1:reversal", "reversal")
    assert [(leg["account_id"], leg["amount_minor"]) for leg in result.legs] == [
        (str(alice), 305), (str(bob), -300), (str(fees), -5)]
    assert [world.balance(a).posted_minor for a in (alice, bob, fees)] == [1_000, 0, 0]
    reversal = world.store[Transfer.id_for("p2p-1:reversal")]
    assert (reversal.reverses, reversal.reversal_reason) == ("p2p-1", "posted_in_error")
    assert (reversal.external_ref, reversal.metadata) == ("sbp-77", {"message": "rent"}), "what it reverses, on its line"
    assert world.store[Transfer.id_for("p2p-1")].legs[1]["amount_minor"] == 300, "the reversed transfer stays as posted"


def test_a_transfer_is_reversed_at_most_once(world):
    alice, bob, _ = paid_by_mistake(world)
    world.one(c.ReverseTransfer("p2p-1", "duplicate"))
    again = world.one(c.ReverseTransfer("p2p-1", "duplicate"))
    assert again.replayed and world.balance(bob).posted_minor == 0
    with pytest.raises(IdempotencyConflict, match="reversal of transfer p2p-1"):
        world.one(c.ReverseTransfer("p2p-1", "fraud_confirmed"))
    # Two reversals in one batch: the second is the first's repeat.
    world.one(transfer("p2p-2", (alice, -100), (bob, 100)))
    first, second = world.run(c.ReverseTransfer("p2p-2", "duplicate"), c.ReverseTransfer("p2p-2", "duplicate"))
    assert not first.replayed and second.replayed and world.balance(bob).posted_minor == 0


def test_a_reversal_the_payee_cannot_fund_is_refused_and_may_be_asked_again_once_she_can(world):
    alice, bob, _ = paid_by_mistake(world)
    world.one(transfer("spent", (bob, -250), (alice, 250)))
    with pytest.raises(InsufficientFunds, match=str(bob)):
        world.one(c.ReverseTransfer("p2p-1", "posted_in_error"))
    assert world.balance(bob).posted_minor == 50, "nothing moved"
    world.one(transfer("back", (alice, -250), (bob, 250)))
    assert not world.one(c.ReverseTransfer("p2p-1", "posted_in_error")).replayed


def test_a_frozen_payee_is_not_debited_by_a_reversal(world):
    alice, bob, _ = paid_by_mistake(world)
    world.one(c.FreezeAccount(bob, "court_order"))
    with pytest.raises(AccountFrozen):
        world.one(c.ReverseTransfer("p2p-1", "posted_in_error"))


def test_only_a_posted_transfer_that_is_not_a_reversal_can_be_reversed(world):
    paid_by_mistake(world)
    with pytest.raises(TransferNotFound):
        world.one(c.ReverseTransfer("never-posted", "posted_in_error"))
    world.one(c.ReverseTransfer("p2p-1", "posted_in_error"))
    with pytest.raises(InvalidTransfer, match="is a reversal"):
        world.one(c.ReverseTransfer("p2p-1:reversal", "posted_in_error"))
    with pytest.raises(InvalidTransfer, match="unknown reversal reason"):
        world.one(c.ReverseTransfer("fund", "changed_my_mind"))


def test_no_client_id_can_take_a_reversals_id(world):
    settlement, card = world.open("settlement"), world.open()
    with pytest.raises(InvalidTransfer, match="reserved for reversals"):
        world.one(transfer("t1:reversal", (settlement, -1), (card, 1)))
    world.one(c.PlaceHold("h1", settlement, card, 10, "RUB", T0.replace(year=2027), "card_purchase"))
    with pytest.raises(InvalidHold, match="reserved for reversals"):  # "h1:capture:x:reversal" would be x's reversal
        world.one(c.CaptureHold("h1", "x:reversal", 5))


def test_no_transfer_or_hold_may_pass_for_a_reversal_by_its_code(world):
    # In history, a plain transfer coded "reversal" would show as a reversal of nothing.
    settlement, card = world.open("settlement"), world.open()
    since = len(world.saved_events)
    with pytest.raises(InvalidTransfer, match="'reversal' is the ledger's own"):
        world.one(transfer("refund-by-hand", (settlement, -1), (card, 1), code="reversal"))
    with pytest.raises(InvalidHold, match="'reversal' is the ledger's own"):
        world.one(c.PlaceHold("h1", settlement, card, 10, "RUB", T0.replace(year=2027), "reversal"))
    assert world.saved_events[since:] == [], "refused for its shape: nothing kept"


def test_a_captured_card_purchase_is_reversed_as_its_capture_transfer(world):
    settlement, card = world.open("settlement"), world.open()
    shop = world.open("marketplace_clearing")
    world.one(transfer("fund", (settlement, -1_000), (card, 1_000), code="top_up"))
    world.one(c.PlaceHold("auth", card, shop, 400, "RUB", T0.replace(year=2027), "card_purchase",
                          metadata={"merchant": "Ozon"}))
    world.one(c.CaptureHold("auth", "clearing", 400))
    reversed_ = world.one(c.ReverseTransfer(capture_transfer_id("auth", "clearing"), "dispute_upheld"))
    assert reversed_.transfer_id == reversal_transfer_id("auth:capture:clearing")
    assert (world.balance(card).posted_minor, world.balance(shop).posted_minor) == (1_000, 0)
