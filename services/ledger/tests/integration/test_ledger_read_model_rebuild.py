"""Rules of rebuilding the ledger's read model (`kabinet ledger rebuild-read-model`): a read
model that differs from the event store is built again from the events while the ledger
goes on posting; customers and staff reading meanwhile see the old read model or the new
one, never one half built; and a rebuild that fails midway changes nothing."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from ledger import projections, rebuild
from ledger.domain import commands as c
from ledger.rebuild import REBUILD_LOCK, REBUILD_SCHEMA, rebuild_read_model
from services.ledger.tests.integration.ledger_support import failed_checks, funded_card, run_cli

pytestmark = pytest.mark.integration

READ_MODEL_CHECK = "read model equals event store"
PAYMENTS_WHILE_REBUILDING_MAX = 5_000


async def a_month_of_alice(ledger) -> tuple[uuid.UUID, uuid.UUID]:
    """Alice's card: funded, spent on, a hold captured in part, frozen by the bank's anti-fraud."""
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 100_000)
    for n in range(30):
        await writer.submit(c.PostTransfer(f"coffee-{n}", (c.Leg(card, -300, "RUB"), c.Leg(settlement, 300, "RUB")),
                                           "card_purchase"))
    await writer.submit(c.PlaceHold("taxi", card, settlement, 1_000, "RUB", datetime.now(UTC) + timedelta(days=1), "purchase"))
    await writer.submit(c.CaptureHold("taxi", "clearing-1", 700))
    await writer.submit(c.FreezeAccount(card, "fraud_suspected"))
    await writer.submit(c.UnfreezeAccount(card, "fraud_suspected"))
    await ledger.parts.projection.wait_for(writer.last_position)
    return settlement, card


async def the_read_model_damaged(ledger, card: uuid.UUID) -> None:
    """A running balance changed by hand and a transfer deleted: verify must see both."""
    await ledger.parts.pool.execute(
        "UPDATE ledger_entries SET balance_after_minor = balance_after_minor + 1"
        " WHERE account_id = $1 AND transfer_id = 'coffee-7'", card)
    await ledger.parts.pool.execute("DELETE FROM ledger_transfers WHERE transfer_id = 'coffee-8'")
    assert READ_MODEL_CHECK in await failed_checks(ledger)


async def paying_until(stop: asyncio.Event, writer, settlement: uuid.UUID, card: uuid.UUID) -> int:
    """Alice pays a rouble at a time until told to stop; how many payments were posted."""
    for n in itertools.count():
        if stop.is_set() or n >= PAYMENTS_WHILE_REBUILDING_MAX:
            return n
        await writer.submit(c.PostTransfer(f"meanwhile-{n}", (c.Leg(card, -1, "RUB"), c.Leg(settlement, 1, "RUB")), "p2p"))
    raise AssertionError("unreachable")


async def test_a_damaged_read_model_is_rebuilt_from_the_events_while_payments_go_on(ledger, monkeypatch):
    settlement, card = await a_month_of_alice(ledger)
    await the_read_model_damaged(ledger, card)
    stop = asyncio.Event()
    paying = asyncio.create_task(paying_until(stop, ledger.parts.writer, settlement, card))
    try:
        result = await run_cli(ledger, monkeypatch, "rebuild-read-model")
    finally:
        stop.set()
        paid_meanwhile = await paying
    assert result.exit_code == 0, result.output
    assert "rebuilt the read model from" in result.output
    assert paid_meanwhile > 0, "no payment was posted while the read model was rebuilt"
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)

    assert await failed_checks(ledger) == {}
    # The running ledger reads the new tables (its prepared statements named the old ones).
    history = await ledger.get(f"/accounts/{card}/history", params={"limit": 200})
    assert history.status_code == 200, history.text
    lines = history.json()["lines"]
    assert lines[0]["balance_after_minor"] == 100_000 - 30 * 300 - 700 - paid_meanwhile  # newest first
    assert (await ledger.get("/transfers/coffee-8")).status_code == 200
    assert await ledger.parts.pool.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", REBUILD_SCHEMA) == 0


async def test_customers_reading_during_a_rebuild_see_the_old_read_model_or_the_new_never_half_of_one(ledger,
                                                                                                      monkeypatch):
    settlement, card = await a_month_of_alice(ledger)
    monkeypatch.setattr(rebuild, "PAGE_EVENTS", 5)  # many small pages: reads fall between them
    before = (await ledger.get(f"/accounts/{card}/history", params={"limit": 200})).json()["lines"]
    rebuilding = asyncio.create_task(rebuild_read_model(ledger.parts.app, ledger.settings.service_database_url))
    answers = 0
    while not rebuilding.done():
        account = await ledger.get(f"/accounts/{card}")
        history = await ledger.get(f"/accounts/{card}/history", params={"limit": 200})
        assert account.status_code == 200 and account.json()["owner_id"] == "alice", account.text
        assert history.status_code == 200 and history.json()["lines"] == before, history.text
        answers += 1
        await asyncio.sleep(0)
    rebuilt = await rebuilding
    assert answers > 1, "the rebuild ended before a read came between its pages"
    assert rebuilt.position == ledger.parts.writer.last_position
    assert (await ledger.get(f"/accounts/{card}/history", params={"limit": 200})).json()["lines"] == before


async def test_a_rebuild_that_fails_midway_changes_nothing(ledger, monkeypatch):
    _, card = await a_month_of_alice(ledger)
    await the_read_model_damaged(ledger, card)
    entries_before = await ledger.parts.pool.fetch("SELECT * FROM ledger_entries ORDER BY position, seq")
    apply_page, pages = rebuild.projections.apply_page, itertools.count(1)

    async def fails_on_the_third_page(connection, page):
        if next(pages) == 3:
            raise asyncpg.DiskFullError("could not extend file: No space left on device")
        await apply_page(connection, page)

    monkeypatch.setattr(rebuild, "PAGE_EVENTS", 5)
    monkeypatch.setattr(rebuild.projections, "apply_page", fails_on_the_third_page)
    with pytest.raises(asyncpg.DiskFullError):
        await rebuild_read_model(ledger.parts.app, ledger.settings.service_database_url)

    assert await ledger.parts.pool.fetch("SELECT * FROM ledger_entries ORDER BY position, seq") == entries_before
    assert await ledger.parts.pool.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", REBUILD_SCHEMA) == 0
    monkeypatch.setattr(rebuild.projections, "apply_page", apply_page)
    await rebuild_read_model(ledger.parts.app, ledger.settings.service_database_url)  # the lock went with it
    assert await failed_checks(ledger) == {}


async def test_a_second_rebuild_while_one_runs_is_refused_exit_1(ledger, monkeypatch):
    holder = await asyncpg.connect(ledger.settings.service_database_url)
    try:
        assert await holder.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", REBUILD_LOCK)
        result = await run_cli(ledger, monkeypatch, "rebuild-read-model")
    finally:
        await holder.close()
    assert result.exit_code == 1, result.output
    assert "another rebuild of the ledger's read model is running" in result.output


async def test_readers_holding_the_live_tables_through_every_attempt_leave_it_unrebuilt_exit_1_in_one_line(
        ledger, monkeypatch):
    await funded_card(ledger.parts.writer, 1_000)
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    monkeypatch.setattr(rebuild, "SWAP_LOCK_TIMEOUT_S", 1)
    entries_before = await ledger.parts.pool.fetch("SELECT * FROM ledger_entries ORDER BY position, seq")
    report = await asyncpg.connect(ledger.settings.service_database_url)
    try:
        async with report.transaction():
            await report.fetchval("SELECT count(*) FROM ledger_entries")  # a report longer than every attempt
            result = await run_cli(ledger, monkeypatch, "rebuild-read-model")
    finally:
        await report.close()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "readers held the live read model's tables" in result.output and "nothing changed" in result.output
    assert await ledger.parts.pool.fetch("SELECT * FROM ledger_entries ORDER BY position, seq") == entries_before
    assert await ledger.parts.pool.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", REBUILD_SCHEMA) == 0


async def test_a_long_read_holding_up_the_swap_delays_the_rebuild_and_does_not_fail_it(ledger, monkeypatch):
    # A staff report reading every entry for longer than the swap waits for its lock: the
    # swap gives up at once, so the readers queued behind it are not held up, and tries again.
    await a_month_of_alice(ledger)
    monkeypatch.setattr(rebuild, "SWAP_LOCK_TIMEOUT_S", 1)
    report = await asyncpg.connect(ledger.settings.service_database_url)
    try:
        reading = report.transaction()
        await reading.start()
        await report.fetchval("SELECT count(*) FROM ledger_entries")  # its lock lasts until the transaction ends
        asyncio.get_running_loop().call_later(1.5, lambda: asyncio.ensure_future(reading.commit()))
        rebuilt = await rebuild_read_model(ledger.parts.app, ledger.settings.service_database_url)
    finally:
        await report.close()
    assert rebuilt.took_s > 1.0
    assert await failed_checks(ledger) == {}


async def test_an_operator_is_told_how_far_the_rebuild_has_come_page_by_page(ledger, monkeypatch):
    # Rebuilding years of history takes a while: the operator sees it move towards the head.
    monkeypatch.setattr(rebuild, "PAGE_EVENTS", 5)
    await a_month_of_alice(ledger)
    head = ledger.parts.writer.last_position
    told: list[tuple[int, int]] = []
    rebuilt = await rebuild_read_model(ledger.parts.app, ledger.settings.service_database_url,
                                       on_progress=lambda *progress: told.append(progress))
    positions = [position for position, _ in told]
    assert len(told) >= head // 5 and positions == sorted(set(positions))  # a page at a time, never back
    assert told[-1] == (head, head) and rebuilt.position == head
    assert all(position <= up_to for position, up_to in told)


async def test_the_rebuilt_read_model_keeps_the_owner_and_grants_of_the_old(ledger):
    # A reporting role reads the entries; an operator's own role runs the rebuild. Afterwards the
    # service's role still owns (and writes) its read model, and the report still reads it.
    await a_month_of_alice(ledger)
    pool, reporting, operator = ledger.parts.pool, f"reporting_{uuid.uuid4().hex[:8]}", f"operator_{uuid.uuid4().hex[:8]}"
    service_role = await pool.fetchval("SELECT current_user")
    await pool.execute(f'CREATE ROLE "{reporting}"')
    await pool.execute(f'GRANT SELECT ON ledger_entries TO "{reporting}"')
    await pool.execute(f'CREATE ROLE "{operator}" LOGIN SUPERUSER PASSWORD \'operator\'')
    try:
        url = urlsplit(ledger.settings.service_database_url)
        operator_url = urlunsplit(url._replace(netloc=f"{operator}:operator@{url.hostname}:{url.port}"))
        await rebuild_read_model(ledger.parts.app, operator_url)
        owners = {row["relname"]: row["owner"] for row in await pool.fetch(
            "SELECT relname, pg_get_userbyid(relowner) AS owner FROM pg_class WHERE relname = ANY($1)"
            " AND relnamespace = current_schema()::regnamespace", list(projections.READ_MODEL_TABLES))}
        assert owners == dict.fromkeys(projections.READ_MODEL_TABLES, service_role)
        assert await pool.fetchval("SELECT has_table_privilege($1, 'ledger_entries', 'SELECT')", reporting)
        assert not await pool.fetchval("SELECT has_table_privilege($1, 'ledger_holds', 'SELECT')", reporting)
        await ledger.parts.writer.submit(c.FreezeAccount((await pool.fetchval(
            "SELECT account_id FROM ledger_accounts WHERE owner_id = 'alice'")), "customer_request"))
        await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)  # the service writes the new tables
        assert await failed_checks(ledger) == {}
    finally:  # roles are the server's, shared by every test's database
        await pool.execute(f'REASSIGN OWNED BY "{operator}" TO "{service_role}"')
        await pool.execute(f'DROP OWNED BY "{reporting}"')
        await pool.execute(f'DROP ROLE "{reporting}", "{operator}"')
