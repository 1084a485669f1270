"""Rules of a service's readiness and of the event history's guard, at their margins.

Readiness: a gating check may take as long as a service's own readiness answer and still
count; a caller that goes away does not spoil the run the others wait for; operators read
a check going down each time it does, and coming back; a failed check's detail is bounded;
the checks give back the connections they open.

The event store: an event becomes visible to a reader (the relay, a projection) only after
every event numbered before it, or the reader moves past one still to come and never
publishes it.

The history's guard: a refused change tells the one at the psql prompt how a correction is
made; guarding a table from several processes at once (a ledger and its standby starting
together) leaves it guarded, every start succeeding."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

import asyncpg
import pytest
from aiokafka import admin as kafka_admin

from kabinet_chassis import append_only, health
from kabinet_chassis.databases import ensure_database
from kabinet_chassis.eventstore import event_store_env, events_table, quoted
from tests.integration.test_service_runtime_and_store_at_the_margins import Dependency, health_client
from tests.support.notes import Note, Notes

pytestmark = pytest.mark.integration


async def test_a_gating_check_as_slow_as_a_services_own_readiness_answer_still_counts_as_up():
    # The gateway's check of a service is the service's readiness, itself up to CHECK_TIMEOUT_S:
    # cut at that, a service answering a little slowly would take the gateway out of service.
    async def slow_backend() -> str:
        await asyncio.sleep(health.CHECK_TIMEOUT_S * 1.05)
        return "ready"

    async with health_client({"ledger": slow_backend}) as client:
        answer = await client.get("/health/ready")
    assert answer.status_code == 200 and answer.json()["checks"]["ledger"]["status"] == "up", answer.text


async def test_a_caller_that_goes_away_leaves_the_shared_run_to_answer_the_others():
    asked = 0
    started, released = asyncio.Event(), asyncio.Event()

    async def database() -> str:
        nonlocal asked
        asked += 1
        started.set()
        await released.wait()
        return "answering"

    async with health_client({"database": database}) as client:
        leaving = asyncio.create_task(client.get("/health/ready"))
        staying = asyncio.create_task(client.get("/health/ready"))
        await asyncio.wait_for(started.wait(), 5)
        for _ in range(20):  # bounded: lets the second caller reach the run it shares
            await asyncio.sleep(0)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        released.set()
        answer = await asyncio.wait_for(staying, 5)
    assert answer.status_code == 200, answer.text
    assert asked == 1, "the run the second caller waited for was cancelled with the first caller"


async def test_a_run_of_the_checks_that_ends_abnormally_does_not_leave_readiness_stuck_on_it():
    # A check may end by a BaseException no check result catches (a CancelledError from a
    # dependency's client torn down under it): that one answer fails, and the next runs afresh.
    calls = 0

    async def torn_down_once() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncio.CancelledError
        return "answering"

    async with health_client({"database": torn_down_once}) as client:
        first = asyncio.create_task(client.get("/health/ready"))
        await asyncio.gather(first, return_exceptions=True)
        answer = await asyncio.wait_for(client.get("/health/ready"), 5)
    assert answer.status_code == 200 and calls == 2, answer.text


async def test_a_check_that_comes_back_is_logged_as_up_again_and_its_next_outage_is_logged_again(monkeypatch, caplog):
    monkeypatch.setattr(health, "READY_REUSED_FOR_S", 0.0)  # every call runs the checks again
    caplog.set_level(logging.INFO, logger=health.__name__)
    database = Dependency()
    async with health_client({"database": database.check}) as client:
        for up in (False, False, True, True, False):
            database.up = up
            await client.get("/health/ready")
    assert [record.getMessage() for record in caplog.records if record.name == health.__name__] == [
        "readiness check database is down: ConnectionError: refused",
        "readiness check database is up again",
        "readiness check database is down: ConnectionError: refused",
    ]


async def test_a_failed_checks_detail_is_cut_short_however_long_its_error():
    # An error may carry a whole answer (an HTML error page, a dump): readiness is polled
    # every few seconds, and each answer and log line must stay small.
    async def chatty() -> str:
        raise ValueError("x" * 100_000)

    async with health_client({"database": chatty}) as client:
        answer = await client.get("/health/ready")
    detail = answer.json()["checks"]["database"]["detail"]
    assert answer.status_code == 503 and detail.startswith("ValueError: xxx"), answer.text
    assert len(detail) <= 300


async def test_the_database_check_closes_the_connection_it_opens_each_time(stack, monkeypatch):
    opened: list[asyncpg.Connection] = []
    connect = asyncpg.connect

    async def recorded_connect(*args, **kwargs):
        connection = await connect(*args, **kwargs)
        if args[:1] == (stack.database_url,):  # the check's, not those of another test's loops still winding down
            opened.append(connection)
        return connection

    monkeypatch.setattr(asyncpg, "connect", recorded_connect)
    check = health.database_check(stack.database_url)
    answers = [await check() for _ in range(3)]
    assert all(answer.startswith("PostgreSQL ") for answer in answers), answers
    assert len(opened) == 3 and all(connection.is_closed() for connection in opened), \
        "a readiness check left a PostgreSQL connection open: polled, they take the server to max_connections"


async def test_the_broker_check_closes_the_client_it_opens_each_time(stack, monkeypatch):
    opened: list[kafka_admin.AIOKafkaAdminClient] = []

    class RecordedAdmin(kafka_admin.AIOKafkaAdminClient):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.closed = False
            opened.append(self)

        async def close(self) -> None:
            await super().close()
            self.closed = True

    monkeypatch.setattr(kafka_admin, "AIOKafkaAdminClient", RecordedAdmin)
    check = health.broker_check(stack.bootstrap_servers)
    answers = [await check() for _ in range(2)]
    assert all(answer.startswith(stack.bootstrap_servers) for answer in answers), answers
    assert len(opened) == 2 and all(admin.closed for admin in opened), "a readiness check left a broker client open"


async def test_an_event_saved_while_an_earlier_numbered_one_is_uncommitted_waits_to_become_visible_after_it(
        stack, unique_name):
    # Two saves at once (worker threads of one service, or a second writer that still thinks
    # it leads): were the later-numbered one visible first, a relay reading the log would move
    # past the earlier one and never publish it.
    settings = stack.service_settings(unique_name)
    await ensure_database(settings.database_url, settings.service_name)
    app = Notes(env=event_store_env(settings))
    first_numbered, release = threading.Event(), threading.Event()
    first_ids: list[int] = []
    fetch_ids = app.recorder._fetch_ids_after_insert_events

    def held_after_numbering(curs, stored_events, **kwargs):
        ids = fetch_ids(curs, stored_events, **kwargs)
        if not first_ids:  # the first save only: numbered, and held uncommitted
            first_ids.extend(ids)
            first_numbered.set()
            release.wait(10)
        return ids

    app.recorder._fetch_ids_after_insert_events = held_after_numbering
    reader = await asyncpg.connect(settings.service_database_url)
    first = second = None
    try:
        first = asyncio.create_task(asyncio.to_thread(app.save, Note(text="first")))
        assert await asyncio.to_thread(first_numbered.wait, 10)
        second = asyncio.create_task(asyncio.to_thread(app.save, Note(text="second")))
        async with asyncio.timeout(5):  # bounded: the second save queues behind the first, or gets through
            while not second.done() and not await reader.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"):
                await asyncio.sleep(0.02)
        visible = await reader.fetch(f"SELECT notification_id FROM {events_table(app.recorder)}")
    finally:
        release.set()
        await asyncio.gather(*(task for task in (first, second) if task is not None), return_exceptions=True)
        await reader.close()
        app.close()
    assert [row[0] for row in visible] == [], f"visible while event {first_ids} was uncommitted"
    assert first.exception() is None and second.exception() is None


@contextlib.asynccontextmanager
async def scratch_table(stack, unique_name):
    """An events table of its own, in a schema dropped afterwards with the guard's function
    (made there, first on the search path): DROP is no change of rows."""
    pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=4,
                                     server_settings={"search_path": unique_name})
    table = f"{quoted(unique_name)}.{quoted('events')}"
    try:
        await pool.execute(f"CREATE SCHEMA {quoted(unique_name)};"
                           f" CREATE TABLE {table} (position bigint PRIMARY KEY, state bytea NOT NULL)")
        yield pool, table
    finally:
        await pool.execute(f"DROP SCHEMA IF EXISTS {quoted(unique_name)} CASCADE")
        await pool.close()


async def test_a_refused_change_of_history_tells_staff_that_a_correction_is_a_new_event(stack, unique_name):
    async with scratch_table(stack, unique_name) as (pool, table):
        await append_only.guard(pool, table)
        await pool.execute(f"INSERT INTO {table} VALUES (1, 'posted')")
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
            await pool.execute(f"UPDATE {table} SET state = 'forged'")
        assert refused.value.hint == "a correction is a new event (a reversing transfer), never a changed one"
        assert await pool.fetchval(f"SELECT state FROM {table}") == b"posted"


async def test_a_process_guarding_a_table_while_another_one_does_still_starts_and_leaves_it_guarded(
        stack, unique_name):
    # A ledger and its standby (or replicas of a service) start together, each guarding its
    # events table: none of them may fail to start for the other's doing it at the same moment.
    async with scratch_table(stack, unique_name) as (pool, table):
        # A long read of the table (an audit) holds the first guard between its statements,
        # and so the second at the same moment behind it: both are real guard() calls.
        async with pool.acquire() as auditor, auditor.transaction():
            await auditor.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            guarding = []
            for waiting in (1, 2):
                guarding.append(asyncio.create_task(append_only.guard(pool, table)))
                # Asked outside that transaction: pg_stat_activity is read once per transaction.
                async with asyncio.timeout(5):  # bounded: each queues at once
                    while await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                              " AND datname = current_database()") < waiting:
                        await asyncio.sleep(0.02)
        outcomes = await asyncio.gather(*guarding, return_exceptions=True)
        async with pool.acquire() as connection:
            missing = await append_only.missing_guards(connection, table)
    assert outcomes == [None, None]
    assert missing == []
