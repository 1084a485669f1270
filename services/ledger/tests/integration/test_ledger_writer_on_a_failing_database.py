"""Rules of the ledger's batched writer when its database misbehaves: a database that hangs
or a lock that is never released fails the batch with a transient error in bounded time,
never holds the writer for ever, and once the database answers again the writer posts."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from contextlib import asynccontextmanager

import asyncpg
import psutil
import pytest

from kabinet_chassis.databases import DATABASE_DOWN_ERRORS, create_pool, ensure_database
from kabinet_chassis.devstack.ports import free_port
from kabinet_chassis.devstack.postgres import EmbeddedPostgres
from kabinet_chassis.eventstore import event_store_env
from kabinet_chassis.settings import ServiceSettings
from ledger import writer as writer_module
from ledger.application import LedgerApplication, ensure_store_schema
from ledger.clock import system_clock
from ledger.domain import commands as c
from ledger.writer import BatchedWriter
from services.ledger.tests.integration.ledger_support import funded_card, saved_balance, uncached_writer

pytestmark = pytest.mark.integration

# Short limits, so a test shows in seconds what a service does in tens of them.
STATEMENT_TIMEOUT_S = 1
ANSWER_WAIT_MAX_S = 6  # far above the statement limit: a writer answering by then did not just give up waiting


@asynccontextmanager
async def writer_with_statement_limit(settings: ServiceSettings):
    """A running writer on `settings`' database whose event store gives up on a statement
    after STATEMENT_TIMEOUT_S, with nothing cached (so it must look accounts up)."""
    env = {**event_store_env(settings), "POSTGRES_STATEMENT_TIMEOUT": str(STATEMENT_TIMEOUT_S)}
    app = LedgerApplication(env=env)
    pool = await create_pool(settings.service_database_url, max_size=2)
    writer = BatchedWriter(app, pool, system_clock)
    await writer.start()
    # Every connection of its event store open (as in a service that has run a while): a
    # database stopped while one is still being made fails on the pool's wait instead.
    await asyncio.to_thread(app.recorder.datastore.pool.wait, 30)
    task = asyncio.create_task(writer.run())
    try:
        yield writer
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pool.close()
        app.close()


def spend(card, settlement, amount_minor: int, transfer_id: str) -> c.PostTransfer:
    return c.PostTransfer(transfer_id, (c.Leg(card, -amount_minor, "RUB"), c.Leg(settlement, amount_minor, "RUB")),
                          "card_purchase")


async def outcome_within(awaitable, limit_s: float):
    """What the awaitable raised or returned, and how long it took."""
    started = time.monotonic()
    try:
        result = await asyncio.wait_for(awaitable, limit_s)
    except Exception as error:  # noqa: BLE001 - the outcome is what the test looks at
        result = error
    return result, time.monotonic() - started


async def test_a_look_up_behind_a_lock_never_released_fails_the_batch_as_transient_and_the_retry_posts(
        ledger, monkeypatch):
    # A migration, VACUUM FULL or a stuck session holding the balances table: the writer's
    # look-up waits on the lock. It must give up, answer 503-worthy, and post once it is free.
    monkeypatch.setattr(writer_module, "ANSWER_WAIT_MAX_S", ANSWER_WAIT_MAX_S)
    async with uncached_writer(ledger.settings) as other:  # accounts this writer has not cached
        settlement, card = await funded_card(other, 1_000)
    async with writer_with_statement_limit(ledger.settings) as writer:
        holder = await asyncpg.connect(ledger.settings.service_database_url)
        try:
            locked = holder.transaction()
            await locked.start()
            await holder.execute("LOCK TABLE ledger_balances IN ACCESS EXCLUSIVE MODE")
            outcome, waited_s = await outcome_within(writer.submit(spend(card, settlement, 100, "behind-lock")),
                                                     ANSWER_WAIT_MAX_S + 5)
            await locked.rollback()
        finally:
            await holder.close()
        assert isinstance(outcome, DATABASE_DOWN_ERRORS), repr(outcome)  # a 503, with Retry-After
        assert waited_s < ANSWER_WAIT_MAX_S
        posted = await writer.submit(spend(card, settlement, 100, "behind-lock"))
    assert not posted.replayed and await saved_balance(ledger.parts.pool, card) == (900, 0)


def server_processes(postgres: EmbeddedPostgres) -> list[psutil.Process]:
    postmaster = psutil.Process(int((postgres.data_dir / "postmaster.pid").read_text().split()[0]))
    return [postmaster, *postmaster.children(recursive=True)]


async def test_a_writer_whose_database_hangs_fails_the_batch_in_bounded_time_and_posts_once_it_answers(
        tmp_path, unique_name, monkeypatch):
    # A stopped server (a frozen VM, a storage hang) answers nothing and refuses nothing:
    # only the writer's own clock can end the wait.
    monkeypatch.setattr(writer_module, "ANSWER_WAIT_MAX_S", ANSWER_WAIT_MAX_S)
    postgres = EmbeddedPostgres(tmp_path / "pg", free_port())  # a server of our own, to stop and resume
    postgres.start()
    try:
        settings = ServiceSettings(service_name=f"ledger_{unique_name}", database_url=postgres.url,
                                   kafka_bootstrap_servers="127.0.0.1:9")
        await ensure_database(postgres.url, settings.service_name)
        app = LedgerApplication(env=event_store_env(settings))
        pool = await create_pool(settings.service_database_url, max_size=2)
        try:
            await ensure_store_schema(pool, app)
        finally:
            await pool.close()
            app.close()
        async with uncached_writer(settings) as other:
            settlement, card = await funded_card(other, 1_000)
        async with writer_with_statement_limit(settings) as writer:
            await writer.submit(c.OpenAccount(uuid.uuid4(), "warm", "card", "RUB"))  # connections already open
            stopped = server_processes(postgres)
            for process in stopped:
                process.send_signal(signal.SIGSTOP)
            try:
                outcome, waited_s = await outcome_within(writer.submit(spend(card, settlement, 100, "while-hung")),
                                                         ANSWER_WAIT_MAX_S + 5)
            finally:
                for process in stopped:
                    process.send_signal(signal.SIGCONT)
            assert isinstance(outcome, DATABASE_DOWN_ERRORS), repr(outcome)
            assert waited_s < ANSWER_WAIT_MAX_S
            for _ in range(50):  # the client retries, as Retry-After tells it to; bounded
                try:
                    posted = await writer.submit(spend(card, settlement, 100, "while-hung"))
                    break
                except DATABASE_DOWN_ERRORS:
                    await asyncio.sleep(0.2)
            assert posted.transfer_id == "while-hung"
            assert await saved_balance(writer.pool, card) == (900, 0)
    finally:
        postgres.stop(mode="immediate")


async def test_a_batch_that_keeps_losing_the_race_to_another_writer_is_refused_as_retryable_and_saves_nothing(
        ledger, monkeypatch):
    # For the seconds before a lost lead is noticed two writers may post to the same account:
    # each of this writer's saves finds the balance moved on and validates again, up to its
    # limit. Then nothing is saved, and the caller must be told to retry (503), not get a 500.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    commit = writer_module.append_batch
    async with uncached_writer(ledger.settings) as other:
        racing = asyncio.Lock()

        async def other_writer_gets_there_first(*args, **kwargs):
            if not racing.locked():  # not the other writer's own commit
                async with racing:
                    await other.submit(spend(card, settlement, 1, f"other-{uuid.uuid4()}"))
            return await commit(*args, **kwargs)

        monkeypatch.setattr(writer_module, "append_batch", other_writer_gets_there_first)
        outcome, _ = await outcome_within(writer.submit(spend(card, settlement, 100, "lost-race")), ANSWER_WAIT_MAX_S)
        monkeypatch.setattr(writer_module, "append_batch", commit)
    assert isinstance(outcome, writer_module.LedgerUnavailable), repr(outcome)
    attempts = writer_module.SAVE_ATTEMPTS_MAX
    assert await saved_balance(ledger.parts.pool, card) == (1_000 - attempts, 0)  # the other writer's only
    posted = await writer.submit(spend(card, settlement, 100, "lost-race"))  # the retry goes through
    assert not posted.replayed and await saved_balance(ledger.parts.pool, card) == (900 - attempts, 0)


async def test_a_leader_that_cannot_confirm_its_lock_within_the_limit_stops_writing_and_leads_again_after(
        ledger, monkeypatch):
    # The lock lives with one connection. If that connection stops answering (its server
    # process frozen, its network path dead) the lock may be gone, and another process
    # leading: a writer that cannot tell must stop writing, not wait on the check for ever.
    monkeypatch.setattr(writer_module, "LEADERSHIP_CHECK_S", 0.2)
    monkeypatch.setattr(writer_module, "LEADERSHIP_CHECK_TIMEOUT_S", 1)
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await asyncio.sleep(writer_module.LEADERSHIP_CHECK_S * 2)  # one check with the short interval behind it
    lock_holder = psutil.Process(await ledger.parts.pool.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid::int = hashtext('ledger_writer')"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"))
    lock_holder.send_signal(signal.SIGSTOP)
    try:
        for _ in range(50):  # bounded: 5 s, far above the check's interval and limit
            if not writer.is_active:
                break
            await asyncio.sleep(0.1)
        stepped_down = not writer.is_active
    finally:
        lock_holder.send_signal(signal.SIGCONT)
    assert stepped_down, "the writer kept writing with a lock it could not confirm"
    posted = await writer.submit(spend(card, settlement, 100, "after-lead-back"))  # the lock is freed: it leads again
    assert posted.transfer_id == "after-lead-back" and await saved_balance(ledger.parts.pool, card) == (900, 0)


async def test_commands_waiting_when_the_writer_stops_are_told_at_once_to_retry(ledger, monkeypatch):
    # A stopping service cancels its writer: the commands it took or still had queued get
    # an answer then (503, retry with the same id), not silence until their answer wait ends.
    monkeypatch.setattr(writer_module, "ANSWER_WAIT_MAX_S", ANSWER_WAIT_MAX_S)
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    async with uncached_writer(ledger.settings, running=False) as stopping:
        waiting = [asyncio.create_task(stopping.submit(spend(card, settlement, 1, f"at-stop-{i}"))) for i in range(3)]
        await asyncio.sleep(0.05)  # all three queued
        run = asyncio.create_task(stopping.run())
        await asyncio.sleep(0)  # it takes them as a batch
        run.cancel()
        outcomes = [await outcome_within(command, 1) for command in waiting]
        await asyncio.gather(run, return_exceptions=True)
    assert all(isinstance(outcome, writer_module.LedgerUnavailable) for outcome, _ in outcomes), outcomes
