"""Kafka plumbing shared by the relay and the consumers (aiokafka)."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

# Partition counts never change after creation (ARCHITECTURE.md §3): keys keep
# their partition, so one aggregate's events stay in order forever.
DEFAULT_PARTITIONS = 3
_REQUEST_TIMEOUT_MS = 10_000


def new_producer(bootstrap_servers: str, enable_idempotence: bool) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        enable_idempotence=enable_idempotence,
        acks="all",
        linger_ms=2,
        max_batch_size=256 * 1024,
        request_timeout_ms=_REQUEST_TIMEOUT_MS,
    )


async def ensure_topics(bootstrap_servers: str, topics: list[str], partitions: int = DEFAULT_PARTITIONS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=_REQUEST_TIMEOUT_MS)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in topics if name not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


async def end_offsets(bootstrap_servers: str, topic: str) -> dict[int, int] | None:
    """High watermark per partition, or None when the topic does not exist."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, request_timeout_ms=_REQUEST_TIMEOUT_MS)
    await consumer.start()
    try:
        partitions = await consumer._client.fetch_all_metadata()
        ids = partitions.partitions_for_topic(topic)
        if not ids:
            return None
        offsets = await consumer.end_offsets([TopicPartition(topic, i) for i in ids])
        return {tp.partition: offset for tp, offset in offsets.items()}
    finally:
        await consumer.stop()
