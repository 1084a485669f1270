"""A consumer never passes over a batch it did not finish. When the poison event of a batch
cannot be put on the dead-letter topic yet (its producer not connected, the topic not
writable), the batch is read again after a pause, not dropped: the events after the poison
still reach the read model, and the poison reaches the dead-letter topic once it can."""

from __future__ import annotations

import logging

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faststream.kafka import KafkaBroker

from kabinet_chassis.consumers import DeadLetters, rewind
from kabinet_chassis.kafka import ensure_topics
from kabinet_contracts.registry import dead_letter_topic
from tests.integration.test_dead_letters_and_gaps import chain_with_poison_at_position_2, settled
from tests.integration.test_outbox_to_consumer import _read_all, board, produce, topic_for, tracked_position
from tests.support.notes import build_board_service

pytestmark = pytest.mark.integration

DEAD_LETTER_PRODUCER_DOWN = "connect broker first"  # what FastStream says when its producer is not connected


def failed_to_dead_letter(caplog) -> bool:
    return any(
        DEAD_LETTER_PRODUCER_DOWN in record.getMessage()
        or (record.exc_info is not None and DEAD_LETTER_PRODUCER_DOWN in str(record.exc_info[1]))
        for record in caplog.records
    )


async def test_a_batch_whose_poison_cannot_be_dead_lettered_yet_is_read_again_not_dropped(stack, unique_name, caplog):
    caplog.set_level(logging.WARNING)
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    settings = stack.service_settings(f"{unique_name}_b")
    consumer_name = f"{settings.service_name}_board"
    # Positions 1, 3 and 4 are good notes, position 2 is poison (no text).
    await produce(stack.bootstrap_servers, topic, chain_with_poison_at_position_2())
    board_service, parts = build_board_service(settings, topic)
    # The consumer's dead-letter producer is not connected yet.
    dead_letter_broker = KafkaBroker(stack.bootstrap_servers)
    board_service.dead_letters = DeadLetters(dead_letter_broker)
    try:
        async with board_service.running():
            consumer = parts["consumer"]

            async def tried_to_dead_letter() -> bool:
                return failed_to_dead_letter(caplog)

            assert await settled(tried_to_dead_letter), "the poison was never offered to the dead-letter topic"
            await dead_letter_broker.start()  # the dead-letter topic can be written again

            async def the_rest_applied() -> bool:
                return len(await board(board_service)) >= 3

            assert await settled(the_rest_applied), (
                f"board {await board(board_service)}: the events after the poison were dropped with its batch"
            )
            assert await board(board_service) == {"note-1": ("one", 1), "note-3": ("three", 1), "note-4": ("four", 1)}
            assert await tracked_position(board_service, consumer_name, topic) == 4
            assert consumer.dead_letters.sent_total == 1
        dead = await _read_all(stack.bootstrap_servers, dead_letter_topic(topic), expected=1)
        assert [record.key for record in dead] == [b"note-2"]
    finally:
        await dead_letter_broker.stop()


async def test_a_failed_batch_is_read_again_on_the_partitions_still_assigned_after_a_rebalance(stack, unique_name):
    """A rebalance while the batch was handled took partition 0 away; partition 1 must still be
    read again from the batch's first record there (its next owner of partition 0 starts at
    the committed offset, which never passed the batch)."""
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap_servers)
    await producer.start()
    try:
        for partition in (0, 1):
            for number in range(3):
                await producer.send_and_wait(topic, f"{partition}-{number}".encode(), partition=partition)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        partition_0, partition_1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        consumer.assign([partition_0, partition_1])
        consumer.seek(partition_0, 0)
        consumer.seek(partition_1, 1)
        batch = []
        for _ in range(50):  # bounded: each fetch waits at most 200 ms
            if len(batch) >= 5:
                break
            for records in (await consumer.getmany(timeout_ms=200)).values():
                batch += records
        assert len(batch) == 5, batch
        consumer.assign([partition_1])  # the rebalance: partition 0 now belongs to another instance
        rewind(consumer, batch)
        assert await consumer.position(partition_1) == 1
    finally:
        await consumer.stop()
