"""A service creates the topics it publishes and consumes, and their dead-letter topics,
with the replication its settings give: one replica on the embedded broker, three on a
production cluster, a majority of them in sync before a record counts as written."""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from kabinet_chassis.kafka import ensure_topics
from kabinet_chassis.settings import ServiceSettings
from tests.support.notes import build_board_service

pytestmark = pytest.mark.integration


async def described(bootstrap_servers: str, topic: str) -> tuple[list[int], str | None]:
    """The replicas of the topic's first partition, and its min.insync.replicas."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        (description,) = await admin.describe_topics([topic])
        (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        entries = {entry[0]: entry[1] for resource in response.resources for entry in resource[4]}
        return description["partitions"][0]["replicas"], entries.get("min.insync.replicas")
    finally:
        await admin.close()


@pytest.mark.parametrize(("replicas", "in_sync"), [(3, "2"), (5, "3")])
async def test_a_topic_is_created_with_the_replicas_asked_and_a_majority_in_sync(stack, unique_name, replicas, in_sync):
    topic = f"{unique_name}.events.v1"
    await ensure_topics(stack.bootstrap_servers, [topic], replication_factor=replicas)
    created_replicas, min_in_sync = await described(stack.bootstrap_servers, topic)
    assert len(created_replicas) == replicas
    assert min_in_sync == in_sync


def test_the_replication_factor_is_a_setting_of_every_service_one_by_default(monkeypatch):
    base = {"service_name": "ledger", "database_url": "postgresql://u@h/db", "kafka_bootstrap_servers": "k:9092"}
    assert ServiceSettings(**base).kafka_replication_factor == 1  # the embedded broker: one node
    monkeypatch.setenv("KABINET_KAFKA_REPLICATION_FACTOR", "3")
    assert ServiceSettings(**base).kafka_replication_factor == 3


async def test_a_consumers_dead_letter_topic_is_there_before_its_first_poison_record(stack, unique_name):
    # A broker that creates no topic on first use would refuse the dead letter, and the
    # consumer would stall on its poison record.
    topic = f"{unique_name}.events.v1"
    service, _ = build_board_service(stack.service_settings(f"{unique_name}_b"), topic)
    async with service.running():
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap_servers)
        await admin.start()
        try:
            assert {topic, f"{topic}.dlq"} <= set(await admin.list_topics())
        finally:
            await admin.close()
