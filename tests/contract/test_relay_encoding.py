"""The relay's own encodings agree with the reference ones they replace, value for value."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st

from kabinet_chassis.kafka import murmur2 as fast_murmur2
from kabinet_chassis.kafka import partition_for_key
from kabinet_contracts.envelope import IntegrationEvent, event_id_for

# The namespace of published event ids: changing it would change every id ever published.
EVENT_ID_NAMESPACE = uuid.UUID("6f1c7c52-3f4e-4f7e-9a55-5b0c1a2d9e10")


# org.apache.kafka.common.utils.UtilsTest#testMurmur2: key -> the Java client's signed 32-bit hash.
JAVA_CLIENT_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def test_murmur2_gives_the_java_clients_own_test_values() -> None:
    for key, java_hash in JAVA_CLIENT_MURMUR2.items():
        assert fast_murmur2(key) == java_hash & 0xFFFFFFFF, key


@given(st.binary(max_size=300))
def test_murmur2_is_the_java_clients_hash_as_aiokafka_computes_it(key: bytes) -> None:
    assert fast_murmur2(key) == murmur2(key)


@given(st.uuids(), st.integers(min_value=1, max_value=64))
def test_a_key_lands_on_the_partition_aiokafka_would_choose(aggregate_id: uuid.UUID, partition_count: int) -> None:
    key = str(aggregate_id).encode()
    partitions = list(range(partition_count))
    assert partition_for_key(key, partitions) == DefaultPartitioner()(key, partitions, partitions)


@given(st.from_regex(r"[a-z][a-z0-9_]{0,63}", fullmatch=True), st.integers(min_value=1, max_value=2**63 - 1))
def test_event_ids_are_the_uuid5_of_source_and_position(source: str, position: int) -> None:
    assert event_id_for(source, position) == uuid.uuid5(EVENT_ID_NAMESPACE, f"{source}:{position}")


def test_the_wire_form_of_an_event_is_its_model_dump_json() -> None:
    event = IntegrationEvent(
        event_id=event_id_for("notes", 7), type="notes.note_written", schema_version=1, source="notes", position=7,
        aggregate_id="a1", aggregate_version=1, occurred_at=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        payload={"text": "é\u2028\"", "amounts": [1.5, None, 10**20]},
    )
    assert event.json_bytes() == event.model_dump_json().encode()
