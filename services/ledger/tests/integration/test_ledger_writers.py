"""Rules of the ledger's write side on real PostgreSQL: balances commit with their events,
a second writer never acts on a balance or state it has not seen, and verify catches a
balance that disagrees with the journal."""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import pytest

from kabinet_chassis.eventstore import events_table
from ledger import writer as writer_module
from ledger.application import ensure_store_schema
from ledger.domain import commands as c
from ledger.domain.errors import AccountClosed, AccountFrozen, AccountNotEmpty, IdempotencyConflict, InsufficientFunds
from ledger.service import build
from ledger.verify import verify
from ledger.writer import LedgerUnavailable
from services.ledger.tests.integration.ledger_support import as_an_older_ledger_left_it, funded_card, saved_balance, uncached_writer

pytestmark = pytest.mark.integration


def spend(card, settlement, amount_minor: int) -> c.PostTransfer:
    return c.PostTransfer(f"spend-{uuid.uuid4()}", (c.Leg(card, -amount_minor, "RUB"),
                                                    c.Leg(settlement, amount_minor, "RUB")), "card_purchase")


async def test_a_transfer_and_its_balances_commit_together(ledger):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    await ledger.parts.writer.submit(spend(card, settlement, 300))
    # Read straight after the commit, with no projection to wait for.
    row = await ledger.parts.pool.fetchrow("SELECT posted_minor, held_minor FROM ledger_balances WHERE account_id = $1", card)
    assert (row["posted_minor"], row["held_minor"]) == (700, 0)


async def test_a_second_writer_with_a_stale_balance_validates_again_instead_of_overdrawing(ledger):
    first = ledger.parts.writer
    settlement, card = await funded_card(first, 1_000)
    async with uncached_writer(ledger.settings) as second:
        await second.submit(spend(card, settlement, 600))  # `first` still holds the card at 1,000
        with pytest.raises(InsufficientFunds, match="400"):
            await first.submit(spend(card, settlement, 600))
        await first.submit(spend(card, settlement, 400))
    balance = (await saved_balance(ledger.parts.pool, card))[0]
    assert balance == 0


async def test_a_second_writer_that_missed_a_top_up_judges_a_payment_again_instead_of_keeping_a_refusal(ledger):
    # A refusal is kept for good (a repeat gets it again): it must not rest on a balance
    # another writer has moved on since, as in the seconds before a lost lead is noticed.
    first = ledger.parts.writer
    settlement, card = await funded_card(first, 100)  # `first` holds the card at 100
    async with uncached_writer(ledger.settings) as second:
        await second.submit(c.PostTransfer(f"salary-{card}", (c.Leg(settlement, -1_000, "RUB"), c.Leg(card, 1_000, "RUB")),
                                           "top_up"))
        paid = await first.submit(spend(card, settlement, 500))
    assert not paid.replayed
    assert await saved_balance(ledger.parts.pool, card) == (600, 0)


async def test_a_second_writer_that_missed_an_opening_judges_a_payment_to_it_again_instead_of_keeping_a_refusal(
        ledger, monkeypatch):
    # A payment refused for want of its account is kept for good too: it must not rest on an
    # account another writer opened while this writer's batch was being judged.
    first = ledger.parts.writer
    settlement, card = await funded_card(first, 1_000)
    shop = uuid.uuid4()
    real_append_batch, opened = writer_module.append_batch, []

    async def the_shop_opened_meanwhile(connection, *args):
        if not opened:  # between the second writer's judging and its commit
            opened.append(shop)
            await first.submit(c.OpenAccount(shop, "shop", "card", "RUB"))
        return await real_append_batch(connection, *args)

    async with uncached_writer(ledger.settings) as second:
        # The opening posts before the payment's batch time, as a batch judged a moment
        # earlier would: the posting clock, which refuses a batch older than the last one,
        # does not stand in the payment's way, and only what it judged absent can.
        now = datetime.now(UTC)
        first.clock, second.clock = (lambda: now + timedelta(seconds=1)), (lambda: now + timedelta(seconds=2))
        monkeypatch.setattr(writer_module, "append_batch", the_shop_opened_meanwhile)
        paid = await second.submit(c.PostTransfer(f"purchase-{shop}", (c.Leg(card, -300, "RUB"), c.Leg(shop, 300, "RUB")),
                                                  "card_purchase"))
    assert opened and not paid.replayed, "judged again once the shop was there, not refused for good"
    assert await saved_balance(ledger.parts.pool, shop) == (300, 0)


async def test_a_second_writer_that_missed_an_unfreeze_judges_a_payment_again_instead_of_keeping_a_refusal(ledger):
    first = ledger.parts.writer
    settlement, card = await funded_card(first, 1_000)
    await first.submit(c.FreezeAccount(card, "customer_request"))
    async with uncached_writer(ledger.settings) as second:
        await second.submit(c.UnfreezeAccount(card, "customer_request"))  # `first` still holds the card as frozen
        await first.submit(spend(card, settlement, 100))
    assert await saved_balance(ledger.parts.pool, card) == (900, 0)


async def test_a_second_writer_that_missed_a_freeze_cannot_debit_the_frozen_account(ledger):
    first = ledger.parts.writer
    settlement, card = await funded_card(first, 1_000)
    async with uncached_writer(ledger.settings) as second:
        await second.submit(c.FreezeAccount(card, "customer_request"))  # `first` still holds the card as open
        with pytest.raises(AccountFrozen):
            await first.submit(spend(card, settlement, 100))
    balance = (await saved_balance(ledger.parts.pool, card))[0]
    assert balance == 1_000


async def test_a_second_writer_that_missed_a_lowered_credit_limit_cannot_spend_past_it(ledger):
    first = ledger.parts.writer
    settlement, card = await funded_card(first, 1_000)
    await first.submit(c.SetCreditLimit(card, 5_000))  # `first` holds the card with 6,000 available
    async with uncached_writer(ledger.settings) as second:
        await second.submit(c.SetCreditLimit(card, 0))  # the bank cuts the limit
        with pytest.raises(InsufficientFunds):
            await first.submit(spend(card, settlement, 3_000))
    assert await saved_balance(ledger.parts.pool, card) == (1_000, 0)


async def test_a_second_writer_that_missed_a_closing_cannot_place_a_hold_for_the_closed_account(ledger):
    first = ledger.parts.writer
    settlement, card = await funded_card(first, 1_000)
    shop = uuid.uuid4()
    await first.submit(c.OpenAccount(shop, "shop", "card", "RUB"))
    expires_at = datetime.now(UTC) + timedelta(hours=1)
    async with uncached_writer(ledger.settings) as second:
        await second.submit(c.PlaceHold("h0", card, shop, 1, "RUB", expires_at, "card_authorisation"))  # caches both
        await second.submit(c.VoidHold("h0"))  # the shop may close: no live hold pays into it
        await first.submit(c.CloseAccount(shop, "customer_request"))
        with pytest.raises(AccountClosed):
            await second.submit(c.PlaceHold("h1", card, shop, 100, "RUB", expires_at, "card_authorisation"))
    held = await ledger.parts.pool.fetchval("SELECT held_minor FROM ledger_balances WHERE account_id = $1", card)
    assert held == 0


async def test_a_restarted_writer_knows_what_live_holds_will_pay_into_an_account_and_will_not_close_it(ledger):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    shop = uuid.uuid4()
    await ledger.parts.writer.submit(c.OpenAccount(shop, "shop", "card", "RUB"))
    await ledger.parts.writer.submit(
        c.PlaceHold("auth", card, shop, 600, "RUB", datetime.now(UTC) + timedelta(hours=1), "card_purchase"))
    async with uncached_writer(ledger.settings) as restarted:  # reads the saved balance, not a cache
        with pytest.raises(AccountNotEmpty, match="to be paid 600"):
            await restarted.submit(c.CloseAccount(shop, "customer_request"))
        await restarted.submit(c.CaptureHold("auth", "clear", 600))  # the shop is paid
    assert await ledger.parts.pool.fetchval(
        "SELECT incoming_held_minor FROM ledger_balances WHERE account_id = $1", shop) == 0


async def test_a_restarted_writer_makes_reads_wait_for_everything_committed_before_it(ledger):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    async with uncached_writer(ledger.settings) as restarted:  # as after a restart: it has committed nothing
        assert restarted.last_position == ledger.parts.writer.last_position > 0


async def test_the_writer_keeps_no_balance_for_an_account_it_no_longer_caches(ledger, monkeypatch):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    monkeypatch.setattr("ledger.writer.CACHE_MAX_AGGREGATES", 3)  # each new transfer pushes an account out
    await asyncio.gather(*(writer.submit(spend(card, settlement, 10)) for _ in range(3)))
    assert len(writer._cache) <= 3
    assert set(writer._balances) <= set(writer._cache)


async def test_verify_passes_on_a_ledger_that_keeps_posting_and_freezing_while_it_runs(ledger):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000_000)
    stop = asyncio.Event()

    async def keep_writing() -> int:
        for round_number in range(100_000):  # bounded; stopped long before
            if stop.is_set():
                return round_number
            await asyncio.gather(*(writer.submit(spend(settlement, card, 1)) for _ in range(8)))  # a frozen card still takes credits
            change = c.FreezeAccount if round_number % 2 == 0 else c.UnfreezeAccount
            await writer.submit(change(card, "customer_request"))
        return -1

    traffic = asyncio.create_task(keep_writing())
    try:
        reports = [await verify(ledger.parts.app, ledger.settings) for _ in range(3)]
    finally:
        stop.set()
    rounds = await traffic
    assert rounds > 3  # the ledger really was writing while verify ran
    for report in reports:
        assert report.ok, [(check.name, check.detail) for check in report.checks if not check.ok]


async def test_posting_times_never_go_back_along_the_log_so_statements_add_up(ledger):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    t = datetime.now(UTC) + timedelta(seconds=10)
    async with uncached_writer(ledger.settings) as behind:  # another writer, its clock a minute slow
        behind.clock = lambda: t - timedelta(minutes=1)
        writer.clock = lambda: t
        await writer.submit(spend(card, settlement, 100))
        writer.clock = lambda: t - timedelta(seconds=1)  # the clock steps back
        await writer.submit(spend(card, settlement, 10))
        await behind.submit(spend(card, settlement, 1))  # it has not seen the batches at t
    await ledger.parts.projection.wait_for(await ledger.parts.pool.fetchval(
        f"SELECT max(notification_id) FROM {events_table(ledger.parts.app.recorder)}"))

    times = [row["occurred_at"] for row in await ledger.parts.pool.fetch(
        "SELECT occurred_at FROM ledger_entries WHERE account_id = $1 ORDER BY position", card)]
    assert times == sorted(times) and times[-3:] == [t, t, t]
    statement = (await ledger.get(f"/accounts/{card}/statement", params={
        "since": (t - timedelta(seconds=2)).isoformat(), "until": (t + timedelta(seconds=5)).isoformat()})).json()
    assert statement["opening_balance_minor"] == 1_000 and statement["closing_balance_minor"] == 889
    assert [line["balance_after_minor"] for line in statement["lines"]] == [900, 890, 889]
    before = (await ledger.get(f"/accounts/{card}/balance", params={"at": (t - timedelta(seconds=1)).isoformat()})).json()
    assert before["posted"]["amount_minor"] == 1_000


async def test_a_clock_far_ahead_posts_nothing_and_leaves_later_batches_on_time(ledger):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    expires_at = datetime.now(UTC) + timedelta(hours=1)
    await writer.submit(c.PlaceHold("hold-1", card, settlement, 500, "RUB", expires_at, "card_authorisation"))
    real_clock = writer.clock
    writer.clock = lambda: datetime.now(UTC) + timedelta(days=365)  # an NTP glitch
    with pytest.raises(LedgerUnavailable, match="more than 60 s ahead"):
        await writer.submit(spend(card, settlement, 1))
    writer.clock = real_clock
    spent = await writer.submit(spend(card, settlement, 1))  # times were not carried a year ahead
    assert abs(spent.posted_at - datetime.now(UTC)) < timedelta(seconds=60)
    captured = await writer.submit(c.CaptureHold("hold-1", "capture-1", 100))
    assert captured.captured_minor == 100


async def test_one_ledger_process_writes_at_a_time_and_a_standby_takes_over_when_it_stops(stack, unique_name):
    settings = stack.service_settings(f"ledger_{unique_name}")
    (first_service, first), (second_service, second) = build(settings), build(settings)
    first_running = first_service.running()
    await first_running.__aenter__()
    try:
        settlement, card = await funded_card(first.writer, 1_000)
        async with second_service.running():
            with pytest.raises(LedgerUnavailable, match="not the active writer"):
                await second.writer.submit(spend(card, settlement, 100))
            await first.writer.submit(spend(card, settlement, 100))

            await first_running.__aexit__(None, None, None)  # the leader stops: its lock goes with its connection
            first_running = None
            await second.writer.submit(spend(card, settlement, 100))  # the standby took the lead meanwhile
            balance = (await saved_balance(second.pool, card))[0]
    finally:
        if first_running is not None:
            await first_running.__aexit__(None, None, None)
    assert balance == 800


async def test_verify_fails_when_a_saved_balance_differs_from_the_legs(ledger):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    assert (await verify(ledger.parts.app, ledger.settings)).ok
    connection = await asyncpg.connect(ledger.settings.service_database_url)
    try:
        await connection.execute("UPDATE ledger_balances SET posted_minor = posted_minor + 1 WHERE account_id = $1", card)
    finally:
        await connection.close()
    report = await verify(ledger.parts.app, ledger.settings)
    failed = {check.name: check.detail for check in report.checks if not check.ok}
    assert list(failed) == ["balances equal legs and holds"]
    assert str(card) in failed["balances equal legs and holds"] and "1001" in failed["balances equal legs and holds"]


async def test_verify_fails_when_the_history_read_model_differs_from_the_events(ledger):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    await ledger.parts.pool.execute("UPDATE ledger_entries SET balance_after_minor = 999 WHERE account_id = $1", card)
    report = await verify(ledger.parts.app, ledger.settings)
    failed = {check.name: check.detail for check in report.checks if not check.ok}
    assert list(failed) == ["read model equals event store"]
    assert str(card) in failed["read model equals event store"]


async def test_verify_fails_when_the_holds_the_expiry_sweep_reads_differ_from_the_events(ledger):
    # A hold shown as voided would never be swept, and its money would stay reserved for good.
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    expires_at = datetime.now(UTC) + timedelta(hours=1)
    await ledger.parts.writer.submit(c.PlaceHold("kept", card, settlement, 300, "RUB", expires_at, "card_authorisation"))
    await ledger.parts.writer.submit(c.PlaceHold("captured", card, settlement, 200, "RUB", expires_at, "card_authorisation"))
    await ledger.parts.writer.submit(c.CaptureHold("captured", "c1", 200))
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    assert (await verify(ledger.parts.app, ledger.settings)).ok

    await ledger.parts.pool.execute("UPDATE ledger_holds SET state = 'voided' WHERE hold_id = 'kept'")
    await ledger.parts.pool.execute("DELETE FROM ledger_transfers WHERE transfer_id = $1", f"fund-{card}")
    report = await verify(ledger.parts.app, ledger.settings)
    failed = {check.name: check.detail for check in report.checks if not check.ok}
    assert list(failed) == ["read model equals event store"]
    assert "hold kept" in failed["read model equals event store"]
    assert "transfers" in failed["read model equals event store"]


async def test_a_retry_the_writer_has_never_seen_gets_the_first_result_not_a_second_posting(ledger):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    first = spend(card, settlement, 300)
    await ledger.parts.writer.submit(first)
    async with uncached_writer(ledger.settings) as fresh:  # as after a restart: nothing cached
        again = await fresh.submit(first)
        with pytest.raises(IdempotencyConflict):
            await fresh.submit(c.PostTransfer(first.transfer_id, first.legs, "refund"))  # same id, other body
    assert again.replayed and again.transfer_id == first.transfer_id
    balance = (await saved_balance(ledger.parts.pool, card))[0]
    assert balance == 700


async def test_a_batch_the_store_fails_in_the_middle_of_leaves_no_change_behind(ledger, monkeypatch):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    expires_at = datetime.now(UTC) + timedelta(hours=1)
    await writer.submit(c.PlaceHold("hold-1", card, settlement, 400, "RUB", expires_at, "card_authorisation"))
    async with uncached_writer(ledger.settings) as other:  # an account this writer has not loaded yet
        elsewhere = uuid.uuid4()
        await other.submit(c.OpenAccount(elsewhere, "bob", "card", "RUB"))

    def store_down(aggregate_id, *args, **kwargs):
        raise ConnectionError("the event store went away")

    monkeypatch.setattr(writer.app.repository, "get", store_down)
    capture = writer.submit(c.CaptureHold("hold-1", "capture-1", 400))  # changes the cached hold...
    to_bob = writer.submit(spend(card, elsewhere, 100))  # ...then needs a load that fails, in the same batch
    outcomes = await asyncio.gather(capture, to_bob, return_exceptions=True)
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)
    monkeypatch.undo()

    # The capture was never saved, so the hold is still active and voidable.
    voided = await writer.submit(c.VoidHold("hold-1"))
    assert voided.state == "voided"
    await ledger.parts.projection.wait_for(writer.last_position)
    assert (await verify(ledger.parts.app, ledger.settings)).ok


async def test_after_an_upgrade_the_payee_of_an_earlier_hold_closes_once_the_hold_is_settled(ledger):
    # A database made before balances kept what live holds will pay in: the column is filled
    # in from the holds' events, or the payee's amount would go below zero once the hold is
    # captured, and it could never close.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    shop = uuid.uuid4()
    await writer.submit(c.OpenAccount(shop, "shop", "card", "RUB"))
    await writer.submit(c.PlaceHold("old-hold", card, shop, 400, "RUB", datetime.now(UTC) + timedelta(days=1),
                                    "purchase"))
    # The upgrade: the old table had no column; ensure_store_schema adds it, as on any start.
    await as_an_older_ledger_left_it(ledger.parts.pool, "ALTER TABLE ledger_balances DROP COLUMN incoming_held_minor")
    await ensure_store_schema(ledger.parts.pool, ledger.parts.app)
    await writer.start()  # the process restarts: nothing cached
    await writer.submit(c.CaptureHold("old-hold", "c1", 400))
    await writer.submit(c.PostTransfer("shop-out", (c.Leg(shop, -400, "RUB"), c.Leg(settlement, 400, "RUB")), "p2p"))
    incoming = await ledger.parts.pool.fetchval(
        "SELECT incoming_held_minor FROM ledger_balances WHERE account_id = $1", shop)
    assert incoming == 0
    assert (await writer.submit(c.CloseAccount(shop, "customer_request"))).state == "closed"


async def test_a_process_regaining_the_lead_waits_for_its_batch_in_flight_before_it_drops_its_cache(
        ledger, monkeypatch):
    # Lost the lead and got it back while a batch was being validated: the cache must not go
    # from under that batch, nor its position back past what the batch commits.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    validating, go_on = threading.Event(), threading.Event()
    validate = writer._validate

    def held_validate(*args):
        validating.set()
        go_on.wait(10)
        return validate(*args)

    monkeypatch.setattr(writer, "_validate", held_validate)
    posting = asyncio.create_task(writer.submit(
        c.PostTransfer("spend", (c.Leg(card, -100, "RUB"), c.Leg(settlement, 100, "RUB")), "card_purchase")))
    assert await anyio.to_thread.run_sync(validating.wait, 10)
    regaining = asyncio.create_task(writer.start())
    await asyncio.sleep(0.3)
    assert not regaining.done(), "the lead was taken again under a batch in flight"
    go_on.set()
    assert (await posting).transfer_id == "spend"
    await regaining
    assert writer.last_position == await writer.log_head() and writer.is_active
    assert await saved_balance(ledger.parts.pool, card) == (900, 0)
