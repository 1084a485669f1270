"""Rules of one writer batch on real PostgreSQL: a command refused in a batch leaves its
neighbours judged exactly as they would be alone, also when it names the same id as they do;
and the log tells the batch's events in the order its commands made them."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from kabinet_chassis.eventstore import events_table, notifications_after
from ledger.domain import commands as c
from ledger.domain.errors import InvalidAccount, InvalidHold
from ledger.integration import to_integration
from ledger.writer import LedgerUnavailable
from services.ledger.tests.integration.ledger_support import (
    failed_checks,
    funded_card,
    queued,
    saved_balance,
    uncached_writer,
)

pytestmark = pytest.mark.integration


async def one_batch(writer, *commands_in_order):
    """Submit the commands to a writer that is not running yet, so they wait in its queue
    and are taken as one batch; each one's result or refusal, in order."""
    submitted = await queued(writer, list(commands_in_order))
    writer.tasks.append(asyncio.create_task(writer.run()))
    return await asyncio.gather(*submitted, return_exceptions=True)


async def test_a_malformed_repeat_of_a_hold_does_not_make_a_capture_in_its_batch_refused_for_good(ledger):
    # Clearing captures a card hold while a buggy client repeats the authorisation with a bad
    # amount. The hold exists; a restarted writer has not loaded it yet.
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    hold = c.PlaceHold("auth-1", card, settlement, 400, "RUB", datetime.now(UTC) + timedelta(hours=1),
                       "card_authorisation")
    await ledger.parts.writer.submit(hold)
    malformed_repeat = c.PlaceHold("auth-1", card, settlement, 10**16, "RUB", hold.expires_at, "card_authorisation")
    capture = c.CaptureHold("auth-1", "clearing-1", 400)
    async with uncached_writer(ledger.settings, running=False) as restarted:
        refused, captured = await one_batch(restarted, malformed_repeat, capture)
        assert isinstance(refused, InvalidHold)
        assert captured.state == "captured", captured  # not hold_not_found
        again = await restarted.submit(capture)  # and its retry is answered with it, not with a refusal
        assert again.replayed and again.state == "captured"
    assert await saved_balance(ledger.parts.pool, card) == (600, 0)


async def test_a_malformed_opening_of_an_existing_account_does_not_make_a_payment_to_it_refused_for_good(ledger):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    malformed_opening = c.OpenAccount(card, "alice", "card", "RUB", credit_limit_minor=10**14)
    top_up = c.PostTransfer("salary-1", (c.Leg(settlement, -500, "RUB"), c.Leg(card, 500, "RUB")), "top_up")
    async with uncached_writer(ledger.settings, running=False) as restarted:
        refused, paid = await one_batch(restarted, malformed_opening, top_up)
        assert isinstance(refused, InvalidAccount)
        assert not isinstance(paid, Exception), paid  # not account_not_found
        again = await restarted.submit(top_up)
        assert again.replayed
    assert await saved_balance(ledger.parts.pool, card) == (1_500, 0)


async def test_a_malformed_opening_of_a_card_does_not_make_a_capture_or_void_of_its_hold_fail(ledger):
    # The capture and the void reach the card only through the hold, not by naming it.
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    expires_at = datetime.now(UTC) + timedelta(hours=1)
    for hold_id in ("auth-1", "auth-2"):
        await ledger.parts.writer.submit(c.PlaceHold(hold_id, card, settlement, 400, "RUB", expires_at, "card_purchase"))
    malformed_opening = c.OpenAccount(card, "alice", "card", "RUB", credit_limit_minor=10**14)
    capture = c.CaptureHold("auth-1", "clearing-1", 400)
    async with uncached_writer(ledger.settings, running=False) as restarted:
        refused, captured, voided = await one_batch(restarted, malformed_opening, capture, c.VoidHold("auth-2"))
        assert isinstance(refused, InvalidAccount)
        assert not isinstance(captured, Exception) and captured.state == "captured", captured
        assert not isinstance(voided, Exception) and voided.state == "voided", voided
        again = await restarted.submit(capture)
        assert again.replayed and again.state == "captured"
    assert await saved_balance(ledger.parts.pool, card) == (600, 0)

async def test_a_batch_whose_save_is_refused_leaves_the_writer_judging_by_what_is_stored(ledger):
    # Everything a batch did in memory (an account opened, a hold placed, a capture, a kept
    # refusal, a freeze) is forgotten when its save fails: the next batch answers each
    # command afresh, never as a replay of what was not saved nor with a refusal not kept.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    expires_at = datetime.now(UTC) + timedelta(hours=1)
    await writer.submit(c.PlaceHold("auth-1", card, settlement, 300, "RUB", expires_at, "card_authorisation"))
    bob = uuid.uuid4()
    opening = c.OpenAccount(bob, "bob", "card", "RUB")
    new_hold = c.PlaceHold("auth-2", card, settlement, 200, "RUB", expires_at, "card_authorisation")
    capture = c.CaptureHold("auth-1", "clearing-1", 300)
    too_big = c.PostTransfer("rent", (c.Leg(card, -900, "RUB"), c.Leg(settlement, 900, "RUB")), "p2p")
    freeze = c.FreezeAccount(card, "customer_request")
    real_clock, writer.clock = writer.clock, lambda: datetime.now(UTC) + timedelta(days=365)  # commits are refused
    outcomes = await asyncio.gather(*(writer.submit(command) for command in (opening, new_hold, capture, too_big,
                                                                             freeze)), return_exceptions=True)
    assert all(isinstance(outcome, LedgerUnavailable) for outcome in outcomes), outcomes
    writer.clock = real_clock

    assert not (await writer.submit(opening)).replayed
    placed = await writer.submit(new_hold)
    assert not placed.replayed and placed.state == "active"
    captured = await writer.submit(capture)
    assert not captured.replayed and captured.state == "captured"
    paid_in = c.PostTransfer("salary", (c.Leg(settlement, -500, "RUB"), c.Leg(card, 500, "RUB")), "top_up")
    await writer.submit(paid_in)
    rent = await writer.submit(too_big)  # its refusal was never kept: judged now, with the salary in
    assert not rent.replayed
    assert (await writer.submit(freeze)).state == "frozen"
    assert await saved_balance(ledger.parts.pool, card) == (1_000 - 300 + 500 - 900, 200)


async def published_after(writer, pool, position: int) -> list:
    """The integration events of the log after `position`, in log order."""
    async with pool.acquire() as connection:
        notifications = await notifications_after(connection, events_table(writer.app.recorder), position, 1_000)
    return [to_integration(writer.app.mapper.to_domain_event(n), n.id) for n in notifications]


@pytest.mark.parametrize(("amount_minor", "then", "logged_last"), [
    (300, c.FreezeAccount, "ledger.account_frozen"),  # else: a payment from a card frozen for fraud
    (1_000, c.CloseAccount, "ledger.account_closed"),  # else: a payout from a closed card
], ids=["unfreeze-pay-freeze", "unfreeze-empty-close"])
async def test_a_batchs_events_are_logged_in_the_order_its_commands_made_them(ledger, amount_minor, then, logged_last):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    await ledger.parts.writer.submit(c.FreezeAccount(card, "customer_request"))
    before = ledger.parts.writer.last_position
    unfreeze = c.UnfreezeAccount(card, "customer_request")
    pay = c.PostTransfer("pay-1", (c.Leg(card, -amount_minor, "RUB"), c.Leg(settlement, amount_minor, "RUB")),
                         "card_purchase")
    last = then(card, "fraud_suspected" if then is c.FreezeAccount else "customer_request")
    async with uncached_writer(ledger.settings, running=False) as writer:
        results = await one_batch(writer, unfreeze, pay, last)
        assert not [result for result in results if isinstance(result, Exception)], results
        logged = await published_after(writer, ledger.parts.pool, before)
    assert [event.type for event in logged] == ["ledger.account_unfrozen", "ledger.transfer_posted", logged_last]
    await ledger.parts.projection.wait_for(logged[-1].position)
    assert await failed_checks(ledger) == {}, "verify holds the log to the accounts' states as they stood"
