"""Rules of the ledger at their edges: a hold's deadline to the second, the most a balance
may hold, an id opened again as another account, money paid back into a closed account, a
negative hold or capture. Mutation testing (a rule broken on purpose) found no test holding
them; each test here fails with its rule broken."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from ledger.domain import commands as c
from ledger.domain.balance import Balance
from ledger.domain.batch import BALANCE_MINOR_MAX
from ledger.domain.errors import AccountClosed, HoldNotActive, IdempotencyConflict, InvalidHold
from services.ledger.tests.unit.ledger_world import T0, funded, transfer

DAY = timedelta(days=1)
LARGEST = c.AMOUNT_MINOR_MAX


def test_a_hold_is_over_at_its_deadline_to_the_second(world):
    # At expires_at the authorisation has lapsed: a capture arriving then is refused, and the
    # expiry sweep running then releases the money. Not both, not neither.
    _, card = funded(world, 1_000)
    shop = world.open(owner="shop")
    world.one(c.PlaceHold("auth", card, shop, 600, "RUB", T0 + DAY, "card_purchase"))
    world.later(days=1)  # now == expires_at
    with pytest.raises(HoldNotActive, match="expired"):
        world.one(c.CaptureHold("auth", "late", 600))
    assert world.one(c.ExpireHold("auth")).state == "expired"
    assert (world.balance(card).posted_minor, world.balance(card).held_minor) == (1_000, 0)
    assert (world.balance(shop).posted_minor, world.balance(shop).incoming_held_minor) == (0, 0)


@pytest.mark.parametrize("swept_first", [False, True], ids=["before-the-sweep", "after-the-sweep"])
def test_a_void_after_the_deadline_finds_the_hold_expired_whether_or_not_the_sweep_came_first(world, swept_first):
    # The merchant's void and the sweep race at the deadline: the log and the answer must not
    # depend on which came first. Past its deadline the hold had lapsed; the ledger expired it.
    _, card = funded(world, 1_000)
    shop = world.open(owner="shop")
    world.one(c.PlaceHold("auth", card, shop, 600, "RUB", T0 + DAY, "card_purchase"))
    world.later(days=1, seconds=5)
    if swept_first:
        world.one(c.ExpireHold("auth", requested_by=c.REQUESTED_BY_LEDGER))
    since = len(world.saved_events)
    voided = world.one(c.VoidHold("auth", requested_by="payments"))
    again = world.one(c.VoidHold("auth", requested_by="payments"))
    assert voided.state == again.state == "expired" and again.replayed and voided.remaining_minor == 0
    logged = [e for e in world.saved_events if type(e).__qualname__.startswith("Hold.")]
    assert [type(e).__qualname__ for e in logged][1:] == ["Hold.Expired"]  # after the placing: one expiry, no void
    assert logged[-1].requested_by == c.REQUESTED_BY_LEDGER and len(world.saved_events) - since == (0 if swept_first else 1)
    assert (world.balance(card).posted_minor, world.balance(card).held_minor) == (1_000, 0)
    assert world.balance(shop).incoming_held_minor == 0


def test_a_void_before_the_deadline_voids_and_a_fully_captured_hold_cannot_be_voided(world):
    _, card = funded(world, 1_000)
    shop = world.open(owner="shop")
    world.one(c.PlaceHold("auth", card, shop, 600, "RUB", T0 + DAY, "card_purchase"))
    world.one(c.PlaceHold("paid", card, shop, 100, "RUB", T0 + DAY, "card_purchase"))
    world.one(c.CaptureHold("paid", "all", 100))
    world.later(days=1, seconds=-1)
    assert world.one(c.VoidHold("auth")).state == "voided"
    with pytest.raises(HoldNotActive, match="captured"):
        world.one(c.VoidHold("paid"))
    assert world.balance(card).held_minor == 0 and world.balance(card).posted_minor == 900


def test_a_capture_into_a_payee_account_closed_under_its_hold_is_refused(world):
    # A database made before balances counted what live holds will pay in let a payee close
    # under a live hold: its capture must not pay into the closed account.
    _, card = funded(world, 1_000)
    shop = world.open(owner="shop")
    world.one(c.PlaceHold("auth", card, shop, 400, "RUB", T0 + DAY, "card_purchase"))
    incoming = world.balance(shop)
    world.balances[shop] = replace(incoming, incoming_held_minor=0)  # the balance row as it was then
    world.one(c.CloseAccount(shop, "customer_request"))
    world.balances[shop] = replace(world.balance(shop), incoming_held_minor=400)  # filled in by the upgrade
    with pytest.raises(AccountClosed):
        world.one(c.CaptureHold("auth", "clearing", 400))
    assert world.balance(shop).posted_minor == 0 and world.balance(card).posted_minor == 1_000


def test_a_new_credit_limit_or_freeze_moves_the_accounts_balance_row(world):
    # The funds check reads the limit and the state as much as the money: a writer holding
    # the account as it was must fail to save (its balance version is stale), not pay past them.
    _, card = funded(world, 1_000, limit=5_000)
    for command in (c.SetCreditLimit(card, 0), c.FreezeAccount(card, "fraud_suspected"),
                    c.UnfreezeAccount(card, "fraud_suspected")):
        before = world.balance(card).version
        world.one(command)
        assert world.balance(card).version == before + 1, command


@pytest.mark.parametrize("owner, kind, currency", [("bob", "card", "RUB"), ("alice", "savings", "RUB"),
                                                   ("alice", "card", "USD")])
def test_opening_an_existing_account_again_as_another_account_is_a_conflict_not_a_replay(world, owner, kind, currency):
    # A replay tells the caller "your account is open": not when the id is Alice's RUB card.
    card = world.open(owner="alice", kind="card", currency="RUB")
    with pytest.raises(IdempotencyConflict):
        world.one(c.OpenAccount(card, owner, kind, currency))
    assert (world.account(card).owner_id, world.account(card).kind, world.account(card).currency) == (
        "alice", "card", "RUB")


def test_a_reversal_does_not_pay_back_into_a_closed_account(world):
    settlement, alice = funded(world, 300)
    bob = world.open(owner="bob")
    world.one(transfer("p2p-1", (alice, -300), (bob, 300)))
    world.one(c.CloseAccount(alice, "customer_request"))
    with pytest.raises(AccountClosed):
        world.one(c.ReverseTransfer("p2p-1", "posted_in_error"))
    assert world.balance(bob).posted_minor == 300 and world.balance(alice).posted_minor == 0


def test_a_negative_hold_or_capture_is_malformed_and_moves_nothing(world):
    # A hold of -500 would lower what is held and give the card 500 it does not have; a
    # capture of -500 would post the payee's money back to the payer.
    settlement, card = funded(world, 1_000)
    shop = world.open(owner="shop")
    with pytest.raises(InvalidHold):
        world.one(c.PlaceHold("minus", card, shop, -500, "RUB", T0 + DAY, "card_purchase"))
    assert world.available(card) == 1_000 and world.last_saved == []
    world.one(c.PlaceHold("auth", card, shop, 500, "RUB", T0 + DAY, "card_purchase"))
    with pytest.raises(InvalidHold):
        world.one(c.CaptureHold("auth", "minus", -500))
    assert world.last_saved == [], "nothing saved for a malformed capture: no transfer posted"
    assert world.one(c.CaptureHold("auth", "minus", 500)).state == "captured"
    assert (world.balance(card).posted_minor, world.balance(shop).posted_minor) == (500, 500)


def test_a_bank_account_may_hold_up_to_the_most_a_balance_may_hold(world):
    settlement, shop = world.open("settlement"), world.open(owner="shop")
    world.balances[settlement] = Balance(0, BALANCE_MINOR_MAX - LARGEST, 1)  # as after thousands of the largest holds
    accepted = world.one(c.PlaceHold("to-the-brim", settlement, shop, LARGEST, "RUB", T0 + DAY, "payout"))
    assert accepted.state == "active" and world.balance(settlement).held_minor == BALANCE_MINOR_MAX
    refused = world.run(c.PlaceHold("one-more", settlement, shop, 1, "RUB", T0 + DAY, "payout"))[0]
    assert isinstance(refused, InvalidHold) and "the most a balance may hold" in str(refused)


@pytest.mark.parametrize("settled_by", ["void", "capture"])
def test_the_expiry_sweep_leaves_a_hold_settled_before_its_deadline_as_it_was(world, settled_by):
    # The sweep reads holds from the read model, which may still show one voided or captured
    # a moment ago: releasing it again would free money twice.
    _, card = funded(world, 1_000)
    shop = world.open(owner="shop")
    world.one(c.PlaceHold("auth", card, shop, 600, "RUB", T0 + DAY, "card_purchase"))
    settle = c.VoidHold("auth") if settled_by == "void" else c.CaptureHold("auth", "clearing", 600)
    world.one(settle)
    before = (world.balance(card), world.balance(shop))
    world.later(days=2)
    swept = world.one(c.ExpireHold("auth"))
    assert swept.replayed and swept.state == ("voided" if settled_by == "void" else "captured")
    assert world.last_saved == [] and (world.balance(card), world.balance(shop)) == before
