"""Rules of the ledger service at its margins: the hold expiry sweep frees a customer's money
from the very moment a capture is refused, and outlives an error it did not expect; and an
auditor's tool, which only reads the event store, leaves a database that is no ledger's as
it found it."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import pytest

from kabinet_chassis.databases import ensure_database
from kabinet_chassis.eventstore import POSTGRES_STATEMENT_TIMEOUT, event_store_env, events_table
from ledger import service as ledger_service
from ledger.application import LedgerApplication
from ledger.domain import commands as c
from ledger.domain.errors import HoldNotActive
from services.ledger.tests.integration.ledger_support import funded_card, run_cli, saved_balance

pytestmark = pytest.mark.integration


class SteppedClock:
    """A clock that stands still until the test moves it."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def no_background_sweep(monkeypatch):
    monkeypatch.setattr(ledger_service, "EXPIRY_SWEEP_INTERVAL_S", 3600)  # no sweep but the test's own


async def test_a_hold_is_released_at_its_very_deadline_the_moment_a_capture_is_refused(stack, unique_name, no_background_sweep):
    clock = SteppedClock()
    service, parts = ledger_service.build(stack.service_settings(f"ledger_{unique_name}"), clock=clock)
    async with service.running():
        settlement, card = await funded_card(parts.writer, 1_000)
        deadline = clock.now + timedelta(seconds=10)
        await parts.writer.submit(c.PlaceHold("auth-1", card, settlement, 400, "RUB", deadline, "card_purchase"))
        await parts.projection.wait_for(parts.writer.last_position)
        clock.now = deadline  # the ledger's time is the deadline itself
        with pytest.raises(HoldNotActive, match="expired"):  # the shop may no longer take the money...
            await parts.writer.submit(c.CaptureHold("auth-1", "clearing-1", 400))
        await ledger_service.sweep_due_holds(parts)
        assert await saved_balance(parts.pool, card) == (1_000, 0)  # ...so the sweep gives it back now


async def test_a_sweep_that_fails_unexpectedly_is_logged_and_tried_again_and_the_ledger_stays_live(stack, unique_name, monkeypatch, caplog):
    monkeypatch.setattr(ledger_service, "EXPIRY_SWEEP_INTERVAL_S", 0.05)
    expire_due_holds = ledger_service.expire_due_holds
    failures = []

    async def fails_once(parts):
        if not failures:
            failures.append("failed")
            raise RuntimeError("a bug met one hold")
        return await expire_due_holds(parts)

    service, parts = ledger_service.build(stack.service_settings(f"ledger_{unique_name}"))
    with caplog.at_level(logging.ERROR, logger=ledger_service.log.name):
        async with service.running():
            settlement, card = await funded_card(parts.writer, 1_000)
            await parts.writer.submit(
                c.PlaceHold("auth-1", card, settlement, 400, "RUB", parts.writer.ledger_time() + timedelta(seconds=1), "card_purchase")
            )
            monkeypatch.setattr(ledger_service, "expire_due_holds", fails_once)
            for _ in range(200):  # bounded: the sweep after the failed one expires the hold
                if await saved_balance(parts.pool, card) == (1_000, 0):
                    break
                await asyncio.sleep(0.05)
            balance = await saved_balance(parts.pool, card)
            dead = service.dead_loops()
    assert failures, "the sweep never ran"
    assert balance == (1_000, 0)
    assert dead == []
    assert any("hold expiry sweep failed" in record.getMessage() and record.exc_info for record in caplog.records)


async def test_verify_run_on_a_database_that_is_no_ledger_fails_and_creates_nothing_there(stack, unique_name, monkeypatch):
    # An auditor's role may only read; and a verify that made empty event tables would then
    # find a "ledger" there, and pass it.
    settings = stack.service_settings(f"not_a_ledger_{unique_name}")
    await ensure_database(settings.database_url, settings.service_name)
    result = await run_cli(None, monkeypatch, "verify", settings=settings)
    connection = await asyncpg.connect(settings.service_database_url)
    try:
        tables = await connection.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
    finally:
        await connection.close()
    assert result.exit_code != 0, result.output
    assert [tuple(table) for table in tables] == []


async def test_an_event_store_read_stuck_behind_a_lock_gives_up_leaving_no_waiter_and_keeping_its_connection(ledger):
    # The server cancels the statement (statement_timeout), which takes it out of the lock's
    # queue: a client that only stopped waiting would leave its backend queued there, behind
    # a migration, say, with every later statement queued behind it; and a connection the
    # server answered is still good.
    await funded_card(ledger.parts.writer, 1_000)
    marked = f"kabinet-probe-{uuid.uuid4().hex[:8]}"
    settings = ledger.settings.model_copy(update={"database_url": f"{ledger.settings.database_url}?application_name={marked}"})
    env = {**event_store_env(settings, creates_tables=False), POSTGRES_STATEMENT_TIMEOUT: "0.5"}
    reader = LedgerApplication(env=env)
    admin = await asyncpg.connect(ledger.settings.service_database_url)
    try:
        assert reader.recorder.select_notifications(start=0, limit=10)
        opened = await backends(admin, marked)
        async with admin.transaction():
            await admin.execute(f"LOCK TABLE {events_table(reader.recorder)} IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(Exception, match="statement timeout"):
                await anyio.to_thread.run_sync(lambda: reader.recorder.select_notifications(start=0, limit=10))
            left = await backends(admin, marked)
        assert reader.recorder.select_notifications(start=0, limit=10), "it reads again once the lock is gone"
    finally:
        await admin.close()
        reader.close()
    assert [wait for wait in left if wait == "Lock"] == [], "a backend still waits in the lock's queue"
    assert len(left) == len(opened), "the connection the server answered was closed"


async def backends(admin: asyncpg.Connection, application_name: str) -> list[str | None]:
    """What each backend of that application waits for (None: for nothing)."""
    rows = await admin.fetch("SELECT wait_event_type FROM pg_stat_activity WHERE application_name = $1", application_name)
    return [row["wait_event_type"] for row in rows]
