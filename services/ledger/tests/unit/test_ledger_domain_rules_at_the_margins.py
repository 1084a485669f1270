"""Rules of the ledger's domain at their margins: a credit limit lowered under live holds,
a void at a hold's deadline to the second, the references a payment carries at their longest
and one past, credit limits at their most and on accounts that may carry none, and the
reversal of a capture under the longest ids. Mutation testing (a rule broken on purpose)
found no test holding them; each test here fails with its rule broken."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

import pytest

from ledger.domain import commands as c
from ledger.domain.account import CREDIT_LIMIT_MINOR_MAX
from ledger.domain.balance import Balance
from ledger.domain.batch import BALANCE_MINOR_MAX, capture_transfer_id, reversal_transfer_id
from ledger.domain.errors import (
    AccountClosed,
    AccountNotEmpty,
    InsufficientFunds,
    InvalidAccount,
    InvalidHold,
    InvalidTransfer,
    LegCurrencyMismatch,
)
from services.ledger.tests.unit.ledger_world import T0, funded

DAY = timedelta(days=1)


def test_a_credit_limit_cannot_be_lowered_below_what_live_holds_already_use(world):
    # 100 on the card, 400 authorised at a shop: the card uses 300 of its credit though
    # nothing was posted below zero yet. A lower limit would let the capture take it past it.
    _, card = funded(world, 100, limit=500)
    shop = world.open(owner="shop")
    world.one(c.PlaceHold("auth", card, shop, 400, "RUB", T0 + DAY, "card_purchase"))
    with pytest.raises(InsufficientFunds):
        world.one(c.SetCreditLimit(card, 299))
    assert world.account(card).credit_limit_minor == 500 and world.last_saved == []
    world.one(c.SetCreditLimit(card, 300))
    assert world.available(card) == 0
    assert world.one(c.CaptureHold("auth", "clearing", 400)).state == "captured"
    assert world.balance(card).posted_minor == -300


def test_a_void_at_the_holds_deadline_to_the_second_finds_it_expired(world):
    # At expires_at the authorisation has lapsed (a capture then is refused): a void arriving
    # that very second finds it expired by the ledger, as the sweep would have.
    _, card = funded(world, 1_000)
    shop = world.open(owner="shop")
    world.one(c.PlaceHold("auth", card, shop, 600, "RUB", T0 + DAY, "card_purchase"))
    world.later(days=1)  # now == expires_at
    voided = world.one(c.VoidHold("auth", requested_by="payments"))
    assert voided.state == "expired" and voided.remaining_minor == 0
    last = world.saved_events[-1]
    assert type(last).__qualname__ == "Hold.Expired" and last.requested_by == c.REQUESTED_BY_LEDGER
    assert (world.balance(card).held_minor, world.balance(shop).incoming_held_minor) == (0, 0)


def test_every_payer_of_a_transfer_needs_the_money_not_only_the_first(world):
    # A split bill: Alice and Bob each pay the restaurant. Bob has 100, his share is 300: the
    # whole transfer is refused, and Alice, who could pay, is not charged either.
    settlement, alice = funded(world, 1_000)
    bob = world.open(owner="bob")
    world.one(c.PostTransfer(f"fund-{bob}", (c.Leg(settlement, -100, "RUB"), c.Leg(bob, 100, "RUB")), "top_up"))
    restaurant = world.open(owner="restaurant")
    bill = (c.Leg(alice, -300, "RUB"), c.Leg(bob, -300, "RUB"), c.Leg(restaurant, 600, "RUB"))
    with pytest.raises(InsufficientFunds, match=str(bob)):
        world.one(c.PostTransfer("split-bill", bill, "p2p"))
    assert [world.balance(a).posted_minor for a in (alice, bob, restaurant)] == [1_000, 100, 0]


LONGEST_ID = c.ID_CHARS_MAX
LONGEST_TEXT = c.METADATA_VALUE_CHARS_MAX


@pytest.mark.parametrize(
    "references, longest, one_past",
    [
        (
            "metadata keys",
            {"metadata": {f"k{i}": "v" for i in range(c.METADATA_KEYS_MAX)}},
            {"metadata": {f"k{i}": "v" for i in range(c.METADATA_KEYS_MAX + 1)}},
        ),
        ("metadata value", {"metadata": {"merchant": "m" * LONGEST_TEXT}}, {"metadata": {"merchant": "m" * (LONGEST_TEXT + 1)}}),
        ("metadata key", {"metadata": {"k" * LONGEST_TEXT: "v"}}, {"metadata": {"k" * (LONGEST_TEXT + 1): "v"}}),
        (
            "customer ids",
            {"customer_ids": tuple(f"c{i}" for i in range(c.CUSTOMER_IDS_MAX))},
            {"customer_ids": tuple(f"c{i}" for i in range(c.CUSTOMER_IDS_MAX + 1))},
        ),
        ("customer id", {"customer_ids": ("c" * LONGEST_ID,)}, {"customer_ids": ("c" * (LONGEST_ID + 1),)}),
        ("external ref", {"external_ref": "r" * LONGEST_ID}, {"external_ref": "r" * (LONGEST_ID + 1)}),
    ],
)
def test_the_references_a_payment_carries_are_taken_at_their_longest_and_refused_one_past(world, references, longest, one_past):
    # Every reader of the log (the read model, statements, the relay) is sized for these
    # bounds: the longest is a payment like any other, one more is malformed and moves nothing.
    settlement, card = funded(world, 1_000)
    legs = (c.Leg(card, -100, "RUB"), c.Leg(settlement, 100, "RUB"))
    with pytest.raises(InvalidTransfer):
        world.one(c.PostTransfer("one-past", legs, "p2p", **one_past))
    assert world.last_saved == [] and world.balance(card).posted_minor == 1_000, references
    assert not world.one(c.PostTransfer("longest", legs, "p2p", **longest)).replayed
    assert world.balance(card).posted_minor == 900, references
    if "customer_ids" not in one_past:  # a hold carries the other references, within the same bounds
        with pytest.raises(InvalidTransfer):
            world.one(c.PlaceHold("auth-one-past", card, settlement, 100, "RUB", T0 + DAY, "card_purchase", **one_past))
        assert world.one(c.PlaceHold("auth", card, settlement, 100, "RUB", T0 + DAY, "card_purchase", **longest)).state == "active"


def test_a_reversal_names_its_case_by_a_reference_of_at_most_128_characters(world):
    settlement, alice = funded(world, 1_000)
    bob = world.open(owner="bob")
    world.one(c.PostTransfer("p2p-1", (c.Leg(alice, -300, "RUB"), c.Leg(bob, 300, "RUB")), "p2p"))
    with pytest.raises(InvalidTransfer, match="case_ref"):
        world.one(c.ReverseTransfer("p2p-1", "dispute_upheld", case_ref="D" * (LONGEST_ID + 1)))
    assert world.last_saved == [] and world.balance(bob).posted_minor == 300
    reversed_ = world.one(c.ReverseTransfer("p2p-1", "dispute_upheld", case_ref="D" * LONGEST_ID))
    assert reversed_.transfer_id == reversal_transfer_id("p2p-1") and world.balance(bob).posted_minor == 0


def test_a_capture_under_the_longest_hold_and_capture_ids_can_be_reversed(world):
    # A capture's transfer id is longer than any client's: hold id, infix, capture id. A
    # disputed card purchase cleared under the longest ids is reversed like any other.
    _, card = funded(world, 1_000)
    shop = world.open("marketplace_clearing")
    hold_id, capture_id = "h" * LONGEST_ID, "k" * LONGEST_ID
    world.one(c.PlaceHold(hold_id, card, shop, 400, "RUB", T0 + DAY, "card_purchase"))
    world.one(c.CaptureHold(hold_id, capture_id, 400))
    captured = capture_transfer_id(hold_id, capture_id)
    assert len(captured) == c.POSTED_TRANSFER_ID_CHARS_MAX
    reversed_ = world.one(c.ReverseTransfer(captured, "dispute_upheld"))
    assert reversed_.transfer_id == reversal_transfer_id(captured)
    assert (world.balance(card).posted_minor, world.balance(shop).posted_minor) == (1_000, 0)
    with pytest.raises(InvalidTransfer):
        world.one(c.ReverseTransfer(captured + "x", "dispute_upheld"))


def test_a_credit_limit_reaches_its_most_and_not_a_minor_unit_past_it(world):
    card = world.open(limit=CREDIT_LIMIT_MINOR_MAX)
    assert world.account(card).credit_limit_minor == CREDIT_LIMIT_MINOR_MAX
    with pytest.raises(InvalidAccount):
        world.one(c.OpenAccount(uuid4(), "alice", "card", "RUB", CREDIT_LIMIT_MINOR_MAX + 1))
    other = world.open()
    world.one(c.SetCreditLimit(other, CREDIT_LIMIT_MINOR_MAX))
    with pytest.raises(InvalidAccount):
        world.one(c.SetCreditLimit(other, CREDIT_LIMIT_MINOR_MAX + 1))
    assert world.account(other).credit_limit_minor == CREDIT_LIMIT_MINOR_MAX and world.last_saved == []


def test_a_bank_account_opens_without_a_credit_limit(world):
    # The bank's own accounts may go below zero without one: a limit on them would be a
    # number nobody enforces, shown to analysts as if it were.
    settlement = uuid4()
    with pytest.raises(InvalidAccount, match="no credit limit"):
        world.one(c.OpenAccount(settlement, c.BANK_OWNER, "settlement", "RUB", credit_limit_minor=1))
    assert settlement not in world.store


def test_a_customer_product_cannot_be_opened_in_the_banks_name(world):
    # A card owned by "bank" would have its payments published as nobody's (the bank is never
    # named as a customer): customer products belong to a customer.
    card = uuid4()
    with pytest.raises(InvalidAccount, match="belong to a customer"):
        world.one(c.OpenAccount(card, c.BANK_OWNER, "card", "RUB"))
    assert card not in world.store


def test_no_account_holds_or_awaits_more_than_a_balance_may_hold_whatever_its_posted_money(world):
    # Held and incoming amounts are bigints of their own: a bank account with money posted
    # (or owing it) still may not reserve, or be promised, a minor unit past the most.
    settlement, clearing, shop = world.open("settlement"), world.open("marketplace_clearing"), world.open(owner="shop")
    world.balances[settlement] = Balance(1, BALANCE_MINOR_MAX, 1)  # posted 1: 1 - held stays within the most
    world.balances[clearing] = Balance(-5, 0, 1, incoming_held_minor=BALANCE_MINOR_MAX)  # owing 5, promised the most
    refused = world.run(
        c.PlaceHold("one-more-held", settlement, shop, 1, "RUB", T0 + DAY, "payout"),
        c.PlaceHold("one-more-promised", world.open("suspense"), clearing, 1, "RUB", T0 + DAY, "payout"),
    )
    assert all(isinstance(r, InvalidHold) and "the most a balance may hold" in str(r) for r in refused), refused
    assert world.balance(settlement).held_minor == BALANCE_MINOR_MAX
    assert world.balance(clearing).incoming_held_minor == BALANCE_MINOR_MAX


def test_a_hold_expires_before_the_last_instant_the_ledger_knows_never_at_it(world):
    _, card = funded(world, 1_000)
    shop = world.open(owner="shop")
    refused, placed = world.run(
        c.PlaceHold("at-the-end", card, shop, 100, "RUB", c.INSTANT_MAX, "card_purchase"),
        c.PlaceHold("just-before", card, shop, 100, "RUB", c.INSTANT_MAX - timedelta(microseconds=1), "card_purchase"),
    )
    assert isinstance(refused, InvalidHold) and "expires_at" in str(refused)
    assert placed.state == "active" and world.balance(card).held_minor == 100


def test_a_card_that_owes_the_bank_does_not_close(world):
    # Spent 300 of its credit: closing it would write the debt off with nobody deciding to.
    settlement, card = funded(world, 100, limit=500)
    world.one(c.PostTransfer("groceries", (c.Leg(card, -400, "RUB"), c.Leg(settlement, 400, "RUB")), "card_purchase"))
    with pytest.raises(AccountNotEmpty):
        world.one(c.CloseAccount(card, "customer_request"))
    assert world.account(card).state == "open" and world.balance(card).posted_minor == -300


@pytest.mark.parametrize("payee_is", ["closed", "in another currency"])
def test_a_hold_pays_only_into_an_open_account_in_its_currency(world, payee_is):
    # Its capture could never pay in: the customer's money would be reserved for nothing.
    _, card = funded(world, 1_000)
    shop = world.open(owner="shop", currency="RUB" if payee_is == "closed" else "USD")
    if payee_is == "closed":
        world.one(c.CloseAccount(shop, "customer_request"))
    with pytest.raises(AccountClosed if payee_is == "closed" else LegCurrencyMismatch):
        world.one(c.PlaceHold("auth", card, shop, 600, "RUB", T0 + DAY, "card_purchase"))
    assert (world.balance(card).held_minor, world.available(card)) == (0, 1_000)
