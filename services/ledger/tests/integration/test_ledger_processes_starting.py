"""Rules of a ledger process's start, beside the ledger's other processes and its readers:
replicas deployed together all start; a process waits for another's upgrade of the schema;
a restart waits for no reader, however long it reads; an upgrade waits for long readers to
finish without holding up payments behind it for more than seconds."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import asyncpg
import pytest

from kabinet_chassis.databases import DATABASE_COMMAND_TIMEOUT_S, ensure_database
from ledger.service import build
from services.ledger.tests.integration.ledger_support import funded_card, open_account, saved_balance, transfer_body

pytestmark = pytest.mark.integration

START_WAIT_MAX_S = 30


async def test_processes_of_the_ledger_deployed_together_on_a_fresh_database_all_start(stack, unique_name):
    # Replicas deployed at once: each makes the event store, the read models and their guards.
    settings = stack.service_settings(f"ledger_{unique_name}")
    replicas = [build(settings) for _ in range(3)]
    async with contextlib.AsyncExitStack() as running:
        started = await asyncio.gather(*(running.enter_async_context(service.running()) for service, _ in replicas),
                                       return_exceptions=True)
        assert [outcome for outcome in started if isinstance(outcome, BaseException)] == []
        writers = [parts.writer for _, parts in replicas]
        async with asyncio.timeout(10):
            while not any(writer.is_active for writer in writers):  # bounded by the timeout
                await asyncio.sleep(0.05)
        active = next(writer for writer in writers if writer.is_active)
        settlement, card = await funded_card(active, 1_000)
        assert await saved_balance(replicas[0][1].pool, card) == (1_000, 0)


async def test_a_ledger_starting_while_another_upgrades_the_store_waits_for_it_past_the_query_limit(stack, unique_name):
    # As in a rolling deploy: the other process holds the service's start lock through its upgrade.
    settings = stack.service_settings(f"ledger_{unique_name}")
    await ensure_database(stack.database_url, settings.service_name)
    service, parts = build(settings)
    upgrading = await asyncpg.connect(settings.service_database_url)
    try:
        await upgrading.execute("SELECT pg_advisory_lock(hashtext('kabinet_service_start'))")
        upgraded = False

        async def finish_upgrade_later():
            nonlocal upgraded
            await asyncio.sleep(DATABASE_COMMAND_TIMEOUT_S + 2)
            upgraded = True
            await upgrading.execute("SELECT pg_advisory_unlock(hashtext('kabinet_service_start'))")

        other = asyncio.create_task(finish_upgrade_later())
        async with service.running():  # this process starts once the other is done
            assert upgraded and parts.app is not None
        await other
    finally:
        await upgrading.close()


@pytest.mark.parametrize("version", ["same", "new"])
async def test_a_ledger_process_starting_while_an_auditor_reads_at_length_holds_up_no_payment(ledger, version, caplog):
    # `kabinet ledger verify` reads the whole ledger in one snapshot, for minutes on a big one.
    # A schema statement that waited for such a read to end (ALTER TABLE does, even with nothing
    # to add) would hold up, behind it, every payment writing to its table. The same version
    # changes nothing, so waits for nothing; a new one waits for the read to end, for a table's
    # lock at most SCHEMA_LOCK_WAIT_S at a time, so that payments are held up for seconds at most.
    settlement, card = await open_account(ledger, "settlement"), await open_account(ledger)
    if version == "new":
        await ledger.parts.pool.execute("DELETE FROM schema_scripts_applied")  # as on a database an older version made
    restarted, _ = build(ledger.settings)
    started, stop = asyncio.Event(), asyncio.Event()

    async def restart() -> None:
        async with restarted.running():
            started.set()
            await stop.wait()

    auditor = await asyncpg.connect(ledger.settings.service_database_url)
    reading = auditor.transaction(isolation="repeatable_read", readonly=True)
    starting = None
    try:
        await reading.start()
        tables = await auditor.fetch("SELECT quote_ident(tablename) AS name FROM pg_tables"
                                     " WHERE schemaname = current_schema()")
        for table in tables:  # each read, so locked against schema changes until the snapshot ends
            await auditor.fetchval(f"SELECT count(*) FROM {table['name']}")
        starting = asyncio.create_task(restart())
        for _ in range(200):  # bounded: until it has started, or waits for a lock
            if started.is_set() or await ledger.parts.pool.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted"
                    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"):
                break
            await asyncio.sleep(0.05)
        try:
            async with asyncio.timeout(DATABASE_COMMAND_TIMEOUT_S):  # meanwhile, the bank takes payments
                paid = await ledger.post("/transfers", json=transfer_body(
                    f"top-up-{uuid.uuid4()}", (settlement, -500), (card, 500), code="top_up"))
                assert paid.status_code == 201, paid.text
                await open_account(ledger)  # under an Idempotency-Key
        except TimeoutError:
            pytest.fail("payments waited behind the process starting")
        if version == "new":
            assert not started.is_set(), "the new schema was made without waiting for the auditor's read"
            assert "waits for long reads of its tables" in caplog.text
            await reading.rollback()  # the audit ends
        try:
            async with asyncio.timeout(START_WAIT_MAX_S):
                await started.wait()
        except TimeoutError:
            pytest.fail(f"the process did not start within {START_WAIT_MAX_S} s: it waits for the auditor's read")
    finally:
        await auditor.close()  # the read ends, if the test failed while it lasted
        stop.set()
        if starting is not None:
            if not started.is_set():
                starting.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await starting
