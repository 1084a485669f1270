"""The relay's own encodings agree with the reference ones they replace, value for value."""

from __future__ import annotations

import uuid

from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st

from kabinet_chassis.kafka import murmur2 as fast_murmur2
from kabinet_chassis.kafka import partition_for_key


@given(st.binary(max_size=300))
def test_murmur2_is_the_java_clients_hash_as_aiokafka_computes_it(key: bytes) -> None:
    assert fast_murmur2(key) == murmur2(key)


@given(st.uuids(), st.integers(min_value=1, max_value=64))
def test_a_key_lands_on_the_partition_aiokafka_would_choose(aggregate_id: uuid.UUID, partition_count: int) -> None:
    key = str(aggregate_id).encode()
    partitions = list(range(partition_count))
    assert partition_for_key(key, partitions) == DefaultPartitioner()(key, partitions, partitions)

