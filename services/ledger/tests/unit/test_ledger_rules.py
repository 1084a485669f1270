"""Rules of the bank's ledger, on the pure domain (no database)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ledger.domain import commands as c
from ledger.domain.errors import (
    AccountClosed,
    AccountFrozen,
    AccountNotEmpty,
    AccountNotFound,
    CaptureExceedsHold,
    HoldNotActive,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAccount,
    InvalidHold,
    InvalidTransfer,
    LegCurrencyMismatch,
    UnbalancedTransfer,
)
from ledger.domain.refusal import Refusal
from services.ledger.tests.unit.ledger_world import T0, funded, transfer


def test_customer_account_cannot_go_below_zero(world):
    settlement, card = funded(world, 1_000)
    with pytest.raises(InsufficientFunds, match="1000"):
        world.one(transfer("too-much", (card, -1_001), (settlement, 1_001)))
    assert world.balance(card).posted_minor == 1_000


def test_credit_limit_allows_negative_balance_down_to_limit(world):
    settlement, card = funded(world, 0 + 1, limit=5_000)
    world.one(transfer("spend", (card, -5_001), (settlement, 5_001)))
    assert world.balance(card).posted_minor == -5_000
    with pytest.raises(InsufficientFunds):
        world.one(transfer("one-more", (card, -1), (settlement, 1)))


def test_internal_account_may_go_negative(world):
    settlement = world.open("settlement")
    fees = world.open("fee_income")
    world.one(transfer("x", (settlement, -500), (fees, 500)))
    assert world.balance(settlement).posted_minor == -500


def test_frozen_account_refuses_debits_but_accepts_credits(world):
    settlement, card = funded(world, 1_000)
    world.one(c.FreezeAccount(card, "customer_request"))
    with pytest.raises(AccountFrozen):
        world.one(transfer("out", (card, -10), (settlement, 10)))
    world.one(transfer("in", (settlement, -10), (card, 10)))
    assert world.balance(card).posted_minor == 1_010
    world.one(c.UnfreezeAccount(card, "customer_request"))
    world.one(transfer("out-again", (card, -10), (settlement, 10)))


def test_same_transfer_id_same_body_returns_first_result(world):
    settlement, card = funded(world, 1_000)
    first = world.one(transfer("pay-1", (card, -100), (settlement, 100)))
    again = world.one(transfer("pay-1", (card, -100), (settlement, 100)))
    assert again.replayed and not first.replayed and again.posted_at == first.posted_at
    assert world.balance(card).posted_minor == 900


def test_same_transfer_id_other_body_is_conflict(world):
    settlement, card = funded(world, 1_000)
    world.one(transfer("pay-1", (card, -100), (settlement, 100)))
    with pytest.raises(IdempotencyConflict):
        world.one(transfer("pay-1", (card, -200), (settlement, 200)))


def test_a_refused_transfer_repeated_is_refused_again_alike_even_once_funds_arrive(world):
    # A payment its customer was told had failed must not be posted by a redelivery after
    # the next salary: a repeat gets the first answer (a new attempt takes a new id).
    settlement, card = funded(world, 100)
    pay = transfer("pay-1", (card, -500), (settlement, 500))
    [first] = world.run(pay)
    assert isinstance(first, InsufficientFunds)
    world.one(transfer("salary", (settlement, -1_000), (card, 1_000), code="top_up"))
    [again] = world.run(pay)
    assert type(again) is InsufficientFunds and str(again) == str(first)
    assert world.balance(card).posted_minor == 1_100
    with pytest.raises(IdempotencyConflict, match="transfer pay-1 was used before with another body"):
        world.one(transfer("pay-1", (card, -400), (settlement, 400)))
    assert world.one(transfer("pay-2", (card, -500), (settlement, 500))).transfer_id == "pay-2"


def test_a_refused_hold_and_a_refused_capture_are_refused_again_alike(world):
    settlement, card = funded(world, 100)
    shop = world.open(owner="shop")
    authorise = c.PlaceHold("auth", card, shop, 500, "RUB", T0 + timedelta(days=1), "card_purchase")
    clear_early = c.CaptureHold("auth", "clear", 500)  # before its hold exists
    refused_hold, refused_capture = world.run(authorise, clear_early)
    assert isinstance(refused_hold, InsufficientFunds) and refused_capture.code == "hold_not_found"
    world.one(transfer("salary", (settlement, -1_000), (card, 1_000), code="top_up"))
    assert [type(outcome) for outcome in world.run(authorise, clear_early)] == [type(refused_hold), type(refused_capture)]
    assert world.balance(card).held_minor == 0


def test_a_malformed_request_is_not_kept_its_id_stays_free(world):
    settlement, card = funded(world, 1_000)
    with pytest.raises(UnbalancedTransfer):
        world.one(transfer("pay-1", (card, -100), (settlement, 99)))
    assert not world.one(transfer("pay-1", (card, -100), (settlement, 100))).replayed


def test_same_transfer_twice_in_one_batch_posts_once(world):
    settlement, card = funded(world, 1_000)
    first, second = world.run(transfer("dup", (card, -100), (settlement, 100)), transfer("dup", (card, -100), (settlement, 100)))
    assert not first.replayed and second.replayed
    assert world.balance(card).posted_minor == 900


def test_refused_command_does_not_fail_rest_of_batch(world):
    settlement, card = funded(world, 1_000)
    ok1, refused, ok2 = world.run(
        transfer("a", (card, -400), (settlement, 400)),
        transfer("b", (card, -700), (settlement, 700)),  # only 600 left
        transfer("c", (card, -600), (settlement, 600)),
    )
    assert isinstance(refused, InsufficientFunds)
    assert not isinstance(ok1, Exception) and not isinstance(ok2, Exception)
    assert world.balance(card).posted_minor == 0


def test_a_transfer_is_one_event_and_a_hot_account_one_balance_save_per_batch(world):
    settlement = world.open("settlement")
    fees = world.open("fee_income")
    before, fees_version = len(world.saved_events), world.balance(fees).version
    world.run(*[transfer(f"t{i}", (settlement, -10), (fees, 10)) for i in range(50)])
    assert [type(e).__qualname__ for e in world.saved_events[before:]] == ["Transfer.Posted"] * 50
    assert world.balance(fees).posted_minor == 500
    assert world.balance(fees).version == fees_version + 1


def test_legs_must_sum_to_zero_per_currency(world):
    settlement, card = funded(world, 1_000)
    with pytest.raises(UnbalancedTransfer):
        world.one(transfer("bad", (card, -100), (settlement, 99)))


def test_multi_currency_transfer_balances_per_currency(world):
    rub_settlement = world.open("settlement")
    usd_settlement = world.open("settlement", currency="USD")
    rub_card = world.open()
    usd_card = world.open(currency="USD")
    world.one(transfer("fund", (rub_settlement, -10_000), (rub_card, 10_000)))
    fx = c.PostTransfer("fx-1", (
        c.Leg(rub_card, -9_000, "RUB"), c.Leg(rub_settlement, 9_000, "RUB"),
        c.Leg(usd_settlement, -100, "USD"), c.Leg(usd_card, 100, "USD"),
    ), "fx")
    world.one(fx)
    assert world.balance(usd_card).posted_minor == 100
    with pytest.raises(LegCurrencyMismatch):
        world.one(transfer("wrong", (usd_card, -1), (rub_card, 1)))


def test_a_transfer_needs_two_distinct_accounts_and_nonzero_legs(world):
    settlement, card = funded(world, 10_000)
    with pytest.raises(InvalidTransfer):
        world.one(transfer("one-leg", (card, 0), (settlement, 0)))
    with pytest.raises(InvalidTransfer):
        world.one(transfer("same", (card, -1), (card, 1)))
    with pytest.raises(AccountNotFound):
        from uuid import uuid4

        world.one(transfer("ghost", (uuid4(), -1), (card, 1)))


def test_partial_captures_up_to_held_amount(world):
    settlement, card = funded(world, 1_000)
    merchant = world.open("marketplace_clearing")
    world.one(c.PlaceHold("h1", card, merchant, 600, "RUB", T0 + timedelta(days=7), "card_purchase"))
    assert world.balance(card).held_minor == 600 and world.available(card) == 400
    with pytest.raises(InsufficientFunds):
        world.one(transfer("spend", (card, -401), (settlement, 401)))
    world.one(c.CaptureHold("h1", "cap-1", 200))
    again = world.one(c.CaptureHold("h1", "cap-1", 200))
    assert again.replayed
    result = world.one(c.CaptureHold("h1", "cap-2", 400))
    assert result.state == "captured" and result.remaining_minor == 0
    with pytest.raises(HoldNotActive):
        world.one(c.CaptureHold("h1", "cap-3", 1))
    assert (world.balance(card).posted_minor, world.balance(card).held_minor) == (400, 0)
    assert world.balance(merchant).posted_minor == 600


def test_capture_beyond_remaining_is_refused(world):
    settlement, card = funded(world, 1_000)
    merchant = world.open("marketplace_clearing")
    world.one(c.PlaceHold("h1", card, merchant, 300, "RUB", T0 + timedelta(days=1), "card_purchase"))
    world.one(c.CaptureHold("h1", "a", 100))
    with pytest.raises(CaptureExceedsHold, match="200"):
        world.one(c.CaptureHold("h1", "b", 201))


def test_void_releases_remaining_hold(world):
    settlement, card = funded(world, 1_000)
    merchant = world.open("marketplace_clearing")
    world.one(c.PlaceHold("h1", card, merchant, 500, "RUB", T0 + timedelta(days=1), "card_purchase"))
    world.one(c.CaptureHold("h1", "a", 100))
    world.one(c.VoidHold("h1"))
    assert (world.balance(card).posted_minor, world.balance(card).held_minor, world.available(card)) == (900, 0, 900)
    assert world.one(c.VoidHold("h1")).replayed


def test_expired_hold_releases_funds(world):
    settlement, card = funded(world, 1_000)
    merchant = world.open("marketplace_clearing")
    world.one(c.PlaceHold("h1", card, merchant, 500, "RUB", T0 + timedelta(hours=1), "card_purchase"))
    assert world.one(c.ExpireHold("h1")).replayed  # not due yet: nothing happens
    assert world.balance(card).held_minor == 500
    world.later(hours=2)
    with pytest.raises(HoldNotActive):
        world.one(c.CaptureHold("h1", "late", 100))
    assert world.one(c.ExpireHold("h1")).state == "expired"
    assert world.balance(card).held_minor == 0


def test_hold_needs_funds_and_an_unfrozen_account(world):
    settlement, card = funded(world, 100)
    merchant = world.open("marketplace_clearing")
    with pytest.raises(InsufficientFunds):
        world.one(c.PlaceHold("big", card, merchant, 101, "RUB", T0 + timedelta(days=1), "card_purchase"))
    world.one(c.FreezeAccount(card, "customer_request"))
    with pytest.raises(AccountFrozen):
        world.one(c.PlaceHold("h", card, merchant, 1, "RUB", T0 + timedelta(days=1), "card_purchase"))


def test_closing_requires_zero_balance_and_no_holds(world):
    settlement, card = funded(world, 100)
    with pytest.raises(AccountNotEmpty):
        world.one(c.CloseAccount(card, "customer_request"))
    world.one(transfer("empty", (card, -100), (settlement, 100)))
    world.one(c.CloseAccount(card, "customer_request"))
    with pytest.raises(AccountClosed):
        world.one(transfer("after", (settlement, -1), (card, 1)))


def test_an_account_a_live_hold_will_pay_into_closes_only_once_the_hold_is_settled(world):
    # Were the shop's account closed under the authorisation, its clearing (the capture)
    # would be refused for good: the shop never paid, the customer's money only lapsing.
    settlement, card = funded(world, 1_000)
    shop = world.open(owner="shop")
    world.one(c.PlaceHold("auth", card, shop, 600, "RUB", T0 + timedelta(days=7), "card_purchase"))
    assert world.balance(shop).incoming_held_minor == 600
    with pytest.raises(AccountNotEmpty, match="to be paid 600"):
        world.one(c.CloseAccount(shop, "customer_request"))
    world.one(c.CaptureHold("auth", "part", 200))
    assert world.balance(shop).incoming_held_minor == 400 and world.balance(shop).posted_minor == 200
    world.one(c.VoidHold("auth"))
    assert world.balance(shop).incoming_held_minor == 0
    world.one(transfer("pay-out", (shop, -200), (settlement, 200)))
    assert world.one(c.CloseAccount(shop, "customer_request")).state == "closed"


def test_a_hold_placed_and_released_in_one_batch_leaves_nothing_to_be_paid_in(world):
    _, card = funded(world, 1_000)
    shop = world.open(owner="shop")
    placed, expired, closed = world.run(
        c.PlaceHold("quick", card, shop, 300, "RUB", T0 + timedelta(days=1), "card_purchase"),
        c.VoidHold("quick"), c.CloseAccount(shop, "customer_request"))
    assert placed.state == "active" and expired.state == "voided" and closed.state == "closed"
    assert world.balance(shop).incoming_held_minor == 0 and world.balance(card).held_minor == 0


@pytest.mark.parametrize("hold_id", ["not a hold id!", "x" * 5_000, "h1:capture:c0"])
def test_a_capture_naming_a_hold_id_no_hold_can_have_is_malformed_and_not_kept(world, hold_id):
    # Kept, each would store whatever the URL path said, and a malformed request is never kept.
    [outcome] = world.run(c.CaptureHold(hold_id, "c1", 100))
    assert isinstance(outcome, InvalidHold)
    kept = [a for a in world.last_saved if isinstance(a, Refusal)]
    assert kept == [], f"a malformed capture was kept as a Refusal ({len(kept[0].client_id)} chars of client id)"


def test_what_a_hold_will_pay_in_follows_its_partial_captures_and_expiry_across_batches(world):
    settlement, card = funded(world, 10_000)
    shop = world.open(owner="shop")
    world.one(c.PlaceHold("h", card, shop, 1_000, "RUB", T0 + timedelta(hours=1), "purchase"))
    assert world.balance(shop).incoming_held_minor == 1_000
    world.one(c.CaptureHold("h", "c1", 300))
    world.one(c.CaptureHold("h", "c1", 300))  # repeat: nothing moves
    assert world.balance(shop).incoming_held_minor == 700
    assert isinstance(world.run(c.CaptureHold("h", "c2", 701))[0], CaptureExceedsHold)
    world.one(c.CaptureHold("h", "c3", 200))
    world.later(hours=2)
    world.one(c.ExpireHold("h"))
    assert world.balance(shop).incoming_held_minor == 0
    assert world.balance(card).held_minor == 0
    assert world.balance(shop).posted_minor == 500
    assert isinstance(world.run(c.CaptureHold("h", "c4", 1))[0], HoldNotActive)
    # shop empties and closes
    world.one(transfer("out", (shop, -500), (settlement, 500)))
    world.one(c.CloseAccount(shop, "customer_request"))


def test_a_refused_transfer_repeated_later_in_its_batch_after_a_top_up_is_refused_alike(world):
    settlement, card = funded(world, 100)
    pay = transfer("pay", (card, -150), (settlement, 150))
    first, top_up, again = world.run(pay, transfer("more", (settlement, -100), (card, 100)), pay)
    assert isinstance(first, InsufficientFunds)
    assert isinstance(again, InsufficientFunds) and str(again) == str(first)


def test_internal_accounts_belong_to_the_bank(world):
    from uuid import uuid4

    with pytest.raises(InvalidAccount):
        world.one(c.OpenAccount(uuid4(), "alice", "fee_income", "RUB"))
    with pytest.raises(InvalidAccount):
        world.one(c.OpenAccount(uuid4(), "alice", "piggy_bank", "RUB"))


def test_a_freeze_applies_to_debits_after_it_in_the_same_batch(world):
    settlement, card = funded(world, 1_000)
    before, frozen, after, credit = world.run(
        transfer("before-freeze", (card, -100), (settlement, 100)), c.FreezeAccount(card, "customer_request"),
        transfer("after-freeze", (card, -100), (settlement, 100)),
        transfer("credit-while-frozen", (settlement, -50), (card, 50)),
    )
    assert frozen.state == "frozen" and isinstance(after, AccountFrozen)
    assert not isinstance(before, Exception) and not isinstance(credit, Exception)
    assert world.balance(card).posted_minor == 950
