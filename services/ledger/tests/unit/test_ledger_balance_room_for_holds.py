"""Rules of the room a balance keeps for its live holds: a hold is placed, and a transfer
posted, only if every balance still fits the store once every live hold is captured."""

from __future__ import annotations

from datetime import timedelta

from ledger.domain import commands as c
from ledger.domain.balance import Balance
from ledger.domain.batch import BALANCE_MINOR_MAX
from ledger.domain.errors import InvalidHold, InvalidTransfer
from services.ledger.tests.unit.ledger_world import T0, transfer

LARGEST = c.AMOUNT_MINOR_MAX


def test_a_hold_is_placed_only_if_its_whole_capture_will_fit_both_balances(world):
    # A hold promises the payee its money: once placed, its capture must not be refused for
    # a balance the store cannot hold (that refusal would be kept, and the payee never paid).
    settlement, suspense = world.open("settlement"), world.open("suspense")
    world.balances[suspense] = Balance(BALANCE_MINOR_MAX - LARGEST + 1, 0, 1)  # as after thousands of the largest legs
    refused, accepted = world.run(
        c.PlaceHold("too-far", settlement, suspense, LARGEST, "RUB", T0 + timedelta(days=1), "payout"),
        c.PlaceHold("fits", settlement, suspense, LARGEST - 1, "RUB", T0 + timedelta(days=1), "payout"),
    )
    assert isinstance(refused, InvalidHold) and "the most a balance may hold" in str(refused)
    assert world.one(c.CaptureHold("fits", "all", LARGEST - 1)).state == "captured"
    assert world.balance(suspense).posted_minor == BALANCE_MINOR_MAX
    assert accepted.hold_id == "fits"


def test_a_transfer_leaves_room_for_the_live_holds_on_its_accounts_to_be_captured(world):
    settlement, suspense, fees = world.open("settlement"), world.open("suspense"), world.open("fee_income")
    world.balances[suspense] = Balance(BALANCE_MINOR_MAX - 2 * LARGEST + 1, 0, 1)
    world.one(c.PlaceHold("payout", settlement, suspense, LARGEST, "RUB", T0 + timedelta(days=1), "payout"))
    refused = world.run(transfer("fills-it", (fees, -LARGEST), (suspense, LARGEST)))[0]
    assert isinstance(refused, InvalidTransfer) and "the most a balance may hold" in str(refused)
    assert world.one(c.CaptureHold("payout", "all", LARGEST)).state == "captured"
    assert world.balance(suspense).posted_minor == BALANCE_MINOR_MAX - LARGEST + 1


def test_a_bank_account_reserves_only_what_it_could_still_pay_out(world):
    # No funds check on a bank-internal account, but its balance after every live hold is
    # captured must still fit the store, or the captures are refused for good.
    settlement, shop = world.open("settlement"), world.open(owner="shop")
    world.balances[settlement] = Balance(-(BALANCE_MINOR_MAX - LARGEST + 1), 0, 1)
    refused, accepted = world.run(
        c.PlaceHold("too-far", settlement, shop, LARGEST, "RUB", T0 + timedelta(days=1), "payout"),
        c.PlaceHold("fits", settlement, shop, LARGEST - 1, "RUB", T0 + timedelta(days=1), "payout"),
    )
    assert isinstance(refused, InvalidHold) and "the most a balance may hold" in str(refused)
    assert world.one(c.CaptureHold(accepted.hold_id, "all", LARGEST - 1)).state == "captured"
    assert world.balance(settlement).posted_minor == -BALANCE_MINOR_MAX
