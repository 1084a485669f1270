"""Kafka plumbing shared by the relay and the consumers (aiokafka)."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import OffsetOutOfRangeError, TopicAlreadyExistsError, UnknownTopicOrPartitionError, for_code
from murmurhash2 import murmurhash2

# Partition counts never change after creation (ARCHITECTURE.md §3): keys keep
# their partition, so one aggregate's events stay in order forever. Four is also
# what the embedded broker gives a topic it auto-creates on a metadata request
# (a consumer may ask before the relay creates the topic after a broker restart),
# so both paths agree.
DEFAULT_PARTITIONS = 4
_REQUEST_TIMEOUT_MS = 10_000

# murmur2 of the Java client (org.apache.kafka.common.utils.Utils.murmur2), which
# aiokafka's DefaultPartitioner uses: a key must land on the partition any producer
# would choose for it. The Java client hashes with this seed.
_MURMUR2_SEED = 0x9747B28C


def new_producer(bootstrap_servers: str, enable_idempotence: bool) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        enable_idempotence=enable_idempotence,
        acks="all",
        linger_ms=2,
        max_batch_size=256 * 1024,
        request_timeout_ms=_REQUEST_TIMEOUT_MS,
    )


def murmur2(data: bytes) -> int:
    """The same hash as `aiokafka.partitioner.murmur2`, in C (the `murmurhash2` wheel).

    aiokafka's pure-Python one cost the relay about 4 µs per event, a quarter of all
    it does for one; this costs 0.1 µs (tests/contract/test_relay_encoding.py checks
    that both agree).
    """
    return murmurhash2(data, _MURMUR2_SEED)


def partition_for_key(key: bytes, partitions: list[int]) -> int:
    """What aiokafka's DefaultPartitioner picks for a key, given the topic's sorted partitions."""
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]


async def ensure_topics(bootstrap_servers: str, topics: list[str], partitions: int = DEFAULT_PARTITIONS,
                        replication_factor: int = 1) -> None:
    """Create the topics that do not exist. With more than one replica, a majority of them
    must have a record before it counts as written (min.insync.replicas, with the producers'
    acks=all): a broker lost after the acknowledgement does not lose it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=_REQUEST_TIMEOUT_MS)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        configs = {"min.insync.replicas": str(replication_factor // 2 + 1)} if replication_factor > 1 else {}
        missing = [NewTopic(name, num_partitions=partitions, replication_factor=replication_factor, topic_configs=configs)
                   for name in topics if name not in existing]
        if missing:
            refused = refused_topics((await admin.create_topics(missing)).topic_errors)
            if refused:
                raise TopicsRefused(f"the broker at {bootstrap_servers} refused to create {'; '.join(refused)}")
    finally:
        await admin.close()


class TopicsRefused(Exception):
    """The broker would not create a topic a service needs: more replicas than it has brokers,
    a creation policy, no right to create. Nothing could be published to it or read from it."""


def refused_topics(topic_errors: list[tuple]) -> list[str]:
    """The topics a CreateTopics answer refused, each with why. aiokafka raises none of them:
    they come back in the answer, one per topic (topic, error code[, message]). One created
    meanwhile (a replica of the service starting too) is as good as created."""
    refused = []
    for topic, error_code, *message in topic_errors:
        if error_code not in (0, TopicAlreadyExistsError.errno):
            why = for_code(error_code).__name__ + (f" ({message[0]})" if message and message[0] else "")
            refused.append(f"{topic}: {why}")
    return refused


class BrokerDidNotAnswer(Exception):
    """The broker holds a record asked for but did not hand it back in time: it may be
    slow, not empty. The caller asks again later; it must not take the record for lost."""


FETCH_POLL_MS = 200


async def records_at(
    bootstrap_servers: str, topic: str, offsets: dict[int, int], timeout_s: float = 3.0
) -> dict[int, ConsumerRecord]:
    """The record at the given offset of each partition, for those the broker still has.

    A partition is left out only when the broker shows the record gone: it did not hand it
    back, and the offset is past the partition's end or before its start, or the topic is
    unknown (as after a restart that lost the data). A record within the partition that was
    not handed back within `timeout_s` raises BrokerDidNotAnswer: that it was slow says
    nothing about the data. (The ends are asked only after fetching, and only for what was
    missing: the embedded broker reports a partition's end behind records it has acknowledged.)
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=_REQUEST_TIMEOUT_MS,
        enable_auto_commit=False, auto_offset_reset="none",
    )
    await consumer.start()
    found: dict[int, ConsumerRecord] = {}
    try:
        partitions = [TopicPartition(topic, p) for p in offsets]
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, offsets[tp.partition])
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(found) < len(offsets) and asyncio.get_running_loop().time() < deadline:
            try:
                batch = await consumer.getmany(timeout_ms=FETCH_POLL_MS)
            except (OffsetOutOfRangeError, UnknownTopicOrPartitionError):
                break
            for tp, records in batch.items():
                for record in records:
                    if record.offset == offsets[tp.partition]:
                        found[tp.partition] = record
                consumer.pause(tp)
        missing = [tp for tp in partitions if tp.partition not in found]
        if missing:
            try:
                starts = await consumer.beginning_offsets(missing)
                ends = await consumer.end_offsets(missing)
            except UnknownTopicOrPartitionError:
                return found
            unanswered = sorted(tp.partition for tp in missing if starts[tp] <= offsets[tp.partition] < ends[tp])
            if unanswered:
                raise BrokerDidNotAnswer(f"{topic}: the broker holds the records asked for on partitions {unanswered}"
                                         f" but did not hand them back within {timeout_s:g} s")
    finally:
        await consumer.stop()
    return found
