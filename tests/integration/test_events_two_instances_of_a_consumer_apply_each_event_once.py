"""Two instances of one consumer may handle the same records at once: during a rebalance the
instance that lost a partition is still applying its batch while the new owner reads the
same records from the committed offset. Tracking must serialise them, also on a partition
the consumer has tracked nothing for yet, which is exactly when a new read model deployed
with two replicas catches up on the history (the second replica's arrival rebalances)."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest
from faststream.kafka import KafkaBroker

from kabinet_chassis.consumers import TRACKING_SCHEMA, DeadLetters, ReadModelConsumer
from kabinet_chassis.databases import ensure_database
from kabinet_chassis.kafka import ensure_topics
from tests.integration.test_outbox_to_consumer import _read_all, note_event, produce, topic_for
from tests.support.notes import BOARD_SCHEMA, apply_to_board

pytestmark = pytest.mark.integration

# How long the first instance in `apply` waits for the other to arrive there too: where
# tracking serialises them, the other is held before `apply` and never arrives.
MEET_S = 1.0


async def test_two_instances_handling_the_same_new_partition_at_once_apply_each_event_once(stack, unique_name):
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    await produce(stack.bootstrap_servers, topic, [
        (note_event(1, {"text": "salary"}), 0),
        (note_event(2, {"text": "rent"}), 1),
    ])
    records = await _read_all(stack.bootstrap_servers, topic, expected=2)
    settings = stack.service_settings(f"{unique_name}_b")
    await ensure_database(settings.database_url, settings.service_name)
    pool = await asyncpg.create_pool(settings.service_database_url, min_size=2, max_size=2)
    try:
        await pool.execute(BOARD_SCHEMA)
        await pool.execute(TRACKING_SCHEMA)
        in_apply: list[int] = []
        both_in_apply = asyncio.Event()

        async def apply_after_meeting(connection, events) -> None:
            in_apply.append(1)
            if len(in_apply) == 2:
                both_in_apply.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(MEET_S):
                    await both_in_apply.wait()
            await apply_to_board(connection, events)

        # The dead-letter producer is never used: nothing here is poison.
        dead_letters = DeadLetters(KafkaBroker(stack.bootstrap_servers))
        name = f"{settings.service_name}_board"
        leaving = ReadModelConsumer(name, pool, apply_after_meeting, dead_letters)
        arriving = ReadModelConsumer(name, pool, apply_after_meeting, dead_letters)
        await asyncio.gather(leaving.handle(records), arriving.handle(records))

        rows = await pool.fetch("SELECT note_id, text, applied_count FROM note_board ORDER BY note_id")
        assert {row["note_id"]: (row["text"], row["applied_count"]) for row in rows} == {
            "note-1": ("salary", 1), "note-2": ("rent", 1),
        }
        assert leaving.applied_total + arriving.applied_total == 2
        assert leaving.skipped_total + arriving.skipped_total == 2
    finally:
        await pool.close()
