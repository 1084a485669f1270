"""`kabinet ledger verify` fails for every kind of fault it says it checks.

Each rule breaks the books in one way a forger or a faulty writer could, and expects the
check that names that fault to fail, saying what and where: a transfer that does not sum to
zero, money on a closed account or in the wrong currency, an overdraft hidden behind a hold,
a hold's capture without its transfer (or a transfer without its capture), a second or
unfounded reversal, events the writer would never have stored, a log head that does not match
its clock or positions, and read-model rows that differ from the events in any column the
ledger serves. The forger's tools (forge_history, cover_up) make everything derived agree
with the forged events, so that only the rule under test is left to catch him."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from kabinet_chassis import history_seals
from kabinet_chassis.ed25519_keys import new_private_pem
from kabinet_chassis.eventstore import events_table
from ledger.domain import commands as c
from ledger.domain.hold import Hold
from ledger.domain.transfer import Transfer
from ledger.integration import SOURCE
from ledger.projections import READ_MODEL_PROJECTION
from ledger.verify import verify
from services.ledger.tests.integration.ledger_support import cover_up, failed_checks, forge_history, funded_card, relayed

pytestmark = pytest.mark.integration

READ_MODEL = "read model equals event store"
SEALED = "history matches its seals"  # forge_history seals first: every forged change of a sealed event shows here too


async def settled(ledger) -> None:
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    assert await failed_checks(ledger) == {}


async def rewrite_event(ledger, originator_id, version, change) -> None:
    """Rewrite one stored event's JSON state in place: `change(state)` edits the dict."""
    table = events_table(ledger.parts.app.recorder)
    state = json.loads(
        await ledger.parts.pool.fetchval(
            f"SELECT state FROM {table} WHERE originator_id = $1 AND originator_version = $2", originator_id, version
        )
    )
    change(state)
    await forge_history(
        ledger,
        "UPDATE {table} SET state = $3 WHERE originator_id = $1 AND originator_version = $2",
        originator_id,
        version,
        json.dumps(state).encode(),
    )


async def append_copy(ledger, originator_id, version, new_originator_id, new_version, change=lambda state: None) -> None:
    """A copy of a stored event appended at the log's head as another stream's event (or
    another version of its own): `change(state)` edits the copy. Appending needs no guard off."""
    table = events_table(ledger.parts.app.recorder)
    topic, state = await ledger.parts.pool.fetchrow(
        f"SELECT topic, state FROM {table} WHERE originator_id = $1 AND originator_version = $2", originator_id, version
    )
    state = json.loads(state)
    change(state)
    await ledger.parts.pool.execute(
        f"INSERT INTO {table} (originator_id, originator_version, topic, state) VALUES ($1, $2, $3, $4)",
        new_originator_id,
        new_version,
        topic,
        json.dumps(state).encode(),
    )


def legs_of(state: dict) -> dict[str, dict]:
    return {leg["account_id"]: leg for leg in state["legs"]}


async def card_paying_a_shop(ledger, amount_minor: int = 100):
    """Alice's card funded with 1,000 from the settlement account; it pays `amount_minor` to
    Bob's shop ('pay'); verify passes."""
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    shop = uuid.uuid4()
    await writer.submit(c.OpenAccount(shop, "bob", "card", "RUB"))
    await writer.submit(c.PostTransfer("pay", (c.Leg(card, -amount_minor, "RUB"), c.Leg(shop, amount_minor, "RUB")), "p2p"))
    await settled(ledger)
    return settlement, card, shop


# ---- money adds up ---------------------------------------------------------------------------


async def test_verify_fails_when_a_transfer_takes_more_than_it_pays_and_the_trial_balance_is_short(ledger):
    # The shop's leg rewritten to 90 of the 100 the card paid: 10 RUB vanished from the books.
    settlement, card, shop = await card_paying_a_shop(ledger)
    await rewrite_event(ledger, Transfer.id_for("pay"), 1, lambda state: legs_of(state)[str(shop)].update(amount_minor=90))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert set(failed) == {"transfers balance", "trial balance", SEALED}, failed
    assert "transfer pay is off by {'RUB': -10}" in failed["transfers balance"]
    assert failed["trial balance"] == "RUB off by -10"


async def test_verify_fails_when_a_transfers_legs_sum_to_zero_only_across_currencies(ledger):
    # An exchange pays 100 RUB in and 1 USD out; rewritten, it takes 100 USD for 100 RUB
    # more: the sum of all legs is still zero, but each currency is off.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    rub_desk, usd_desk, usd_card = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await writer.submit(c.OpenAccount(rub_desk, "bank", "settlement", "RUB"))
    await writer.submit(c.OpenAccount(usd_desk, "bank", "settlement", "USD"))
    await writer.submit(c.OpenAccount(usd_card, "alice", "card", "USD"))
    await writer.submit(
        c.PostTransfer(
            "fx", (c.Leg(card, -100, "RUB"), c.Leg(rub_desk, 100, "RUB"), c.Leg(usd_desk, -1, "USD"), c.Leg(usd_card, 1, "USD")), "p2p"
        )
    )
    await settled(ledger)

    def exchanged_for_more(state: dict) -> None:
        legs = legs_of(state)
        legs[str(rub_desk)]["amount_minor"] = 200  # RUB: -100 + 200 = +100
        legs[str(usd_desk)]["amount_minor"] = -101  # USD: -101 + 1 = -100

    await rewrite_event(ledger, Transfer.id_for("fx"), 1, exchanged_for_more)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert "transfers balance" in failed, failed
    assert "transfer fx is off by {'RUB': 100, 'USD': -100}" in failed["transfers balance"]


async def test_verify_fails_when_a_hold_hides_an_overdraft_of_one_minor_unit(ledger):
    # 300 held of Alice's 1,000, and a payment rewritten from 700 to 701: her card has 299
    # posted, but 300 of it is promised to the hold, one kopeck more than she has.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(c.PlaceHold("auth", card, settlement, 300, "RUB", datetime.now(UTC) + timedelta(hours=1), "card_purchase"))
    await writer.submit(c.PostTransfer("pay", (c.Leg(card, -700, "RUB"), c.Leg(settlement, 700, "RUB")), "p2p"))
    await settled(ledger)

    def one_more(state: dict) -> None:
        for leg in state["legs"]:
            leg["amount_minor"] += 1 if leg["amount_minor"] > 0 else -1

    await rewrite_event(ledger, Transfer.id_for("pay"), 1, one_more)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert set(failed) == {"no forbidden overdraft", SEALED}, failed
    assert failed["no forbidden overdraft"] == f"account {card}: -1 below limit 0"


# ---- accounts' states and currencies -----------------------------------------------------------


async def test_verify_fails_when_money_is_paid_into_an_account_after_it_closed(ledger):
    # Bob's old card closed empty; the forger redirects a later payment to it: money on a
    # closed account, which no one can spend or pay out.
    settlement, card, shop = await card_paying_a_shop(ledger)
    closed = uuid.uuid4()
    await ledger.parts.writer.submit(c.OpenAccount(closed, "bob", "card", "RUB"))
    await ledger.parts.writer.submit(c.CloseAccount(closed, "customer_request"))
    await ledger.parts.writer.submit(c.PostTransfer("pay-again", (c.Leg(card, -50, "RUB"), c.Leg(shop, 50, "RUB")), "p2p"))
    await settled(ledger)
    await rewrite_event(ledger, Transfer.id_for("pay-again"), 1, lambda state: legs_of(state)[str(shop)].update(account_id=str(closed)))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert set(failed) == {"account states", SEALED}, failed
    assert f"Transfer.Posted pay-again moves money on account {closed}, closed by then" in failed["account states"]


async def test_verify_fails_when_a_hold_is_placed_to_pay_into_an_account_closed_before(ledger):
    # The shop's old account closed first; the forger makes a later authorisation pay into it.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    closed = uuid.uuid4()
    await writer.submit(c.OpenAccount(closed, "bob", "card", "RUB"))
    await writer.submit(c.CloseAccount(closed, "customer_request"))
    await writer.submit(c.PlaceHold("auth", card, settlement, 300, "RUB", datetime.now(UTC) + timedelta(hours=1), "card_purchase"))
    await settled(ledger)
    await rewrite_event(ledger, Hold.id_for("auth"), 1, lambda state: state.update(credit_account_id=str(closed)))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert set(failed) == {"account states", SEALED}, failed
    assert f"Hold.Placed auth moves money on account {closed}, closed by then" in failed["account states"]


@pytest.mark.parametrize("side", ["debit_account_id", "credit_account_id"])
async def test_verify_fails_when_an_account_closed_while_a_live_hold_named_it(ledger, side):
    # A hold placed before the shop's old account closed, forged to name it: the account
    # closed with money held on it or still to come in from the hold.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    closing = uuid.uuid4()
    await writer.submit(c.OpenAccount(closing, "bob", "card", "RUB", credit_limit_minor=1_000))
    await writer.submit(c.PlaceHold("auth", card, settlement, 300, "RUB", datetime.now(UTC) + timedelta(hours=1), "card_purchase"))
    await writer.submit(c.CloseAccount(closing, "customer_request"))
    await settled(ledger)
    await rewrite_event(ledger, Hold.id_for("auth"), 1, lambda state: state.update({side: str(closing)}))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert "account states" in failed, failed
    holding = "0/300/0" if side == "debit_account_id" else "0/0/300"
    assert f"account {closing} closed holding {holding} RUB (posted/held/incoming held)" in failed["account states"]


async def test_verify_fails_when_a_transfer_posts_another_currency_to_an_account(ledger):
    # Both legs rewritten to USD: a RUB card's statement would sum dollars with roubles.
    settlement, card, shop = await card_paying_a_shop(ledger)

    def in_dollars(state: dict) -> None:
        for leg in state["legs"]:
            leg["currency"] = "USD"

    await rewrite_event(ledger, Transfer.id_for("pay"), 1, in_dollars)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert "events replay" in failed, failed
    assert f"Transfer.Posted pay posts USD to RUB account {card}" in failed["events replay"]


async def test_verify_fails_when_a_hold_holds_another_currency_than_its_account(ledger):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(c.PlaceHold("auth", card, settlement, 300, "RUB", datetime.now(UTC) + timedelta(hours=1), "card_purchase"))
    await settled(ledger)
    await rewrite_event(ledger, Hold.id_for("auth"), 1, lambda state: state.update(currency="USD"))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert "events replay" in failed, failed
    assert "Hold.Placed auth holds USD on a RUB account" in failed["events replay"]


# ---- holds and their captures ------------------------------------------------------------------


async def captured_hold(ledger, amount_minor: int = 100):
    """Hold 'auth' of 300 on Alice's card, `amount_minor` of it captured ('c1'); verify passes."""
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(c.PlaceHold("auth", card, settlement, 300, "RUB", datetime.now(UTC) + timedelta(hours=1), "card_purchase"))
    await writer.submit(c.CaptureHold("auth", "c1", amount_minor))
    await settled(ledger)
    return settlement, card


async def test_verify_fails_when_a_hold_records_a_capture_whose_transfer_is_gone(ledger):
    # The capture's transfer deleted: the hold says 100 was taken, but no money moved.
    await captured_hold(ledger)
    await forge_history(ledger, "DELETE FROM {table} WHERE originator_id = $1", Transfer.id_for("auth:capture:c1"))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert set(failed) == {"holds add up", SEALED}, failed
    assert "hold auth's capture c1 names transfer auth:capture:c1, which the event store does not hold" in failed["holds add up"]


async def test_verify_fails_when_a_capture_transfer_moves_money_no_hold_records_capturing(ledger):
    # The hold's capture deleted (its newest event: no version goes missing), its transfer
    # kept: money moved, and the hold still reserves all 300 as if none was taken.
    settlement, card = await captured_hold(ledger)
    await ledger.parts.writer.submit(
        c.PostTransfer("later", (c.Leg(card, -1, "RUB"), c.Leg(settlement, 1, "RUB")), "p2p")
    )  # the log's head stays where it was
    await settled(ledger)
    await forge_history(ledger, "DELETE FROM {table} WHERE originator_id = $1 AND originator_version = 2", Hold.id_for("auth"))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert set(failed) == {"holds add up", SEALED}, failed
    assert "transfer auth:capture:c1 says it captures hold auth (capture c1), which no Hold.Captured records" in failed["holds add up"]


async def test_verify_fails_when_a_capture_takes_a_negative_amount_paying_the_card_back(ledger):
    # The capture and its transfer both turned round: the shop pays 100 back to the card and the
    # hold's reserve grows by 100. Each leg still sums to zero and the two still agree.
    settlement, card = await captured_hold(ledger)

    def turned_round(state: dict) -> None:
        for leg in state["legs"]:
            leg["amount_minor"] = -leg["amount_minor"]

    await rewrite_event(ledger, Hold.id_for("auth"), 2, lambda state: state.update(amount_minor=-100))
    await rewrite_event(ledger, Transfer.id_for("auth:capture:c1"), 1, turned_round)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert "hold auth: capture c1 at position" in failed.get("holds add up", ""), failed
    assert "takes -100 RUB: a capture takes a positive amount" in failed["holds add up"]


async def test_verify_fails_when_a_hold_reserves_a_negative_amount(ledger):
    # A hold of -300 would raise what the card may spend by 300.
    await captured_hold(ledger)
    await rewrite_event(ledger, Hold.id_for("auth"), 1, lambda state: state.update(amount_minor=-300))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert "hold auth placed at position" in failed.get("holds add up", ""), failed
    assert "reserves -300 RUB: a hold reserves a positive amount" in failed["holds add up"]


async def test_verify_fails_when_a_hold_captured_in_full_is_voided_after(ledger):
    # A void releasing nothing appended to a hold captured in full: the customer is shown the
    # purchase as cancelled, while the money was taken.
    writer = ledger.parts.writer
    settlement, card = await captured_hold(ledger, 300)
    await writer.submit(c.PlaceHold("other", card, settlement, 100, "RUB", datetime.now(UTC) + timedelta(hours=1), "card_purchase"))
    await writer.submit(c.VoidHold("other"))  # the newest event: the copy takes its time, the posting clock's
    await settled(ledger)
    await append_copy(
        ledger, Hold.id_for("other"), 2, Hold.id_for("auth"), 3, lambda state: state.update(client_hold_id="auth", released_minor=0)
    )
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert list(failed) == ["holds add up"], failed
    assert "hold auth: voided at position" in failed["holds add up"]
    assert "after the hold was captured" in failed["holds add up"]


async def test_verify_fails_when_a_hold_is_copied_under_an_id_its_client_id_does_not_make(ledger):
    # The same hold placed twice, the copy in a stream of its own: 300 more reserved.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(c.PlaceHold("auth", card, settlement, 300, "RUB", datetime.now(UTC) + timedelta(hours=1), "card_purchase"))
    await settled(ledger)
    forged = uuid.uuid4()
    await append_copy(ledger, Hold.id_for("auth"), 1, forged, 1)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert "event order" in failed, failed
    assert f"Hold.Placed auth is stored as {forged}, not as {Hold.id_for('auth')}" in failed["event order"]


# ---- reversals ---------------------------------------------------------------------------------


async def reversed_payment(ledger):
    """'pay' of 100 from Alice's card to Bob's shop, reversed as posted in error ('pay:reversal',
    the newest event); verify passes."""
    settlement, card, shop = await card_paying_a_shop(ledger)
    await ledger.parts.writer.submit(c.ReverseTransfer("pay", "posted_in_error"))
    await settled(ledger)
    return settlement, card, shop


async def test_verify_fails_when_a_transfer_is_reversed_twice(ledger):
    # The reversal copied under another id: Alice gets her 100 back twice, Bob pays it twice.
    await reversed_payment(ledger)
    await append_copy(
        ledger,
        Transfer.id_for("pay:reversal"),
        1,
        Transfer.id_for("pay:reversal-2"),
        1,
        lambda state: state.update(client_transfer_id="pay:reversal-2"),
    )
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert "reversals" in failed, failed
    assert "transfer pay:reversal-2 reverses pay, but is not stored under its reversal id pay:reversal" in failed["reversals"]


async def test_verify_fails_when_a_reversal_gives_a_reason_the_bank_does_not_have(ledger):
    await reversed_payment(ledger)
    await rewrite_event(ledger, Transfer.id_for("pay:reversal"), 1, lambda state: state.update(reversal_reason="customer_changed_mind"))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert set(failed) == {"reversals", SEALED}, failed
    assert "reverses pay for 'customer_changed_mind', not a reason the bank has" in failed["reversals"]


async def test_verify_fails_when_a_reversal_is_itself_reversed(ledger):
    # A reversal of the reversal, as the writer never posts one: the payment made again
    # without anyone asking for it.
    await reversed_payment(ledger)

    def reversing_the_reversal(state: dict) -> None:
        state.update(client_transfer_id="pay:reversal:reversal", reverses="pay:reversal")
        for leg in state["legs"]:
            leg["amount_minor"] = -leg["amount_minor"]

    await append_copy(ledger, Transfer.id_for("pay:reversal"), 1, Transfer.id_for("pay:reversal:reversal"), 1, reversing_the_reversal)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert "reversals" in failed, failed
    assert "transfer pay:reversal:reversal reverses pay:reversal, which is no transfer posted to be reversed" in failed["reversals"]


# ---- the order the writer keeps ----------------------------------------------------------------


async def test_verify_fails_when_a_transfer_is_stored_again_as_the_next_version_of_its_stream(ledger):
    # The payment copied into its own stream: the same transfer, posted twice under one id.
    settlement, card, shop = await card_paying_a_shop(ledger)
    await append_copy(ledger, Transfer.id_for("pay"), 1, Transfer.id_for("pay"), 2)
    failed = await failed_checks(ledger)
    assert "event order" in failed, failed
    assert f"Transfer.Posted is version 2 of {Transfer.id_for('pay')}, which only a stream's first event may be" in failed["event order"]


async def test_verify_fails_when_a_transfer_says_it_was_posted_at_another_time_than_it_was_stored(ledger):
    # Only the time shown on statements moved a day back: the log's own time is left as it was.
    settlement, card, shop = await card_paying_a_shop(ledger)

    def shown_a_day_back(state: dict) -> None:
        posted_at = datetime.fromisoformat(state["posted_at"]["_data_"]) - timedelta(days=1)
        state["posted_at"] = {**state["posted_at"], "_data_": posted_at.isoformat()}

    await rewrite_event(ledger, Transfer.id_for("pay"), 1, shown_a_day_back)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert set(failed) == {"event order", SEALED}, failed
    assert "Transfer.Posted pay says it was posted at" in failed["event order"]
    assert "but is stamped" in failed["event order"]


# ---- the log's head ----------------------------------------------------------------------------


async def test_verify_fails_when_the_outbox_relay_has_passed_the_newest_event(ledger):
    await card_paying_a_shop(ledger)
    head = await ledger.parts.pool.fetchval(f"SELECT max(notification_id) FROM {events_table(ledger.parts.app.recorder)}")
    await relayed(ledger, head)
    await ledger.parts.pool.execute("UPDATE outbox_relay_position SET position = $2 WHERE source = $1", SOURCE, head + 3)
    failed = await failed_checks(ledger)
    assert list(failed) == ["log head"], failed
    assert f"the outbox relay has applied events up to position {head + 3}, past the newest event {head}" in failed["log head"]


async def test_verify_fails_when_the_posting_clock_is_gone(ledger):
    await card_paying_a_shop(ledger)
    await ledger.parts.pool.execute("DELETE FROM ledger_posting_clock")
    failed = await failed_checks(ledger)
    assert list(failed) == ["log head"], failed
    assert "no posting clock is saved, though the log holds events up to position" in failed["log head"]


async def test_verify_fails_when_every_event_is_deleted_but_the_posting_clock_remembers_them(ledger):
    # The whole history deleted, and everything derived emptied and put back to the start,
    # but the posting clock still has the time of the last batch.
    await card_paying_a_shop(ledger)
    await forge_history(ledger, "DELETE FROM {table}")
    pool = ledger.parts.pool
    await pool.execute("TRUNCATE ledger_accounts, ledger_entries, ledger_transfers, ledger_holds, ledger_balances")
    await pool.execute("UPDATE projection_position SET position = 0 WHERE projection = $1", READ_MODEL_PROJECTION)
    await pool.execute("UPDATE outbox_relay_position SET position = 0 WHERE source = $1", SOURCE)
    failed = await failed_checks(ledger)
    assert "log head" in failed, failed
    assert "the posting clock says the last batch was posted at" in failed["log head"]
    assert "but the log holds no event: its events were removed" in failed["log head"]


# ---- the read model, row by row ----------------------------------------------------------------


async def test_verify_fails_when_the_read_model_shows_a_transfer_no_event_posted(ledger):
    # A payment made up in the history Bob's shop is shown: no missing row gives it away, only the count.
    await card_paying_a_shop(ledger)
    columns = "code, legs, external_ref, customer_ids, metadata, posted_at, posted_position, requested_by"
    await ledger.parts.pool.execute(
        f"INSERT INTO ledger_transfers (transfer_id, {columns})"
        f" SELECT 'pay-made-up', {columns} FROM ledger_transfers WHERE transfer_id = 'pay'"
    )
    failed = await failed_checks(ledger)
    assert list(failed) == [READ_MODEL], failed
    assert "read model has 3 transfers, event store 2" in failed[READ_MODEL]


async def test_verify_fails_when_the_read_model_shows_an_entry_after_the_newest_event(ledger):
    # A made-up line at the end of Bob's statement: no event after the last makes it.
    settlement, card, shop = await card_paying_a_shop(ledger)
    await ledger.parts.pool.execute(
        "INSERT INTO ledger_entries (account_id, position, seq, transfer_id, code, amount_minor, balance_after_minor,"
        " credits_after_minor, occurred_at) SELECT account_id, position + 1000, seq, transfer_id, code, amount_minor,"
        " balance_after_minor + amount_minor, credits_after_minor + amount_minor, occurred_at FROM ledger_entries"
        " WHERE account_id = $1",
        shop,
    )
    failed = await failed_checks(ledger)
    assert list(failed) == [READ_MODEL], failed
    assert f"read model has an entry of account {shop} at position" in failed[READ_MODEL]
    assert "that no transfer leg up to position" in failed[READ_MODEL]


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ("debit_account_id = $1", "debit_account_id"),  # shown as reserving another customer's money
        ("credit_account_id = $1", "credit_account_id"),  # to be paid to another shop
        ("amount_minor = amount_minor + 1", "amount_minor"),
        ("captured_minor = captured_minor + 1", "captured_minor"),
        ("currency = 'USD'", "currency"),
        ("state = 'captured'", "state"),
        ("expires_at = expires_at + interval '30 days'", "expires_at"),  # the expiry sweep would release it late
        ("code = 'p2p'", "code"),
        ("external_ref = 'rrn-forged'", "external_ref"),
    ],
)
async def test_verify_fails_when_the_read_model_shows_a_hold_otherwise_than_its_events(ledger, change, column):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(
        c.PlaceHold("auth", card, settlement, 300, "RUB", datetime.now(UTC) + timedelta(hours=1), "card_purchase", external_ref="rrn-1")
    )
    await writer.submit(c.CaptureHold("auth", "c1", 100))
    await settled(ledger)
    args = [uuid.uuid4()] if "$1" in change else []
    await ledger.parts.pool.execute(f"UPDATE ledger_holds SET {change} WHERE hold_id = 'auth'", *args)
    failed = await failed_checks(ledger)
    assert list(failed) == [READ_MODEL], failed
    assert f"hold auth: {column}" in failed[READ_MODEL]


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ("state = 'open', freeze_reasons = '{}'", "state"),  # a frozen card shown open
        ("credit_limit_minor = 100000", "credit_limit_minor"),
        ("updated_at = opened_at", "updated_at"),
    ],
)
async def test_verify_fails_when_the_read_model_shows_an_account_otherwise_than_its_events(ledger, change, column):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(c.SetCreditLimit(card, 500))
    await writer.submit(c.FreezeAccount(card, "court_order"))
    await settled(ledger)
    await ledger.parts.pool.execute(f"UPDATE ledger_accounts SET {change} WHERE account_id = $1", card)
    failed = await failed_checks(ledger)
    assert list(failed) == [READ_MODEL], failed
    assert f"account {card}: {column}" in failed[READ_MODEL]


async def test_verify_fails_when_a_saved_held_amount_differs_from_the_live_holds(ledger):
    # The card's held amount lowered: 200 of Alice's money promised to the shop spendable again.
    settlement, card = await captured_hold(ledger)
    await ledger.parts.pool.execute("UPDATE ledger_balances SET held_minor = 0 WHERE account_id = $1", card)
    failed = await failed_checks(ledger)
    assert list(failed) == ["balances equal legs and holds"], failed
    assert (
        f"account {card}: saved balance 900/0/0 (posted/held/incoming held), legs and holds say 900/200/0"
        " (RUB minor units; held off by -200)" in failed["balances equal legs and holds"]
    )


# ---- the seals ---------------------------------------------------------------------------------


async def test_verify_counts_every_seal_that_fails_not_only_the_ten_it_shows(ledger, monkeypatch):
    # A seal an event: checked with a key that signed none of them, every seal fails, and an
    # auditor's tool is told how many, not just the first ten.
    monkeypatch.setattr("kabinet_chassis.history_seals.SEAL_EVENTS_MAX", 1)
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    for number in range(10):
        await writer.submit(c.PostTransfer(f"spend-{number}", (c.Leg(card, -1, "RUB"), c.Leg(settlement, 1, "RUB")), "p2p"))
    await settled(ledger)
    table = events_table(ledger.parts.app.recorder)
    await history_seals.seal_new_events(ledger.parts.pool, table, history_seals.seal_key_for(ledger.settings))
    sealed = await ledger.parts.pool.fetchval(f"SELECT count(*) FROM {history_seals.SEALS_TABLE} WHERE events_table = $1", table)
    assert sealed > 10
    other_key = new_private_pem().decode()
    report = await verify(ledger.parts.app, ledger.settings.model_copy(update={"history_seal_key": other_key}))
    check = next(check for check in report.checks if check.name == SEALED)
    assert not check.ok and not report.ok
    assert (len(check.problems), check.problems_count) == (10, sealed)
    assert check.detail.endswith(f"(+{sealed - 10} more)")
