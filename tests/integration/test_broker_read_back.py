"""Rules of reading back what was published: the relay and the consumers' watchdog ask the
broker for the last record they know of, to learn whether it lost its data. Only a broker
that shows the record is gone counts as having lost it; one slow to answer proves nothing,
and taking it for lost would republish a service's whole history (the ledger's: millions
of events) onto a broker that still holds it."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from kabinet_chassis.kafka import BrokerDidNotAnswer, ensure_topics, records_at

pytestmark = pytest.mark.integration


async def publish(bootstrap: str, topic: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for number in range(count):
            await producer.send_and_wait(topic, f"event {number}".encode(), partition=0)
    finally:
        await producer.stop()


async def test_a_record_the_broker_holds_but_is_slow_to_hand_back_is_not_taken_for_lost(stack, unique_name):
    topic = f"{unique_name}.events.v1"
    await ensure_topics(stack.bootstrap_servers, [topic])
    await publish(stack.bootstrap_servers, topic, 3)
    assert (await records_at(stack.bootstrap_servers, topic, {0: 2}))[0].value == b"event 2"
    with pytest.raises(BrokerDidNotAnswer, match=r"partitions \[0\]"):
        await records_at(stack.bootstrap_servers, topic, {0: 2}, timeout_s=0.0)  # no time to fetch it


async def test_a_record_past_the_end_of_its_partition_or_on_a_topic_gone_is_lost(stack, unique_name):
    topic = f"{unique_name}.events.v1"
    await ensure_topics(stack.bootstrap_servers, [topic])
    await publish(stack.bootstrap_servers, topic, 2)
    # As after a broker restarted empty: the offsets known are past what it holds now.
    assert await records_at(stack.bootstrap_servers, topic, {0: 5, 1: 0}, timeout_s=0.0) == {}
    assert await records_at(stack.bootstrap_servers, f"{topic}.never-made", {0: 0}, timeout_s=0.0) == {}


async def test_a_record_just_acknowledged_is_found_though_the_broker_reports_its_partitions_end_behind_it(
        stack, unique_name):
    # The embedded broker reports a partition's end a few records behind what it has
    # acknowledged when records come in batches (as the relay sends them): the end alone
    # would call the relay's last record lost, and it would republish everything for ever.
    topic = f"{unique_name}.events.v1"
    await ensure_topics(stack.bootstrap_servers, [topic])
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap_servers, linger_ms=2)
    await producer.start()
    try:
        deliveries = [await producer.send(topic, f"event {number}".encode(), partition=0) for number in range(2_000)]
        last = (await asyncio.gather(*deliveries))[-1].offset
    finally:
        await producer.stop()
    assert (await records_at(stack.bootstrap_servers, topic, {0: last}))[0].value == b"event 1999"
