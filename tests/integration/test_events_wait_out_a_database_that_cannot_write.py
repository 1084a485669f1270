"""A database that cannot write for a while (its disk full, or a standby answering after a
failover) is an outage to wait out, not a reason to give up on events: a read model fed by
the chassis consumer must not dead-letter money events because of it (ARCHITECTURE.md §4,
"only poison may go there"). A dead-lettered event is tracked, so it is gone for that
consumer: the read model would stay short of those events for good."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from kabinet_chassis.consumers import CONSUMER_FAILED_ROUNDS_MAX, ConsumerStuck
from kabinet_chassis.databases import ensure_database
from kabinet_chassis.kafka import ensure_topics
from tests.integration.test_dead_letters_and_gaps import settled
from tests.integration.test_outbox_to_consumer import (
    board,
    note_event,
    produce,
    topic_for,
    tracked_position,
)
from tests.support.notes import BOARD_SCHEMA, build_board_service

pytestmark = pytest.mark.integration

# The board refuses every write, as PostgreSQL does, while `outage` has a row; each refused
# write takes a number from `refused_writes` first (a sequence is not rolled back, so the
# test can see how often the consumer tried).
OUTAGE = """
CREATE TABLE outage (sqlstate text NOT NULL);
CREATE SEQUENCE refused_writes;
CREATE FUNCTION refuse_while_out() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    state text := (SELECT sqlstate FROM outage LIMIT 1);
BEGIN
    IF state IS NOT NULL THEN
        PERFORM nextval('refused_writes');
        RAISE EXCEPTION 'the database cannot write now (%)', state USING ERRCODE = state;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_while_out BEFORE INSERT OR UPDATE ON note_board
    FOR EACH ROW EXECUTE FUNCTION refuse_while_out();
"""
RETRIES_SEEN = 3


@pytest.mark.parametrize("sqlstate", [
    "53100",  # disk_full
    "25006",  # read_only_sql_transaction: a standby, as right after a failover
    "42P01",  # undefined_table: the read model's migration has not run yet (code deployed first)
    "42501",  # insufficient_privilege: a grant the deployment forgot
    "XX001",  # data_corrupted: a damaged page of the read model's table
])
async def test_a_read_model_waits_out_a_database_that_cannot_write_and_dead_letters_nothing(
    stack, unique_name, sqlstate
):
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    settings = stack.service_settings(f"{unique_name}_b")
    consumer_name = f"{settings.service_name}_board"
    await ensure_database(settings.database_url, settings.service_name)
    admin = await asyncpg.connect(settings.service_database_url)
    try:
        await admin.execute(BOARD_SCHEMA)
        await admin.execute(OUTAGE)
        await admin.execute("INSERT INTO outage VALUES ($1)", sqlstate)
        await produce(stack.bootstrap_servers, topic, [
            (note_event(1, {"text": "salary"}), 0),
            (note_event(2, {"text": "rent"}), 1),
            (note_event(3, {"text": "groceries"}), 2),
        ])
        board_service, parts = build_board_service(settings, topic)
        async with board_service.running():
            consumer = parts["consumer"]

            async def retried() -> bool:
                return await admin.fetchval("SELECT last_value FROM refused_writes") >= RETRIES_SEEN

            assert await settled(retried), "the consumer never tried to write"
            assert consumer.dead_letters.sent_total == 0, "events were dead-lettered while the database was out"

            await admin.execute("DELETE FROM outage")  # space freed, or the primary is back

            async def all_applied() -> bool:
                return len(await board(board_service)) == 3

            assert await settled(all_applied), f"board {await board(board_service)}"
            assert await board(board_service) == {
                "note-1": ("salary", 1), "note-2": ("rent", 1), "note-3": ("groceries", 1),
            }
            assert await tracked_position(board_service, consumer_name, topic) == 3
            assert consumer.dead_letters.sent_total == 0
    finally:
        await admin.close()


async def test_a_consumer_waiting_out_a_database_says_so_in_its_health_check_and_logs_without_flooding(
    stack, unique_name, caplog
):
    """Its loop never ends, so liveness never names it: its check (watched in /health/ready,
    like the relay's) does, with the error and for how long, once a blip is ruled out. The
    log says so at once, then about once a minute, not at every retry."""
    caplog.set_level(logging.INFO, logger="kabinet_chassis.consumers")
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    settings = stack.service_settings(f"{unique_name}_b")
    await ensure_database(settings.database_url, settings.service_name)
    admin = await asyncpg.connect(settings.service_database_url)
    try:
        await admin.execute(BOARD_SCHEMA)
        await admin.execute(OUTAGE)
        await admin.execute("INSERT INTO outage VALUES ('53100')")
        await produce(stack.bootstrap_servers, topic, [(note_event(1, {"text": "salary"}), 0)])
        board_service, parts = build_board_service(settings, topic)
        async with board_service.running():
            consumer = parts["consumer"]
            rounds = CONSUMER_FAILED_ROUNDS_MAX + 2

            async def failed_past_a_blip() -> bool:
                return await admin.fetchval("SELECT last_value FROM refused_writes") >= rounds

            assert await settled(failed_past_a_blip), "the consumer never tried to write"
            with pytest.raises(ConsumerStuck, match="DiskFullError") as stuck:
                await consumer.check()
            assert consumer.name in str(stuck.value)
            lines = [r for r in caplog.records if r.name == "kabinet_chassis.consumers" and r.levelno >= logging.WARNING]
            assert 1 <= len(lines) <= 3, [r.getMessage() for r in lines]

            await admin.execute("DELETE FROM outage")

            async def applied() -> bool:
                return len(await board(board_service)) == 1

            assert await settled(applied), f"board {await board(board_service)}"
            assert "stuck" not in await consumer.check()
    finally:
        await admin.close()


async def test_an_event_whose_values_the_driver_refuses_is_dead_lettered_not_retried_for_ever(stack, unique_name):
    """The other side of the rule: what is wrong with the event itself (a number where the read
    model stores text: asyncpg's DataError, SQLSTATE class 22) is poison. Waited out like an
    outage, it would stop the consumer on every partition for good."""
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    await produce(stack.bootstrap_servers, topic, [
        (note_event(1, {"text": "salary"}), 0),
        (note_event(2, {"text": 5}), 1),
        (note_event(3, {"text": "groceries"}), 2),
    ])
    settings = stack.service_settings(f"{unique_name}_b")
    board_service, parts = build_board_service(settings, topic)
    async with board_service.running():
        consumer = parts["consumer"]

        async def went_past_it() -> bool:
            return len(await board(board_service)) == 2

        assert await settled(went_past_it), f"board {await board(board_service)}, health {consumer.health}"
        assert await board(board_service) == {"note-1": ("salary", 1), "note-3": ("groceries", 1)}
        assert consumer.dead_letters.sent_total == 1
