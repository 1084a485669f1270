"""`kabinet ledger verify` compares what the ledger serves with its event store in full.

Each rule tampers one read-model row by SQL (as a faulty projection or a bad hand would)
and expects verify to fail the "read model equals event store" check, naming the row and
the column; or breaks the event store itself and expects a failed check, not a crash."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from ledger.domain import commands as c
from ledger.domain.hold import Hold
from ledger.projections import READ_MODEL_PROJECTION
from ledger.verify import verify
from services.ledger.tests.integration.ledger_support import failed_checks, forge_history, funded_card

pytestmark = pytest.mark.integration

READ_MODEL = "read model equals event store"


def spend(card, settlement, amount_minor: int, transfer_id: str) -> c.PostTransfer:
    return c.PostTransfer(transfer_id, (c.Leg(card, -amount_minor, "RUB"), c.Leg(settlement, amount_minor, "RUB")),
                          "card_purchase", external_ref=f"rrn-{transfer_id}", customer_ids=("alice",),
                          metadata={"mcc": "5411"})


async def three_entries(ledger):
    """Alice's card: funded with 1,000, then spends 100 ('spend-a') and 50 ('spend-b'); verify passes."""
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(spend(card, settlement, 100, "spend-a"))
    await writer.submit(spend(card, settlement, 50, "spend-b"))
    await ledger.parts.projection.wait_for(writer.last_position)
    assert await failed_checks(ledger) == {}
    return settlement, card


@pytest.mark.parametrize(("change", "column"), [
    ("amount_minor = -1", "amount_minor"),
    ("balance_after_minor = 999", "balance_after_minor"),
    ("credits_after_minor = credits_after_minor + 1", "credits_after_minor"),  # a statement's totals would lie
    ("occurred_at = occurred_at - interval '1 day'", "occurred_at"),
    ("transfer_id = 'spend-b'", "transfer_id"),
    ("code = 'p2p'", "code"),
])
async def test_an_entry_changed_in_the_middle_of_an_accounts_history_fails_verify(ledger, change, column):
    # The last entry still says 850, and the account still has three: only the middle one lies.
    settlement, card = await three_entries(ledger)
    await ledger.parts.pool.execute(
        f"UPDATE ledger_entries SET {change} WHERE account_id = $1 AND transfer_id = 'spend-a'", card)
    failed = await failed_checks(ledger)
    assert list(failed) == [READ_MODEL]
    assert f"entry of account {card}" in failed[READ_MODEL] and column in failed[READ_MODEL]


async def test_an_entry_no_leg_makes_fails_verify_even_when_it_replaces_one(ledger):
    settlement, card = await three_entries(ledger)
    await ledger.parts.pool.execute(
        "UPDATE ledger_entries SET seq = seq + 7 WHERE account_id = $1 AND transfer_id = 'spend-a'", card)
    failed = await failed_checks(ledger)
    assert list(failed) == [READ_MODEL]
    assert "no transfer leg makes" in failed[READ_MODEL] and "missing from the read model" in failed[READ_MODEL]


async def test_an_account_shown_to_another_owner_fails_verify(ledger):
    # Accounts are served by owner (GET /accounts?owner_id=): a wrong owner shows Alice's card to Mallory.
    settlement, card = await three_entries(ledger)
    await ledger.parts.pool.execute("UPDATE ledger_accounts SET owner_id = 'mallory' WHERE account_id = $1", card)
    failed = await failed_checks(ledger)
    assert list(failed) == [READ_MODEL]
    assert f"account {card}: owner_id 'mallory' (events say 'alice')" in failed[READ_MODEL]


async def test_an_account_shown_in_another_currency_fails_verify(ledger):
    settlement, card = await three_entries(ledger)
    await ledger.parts.pool.execute("UPDATE ledger_accounts SET currency = 'USD' WHERE account_id = $1", card)
    failed = await failed_checks(ledger)
    assert list(failed) == [READ_MODEL]
    assert f"account {card}: currency 'USD' (events say 'RUB')" in failed[READ_MODEL]


@pytest.mark.parametrize(("change", "column"), [
    ("kind = 'savings'", "kind"),
    ("opened_at = opened_at - interval '1 year'", "opened_at"),
    ("opened_position = opened_position + 1000", "opened_position"),  # the order an owner's accounts are paged in
])
async def test_an_account_shown_of_another_kind_age_or_opening_order_fails_verify(ledger, change, column):
    settlement, card = await three_entries(ledger)
    await ledger.parts.pool.execute(f"UPDATE ledger_accounts SET {change} WHERE account_id = $1", card)
    failed = await failed_checks(ledger)
    assert list(failed) == [READ_MODEL]
    assert f"account {card}: {column}" in failed[READ_MODEL]


@pytest.mark.parametrize(("change", "column"), [
    ("legs = jsonb_set(legs, '{1,account_id}', to_jsonb($1::text))", "legs"),  # another counterparty
    ("code = 'p2p'", "code"),
    ("external_ref = 'rrn-forged'", "external_ref"),
    ("customer_ids = ARRAY['mallory']", "customer_ids"),
    ("metadata = '{\"mcc\": \"6011\"}'::jsonb", "metadata"),
    ("posted_at = posted_at + interval '1 hour'", "posted_at"),
    ("posted_position = posted_position + 1000", "posted_position"),  # the order a reference's transfers are paged in
    ("requested_by = 'staff-7'", "requested_by"),  # someone else made to have asked for it
    ("reverses = 'top-up'", "reverses"),  # a payment shown as a reversal
    ("reversal_reason = 'duplicate'", "reversal_reason"),
    ("reversal_case_ref = 'DSP-1'", "reversal_case_ref"),  # a case shown to have decided it
])
async def test_a_transfer_rewritten_in_the_read_model_fails_verify(ledger, change, column):
    settlement, card = await three_entries(ledger)
    args = [str(uuid.uuid4())] if "$1" in change else []
    await ledger.parts.pool.execute(f"UPDATE ledger_transfers SET {change} WHERE transfer_id = 'spend-a'", *args)
    failed = await failed_checks(ledger)
    assert list(failed) == [READ_MODEL]
    assert f"transfer spend-a: {column}" in failed[READ_MODEL]


async def test_a_transfer_missing_from_the_read_model_fails_verify_even_when_another_stands_in(ledger):
    settlement, card = await three_entries(ledger)
    await ledger.parts.pool.execute("UPDATE ledger_transfers SET transfer_id = 'spend-z' WHERE transfer_id = 'spend-a'")
    failed = await failed_checks(ledger)
    assert list(failed) == [READ_MODEL]
    assert "transfer spend-a missing from the read model" in failed[READ_MODEL]


async def test_a_hold_whose_placing_event_is_gone_is_reported_not_crashed_on(ledger):
    # An auditor's tool must say *what* is wrong (a failed check, exit 1), not die with a traceback.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    expires_at = datetime.now(UTC) + timedelta(hours=1)
    for hold_id in ("h-captured", "h-voided"):
        await writer.submit(c.PlaceHold(hold_id, card, settlement, 300, "RUB", expires_at, "card_authorisation"))
    await writer.submit(c.CaptureHold("h-captured", "c1", 100))
    await writer.submit(c.VoidHold("h-voided"))
    await ledger.parts.projection.wait_for(writer.last_position)
    await forge_history(ledger, "DELETE FROM {table} WHERE originator_id = ANY($1::uuid[]) AND originator_version = 1",
                        [Hold.id_for("h-captured"), Hold.id_for("h-voided")])
    failed = await failed_checks(ledger)  # must not raise
    replay = failed["events replay"]
    assert "Hold.Captured names hold h-captured, which no Hold.Placed places before it" in replay
    assert "Hold.Voided names hold h-voided" in replay
    assert "read model has hold h-captured the event store does not" in failed[READ_MODEL]


async def test_legs_and_holds_on_an_account_never_opened_are_reported_not_crashed_on(ledger):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(c.PlaceHold("h1", card, settlement, 300, "RUB", datetime.now(UTC) + timedelta(hours=1),
                                    "card_authorisation"))
    await writer.submit(c.FreezeAccount(card, "customer_request"))  # the card's stream goes on after its opening
    await ledger.parts.projection.wait_for(writer.last_position)
    await forge_history(ledger, "DELETE FROM {table} WHERE originator_id = $1 AND originator_version = 1", card)
    failed = await failed_checks(ledger)  # must not raise
    replay = failed["events replay"]
    assert f"Transfer.Posted fund-{card} names account {card}, which no Account.Opened opens before it" in replay
    assert f"Hold.Placed h1 names account {card}" in replay and f"Account.Frozen names account {card}" in replay
    assert f"read model has account {card} the event store does not" in failed[READ_MODEL]


async def test_a_saved_amount_that_live_holds_will_pay_in_must_equal_what_they_have_left(ledger):
    # A shop that live holds will pay into must not close; its saved balance says how much they will.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(c.PlaceHold("auth", card, settlement, 600, "RUB", datetime.now(UTC) + timedelta(hours=1),
                                    "card_purchase"))
    await writer.submit(c.CaptureHold("auth", "part", 200))
    await ledger.parts.projection.wait_for(writer.last_position)
    assert await failed_checks(ledger) == {}
    await ledger.parts.pool.execute("UPDATE ledger_balances SET incoming_held_minor = 0 WHERE account_id = $1", settlement)
    failed = await failed_checks(ledger)
    assert list(failed) == ["balances equal legs and holds"]
    assert f"account {settlement}: saved balance -800/0/0 (posted/held/incoming held), legs and holds say -800/0/400" \
        in failed["balances equal legs and holds"]


async def test_every_wrong_row_is_counted_and_ten_are_shown(ledger):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 10_000)
    for number in range(12):
        await writer.submit(spend(card, settlement, 10, f"spend-{number}"))
    await ledger.parts.projection.wait_for(writer.last_position)
    await ledger.parts.pool.execute("UPDATE ledger_entries SET amount_minor = amount_minor + 1 WHERE account_id = $1", card)
    failed = await failed_checks(ledger)
    assert failed[READ_MODEL].count("entry of account") == 10 and failed[READ_MODEL].endswith("(+3 more)")


@pytest.mark.parametrize("page_size", [5000, 2])  # 2: entries and transfers are compared across many pages
async def test_a_ledger_with_holds_partial_captures_voids_and_multi_leg_transfers_verifies(ledger, monkeypatch, page_size):
    monkeypatch.setattr("ledger.verify.PAGE_SIZE", page_size)
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 10_000)
    fees, shop, savings = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await writer.submit(c.OpenAccount(fees, "bank", "fee_income", "RUB"))
    await writer.submit(c.OpenAccount(shop, "shop", "card", "RUB"))
    await writer.submit(c.OpenAccount(savings, "alice", "savings", "RUB", credit_limit_minor=500))
    await writer.submit(c.SetCreditLimit(savings, 700))
    soon = datetime.now(UTC) + timedelta(hours=1)
    await writer.submit(c.PlaceHold("auth-1", card, shop, 1_000, "RUB", soon, "card_purchase"))
    await writer.submit(c.PlaceHold("auth-2", card, shop, 400, "RUB", soon, "card_purchase"))
    await writer.submit(c.PlaceHold("auth-3", card, shop, 200, "RUB", datetime.now(UTC) + timedelta(seconds=1),
                                    "card_purchase"))
    await asyncio.gather(
        writer.submit(c.CaptureHold("auth-1", "part-1", 300)),
        writer.submit(c.PostTransfer("split", (c.Leg(card, -1_005, "RUB"), c.Leg(shop, 600, "RUB"),
                                               c.Leg(savings, 400, "RUB"), c.Leg(fees, 5, "RUB")), "p2p",
                                     customer_ids=("alice", "shop"), metadata={"note": "dinner"})),
    )
    await writer.submit(c.CaptureHold("auth-1", "part-2", 700))  # the rest: fully captured
    await writer.submit(c.CaptureHold("auth-2", "part-1", 100))
    await writer.submit(c.VoidHold("auth-2"))
    await asyncio.sleep(1.1)
    await writer.submit(c.ExpireHold("auth-3"))
    await writer.submit(c.PostTransfer("overdraft", (c.Leg(savings, -1_000, "RUB"), c.Leg(card, 1_000, "RUB")), "p2p"))
    await writer.submit(c.FreezeAccount(shop, "customer_request"))
    await writer.submit(c.UnfreezeAccount(shop, "customer_request"))
    await ledger.parts.projection.wait_for(writer.last_position)
    holds = {row["hold_id"]: (row["state"], row["captured_minor"])
             for row in await ledger.parts.pool.fetch("SELECT hold_id, state, captured_minor FROM ledger_holds")}
    assert holds == {"auth-1": ("captured", 1_000), "auth-2": ("voided", 100), "auth-3": ("expired", 0)}

    report = await verify(ledger.parts.app, ledger.settings)
    assert report.ok, [(check.name, check.detail) for check in report.checks if not check.ok]
    read_model = next(check.detail for check in report.checks if check.name == READ_MODEL)
    entries = await ledger.parts.pool.fetchval("SELECT count(*) FROM ledger_entries")
    assert f"5 accounts, {entries} entries, 6 transfers, 3 holds" in read_model


@pytest.mark.parametrize(("change", "column"), [
    ("placed_position = placed_position - 1", "placed_position"),  # listed out of its order among pending holds
    ("placed_at = placed_at - interval '1 day'", "placed_at"),
    ("metadata = '{\"merchant\": \"elsewhere\"}'", "metadata"),  # the purchase shown as made at another shop
])
async def test_a_hold_shown_placed_at_another_time_or_place_in_the_log_fails_verify(ledger, change, column):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    await ledger.parts.writer.submit(c.PlaceHold("auth-moved", card, settlement, 100, "RUB",
                                                 datetime.now(UTC) + timedelta(hours=1), "card_purchase"))
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    assert await failed_checks(ledger) == {}
    await ledger.parts.pool.execute(f"UPDATE ledger_holds SET {change} WHERE hold_id = 'auth-moved'")
    failed = await failed_checks(ledger)
    assert list(failed) == [READ_MODEL]
    assert "hold auth-moved" in failed[READ_MODEL] and column in failed[READ_MODEL]


async def test_holds_and_accounts_missing_from_the_read_model_or_made_up_in_it_are_found_page_by_page(
        ledger, monkeypatch):
    # The read model's accounts and holds are read a page at a time, not all at once: with
    # pages of two, a row deleted and a row made up are still each named.
    monkeypatch.setattr("ledger.verify.PAGE_SIZE", 2)
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    soon = datetime.now(UTC) + timedelta(hours=1)
    for number in range(5):
        await writer.submit(c.PlaceHold(f"auth-{number}", card, settlement, 10, "RUB", soon, "card_purchase"))
    await ledger.parts.projection.wait_for(writer.last_position)
    assert await failed_checks(ledger) == {}
    pool, made_up = ledger.parts.pool, uuid.uuid4()
    await pool.execute("DELETE FROM ledger_holds WHERE hold_id = 'auth-3'")
    await pool.execute("INSERT INTO ledger_holds SELECT 'auth-made-up', debit_account_id, credit_account_id,"
                       " amount_minor, captured_minor, currency, state, expires_at, code, placed_position, placed_at,"
                       " external_ref, metadata FROM ledger_holds WHERE hold_id = 'auth-1'")
    await pool.execute("DELETE FROM ledger_accounts WHERE account_id = $1", settlement)
    await pool.execute("INSERT INTO ledger_accounts (account_id, owner_id, kind, currency, state, freeze_reasons,"
                       " credit_limit_minor, opened_at, updated_at, opened_position) SELECT $2, owner_id, kind,"
                       " currency, state, freeze_reasons, credit_limit_minor, opened_at, updated_at, opened_position"
                       " FROM ledger_accounts WHERE account_id = $1", card, made_up)
    failed = await failed_checks(ledger)
    assert list(failed) == [READ_MODEL]
    assert "hold auth-3 missing from the read model" in failed[READ_MODEL]
    assert "read model has hold auth-made-up the event store does not" in failed[READ_MODEL]
    assert f"account {settlement} missing from the read model" in failed[READ_MODEL]
    assert f"read model has account {made_up} the event store does not" in failed[READ_MODEL]
    assert failed[READ_MODEL].count("\n") == 3  # those four, and nothing else


async def test_a_read_model_behind_the_events_is_compared_as_it_stood_at_its_own_position(ledger, monkeypatch):
    # Events past the read model's position change accounts and holds it has not caught up
    # with yet: verify compares it with the books as they stood at its position, so the one
    # problem is that it is behind.
    monkeypatch.setattr("ledger.verify.CATCH_UP_WAIT_S", 0.2)
    writer, pool = ledger.parts.writer, ledger.parts.pool
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(c.PlaceHold("auth", card, settlement, 300, "RUB", datetime.now(UTC) + timedelta(hours=1),
                                    "card_purchase"))
    await ledger.parts.projection.wait_for(writer.last_position)
    async with pool.acquire() as connection, connection.transaction():
        # The live projection waits for this lock before it applies anything.
        position = await connection.fetchval(
            "SELECT position FROM projection_position WHERE projection = $1 FOR UPDATE", READ_MODEL_PROJECTION)
        await writer.submit(c.CaptureHold("auth", "part", 100))
        await writer.submit(c.PlaceHold("auth-later", card, settlement, 50, "RUB",
                                        datetime.now(UTC) + timedelta(hours=1), "card_purchase"))
        await writer.submit(c.FreezeAccount(card, "court_order"))
        await writer.submit(c.OpenAccount(uuid.uuid4(), "bob", "card", "RUB"))
        behind = await failed_checks(ledger)
    assert list(behind) == [READ_MODEL]
    assert behind[READ_MODEL] == (f"read model at position {position} did not reach {writer.last_position},"
                                  " the head when verify began, within 0 s")
    await ledger.parts.projection.wait_for(writer.last_position)
    assert await failed_checks(ledger) == {}


async def test_a_saved_balance_deleted_or_made_up_is_found_page_by_page(ledger, monkeypatch):
    # Saved balances are read a page at a time too: a card with no balance would be refused
    # every payment, and a made-up one is money the books never held.
    monkeypatch.setattr("ledger.verify.PAGE_SIZE", 2)
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    others = [uuid.uuid4() for _ in range(4)]
    for account_id in others:
        await writer.submit(c.OpenAccount(account_id, "bob", "card", "RUB"))
    await ledger.parts.projection.wait_for(writer.last_position)
    assert await failed_checks(ledger) == {}
    made_up = uuid.uuid4()
    await ledger.parts.pool.execute("DELETE FROM ledger_balances WHERE account_id = $1", card)
    await ledger.parts.pool.execute("INSERT INTO ledger_balances (account_id, posted_minor, held_minor, version)"
                                    " VALUES ($1, 500, 0, 1)", made_up)
    failed = await failed_checks(ledger)
    assert list(failed) == ["balances equal legs and holds"]
    assert failed["balances equal legs and holds"] == (
        f"a balance is saved for {made_up}, which the event store has no account for\n"
        f"account {card} has no saved balance")
