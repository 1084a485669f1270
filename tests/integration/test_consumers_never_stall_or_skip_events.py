"""Rules of the foundation for consumers: a partition whose missing events come later
than the record that showed the gap still gets all of them, each once, and is never
stopped by that record."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from kabinet_chassis.consumers import TRACKING_SCHEMA
from kabinet_chassis.databases import ensure_database
from kabinet_chassis.kafka import ensure_topics
from kabinet_contracts.envelope import PREVIOUS_POSITION_HEADER, IntegrationEvent
from tests.integration.test_outbox_to_consumer import board, eventually, topic_for
from tests.support.notes import build_board_service

pytestmark = pytest.mark.integration


def note_event(position: int, payload: dict, *, aggregate_id: str | None = None) -> IntegrationEvent:
    return IntegrationEvent(
        event_id=uuid.uuid4(), type="notes.note_written", schema_version=1, source="elsewhere", position=position,
        aggregate_id=aggregate_id or f"note-{position}", aggregate_version=1, occurred_at=datetime.now(UTC),
        payload=payload,
    )


async def produce(bootstrap: str, topic: str, records: list[tuple[IntegrationEvent, int]]) -> None:
    """(event, previous position) pairs, in this order, onto partition 0."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for event, previous in records:
            await producer.send_and_wait(topic, event.json_bytes(), key=event.aggregate_id.encode(), partition=0,
                                         headers=[(PREVIOUS_POSITION_HEADER, str(previous).encode())])
    finally:
        await producer.stop()


@pytest.mark.faults
async def test_a_gap_whose_missing_events_are_republished_after_it_does_not_stop_the_partition(stack, unique_name):
    """After a broker restart the relay's first new event (position 5, after 4) can land at
    offset 0, before the relay notices the loss and republishes everything from position 1.
    A consumer that had applied only up to 2 meets the gap at offset 0: reading the partition
    again from the start meets it again there, so the missing events must be looked for
    after it, where the republish puts them."""
    topic = topic_for(unique_name)
    settings = stack.service_settings(f"{unique_name}_b")
    consumer_name = f"{settings.service_name}_board"
    await ensure_topics(stack.bootstrap_servers, [topic])
    await ensure_database(settings.database_url, settings.service_name)
    connection = await asyncpg.connect(settings.service_database_url)
    try:
        await connection.execute(TRACKING_SCHEMA)
        await connection.execute("INSERT INTO consumer_tracking VALUES ($1, 'elsewhere', $2, 0, 2)", consumer_name, topic)
    finally:
        await connection.close()
    texts = {position: f"text {position}" for position in range(1, 6)}
    await produce(stack.bootstrap_servers, topic, [
        (note_event(5, {"text": texts[5]}), 4),  # the new event, published before the relay noticed
        *((note_event(position, {"text": texts[position]}), position - 1) for position in range(1, 6)),  # the republish
    ])

    board_service, _ = build_board_service(settings, topic)
    async with board_service.running():
        async def three_applied():
            return len(await board(board_service)) >= 3

        await eventually(three_applied, timeout_s=30, what="positions 3, 4 and 5 on the board")
        assert await board(board_service) == {f"note-{p}": (texts[p], 1) for p in (3, 4, 5)}
        tracked = await board_service.pool.fetchval(
            "SELECT position FROM consumer_tracking WHERE consumer = $1 AND topic = $2 AND partition = 0", consumer_name, topic
        )
        assert tracked == 5
