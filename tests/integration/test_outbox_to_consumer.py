"""Rules of the foundation: an event saved in one service reaches another exactly once."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kabinet_chassis.consumers import TRACKING_SCHEMA
from kabinet_chassis.databases import ensure_database
from kabinet_chassis.kafka import ensure_topics
from kabinet_chassis.telemetry import install_tracing
from kabinet_contracts.envelope import PREVIOUS_POSITION_HEADER, IntegrationEvent
from kabinet_contracts.registry import dead_letter_topic
from tests.support.notes import build_board_service, build_notes_service

pytestmark = pytest.mark.integration

WAIT_S = 30


async def eventually(predicate, timeout_s: float = WAIT_S, what: str = "condition"):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def board(service) -> dict[str, tuple[str, int]]:
    rows = await service.pool.fetch("SELECT note_id, text, applied_count FROM note_board")
    return {r["note_id"]: (r["text"], r["applied_count"]) for r in rows}


def topic_for(name: str) -> str:
    return f"{name}.events.v1"


async def test_note_reaches_other_service_once_even_if_relay_dies_between_publish_and_tracking(stack, unique_name):
    topic = topic_for(unique_name)
    crashes = {"left": 1}

    async def die_once(position: int) -> None:
        if crashes["left"]:
            crashes["left"] -= 1
            raise RuntimeError("relay killed after publishing, before recording its position")

    notes, notes_parts = build_notes_service(stack.service_settings(unique_name), topic, on_page_published=die_once)
    board_service, board_parts = build_board_service(stack.service_settings(f"{unique_name}_b"), topic)
    async with notes.running(), board_service.running():
        app = notes_parts["app"]
        ids = [app.write(f"note {i}") for i in range(5)]
        app.edit(ids[0], "edited")
        await eventually(lambda: _all_applied(board_service, ids), what="all notes on the board")
        await eventually(lambda: _relay_at(notes_parts["relay"], 6), what="relay position recorded")
        assert crashes["left"] == 0, "the crash point was never reached"
        # The page was published twice (before and after the crash); each event applied once. The
        # second copies may come after the board shows every note: a consumer that joined before
        # the crash reads the first copies as they come.
        await eventually(lambda: _skipped_some(board_parts["consumer"]), what="the second copies skipped")
        state = await board(board_service)
        assert state[str(ids[0])] == ("edited", 2)
        assert all(state[str(i)][1] == 1 for i in ids[1:])


async def _all_applied(service, ids) -> bool:
    state = await board(service)
    return len(state) == len(ids) and all(str(i) in state for i in ids) and state[str(ids[0])][0] == "edited"


async def _relay_at(relay, position: int) -> bool:
    return relay.position >= position


async def _skipped_some(consumer) -> bool:
    return consumer.skipped_total >= 1


async def test_message_delivered_twice_is_applied_once(stack, unique_name):
    topic = topic_for(unique_name)
    notes, notes_parts = build_notes_service(stack.service_settings(unique_name), topic)
    board_service, board_parts = build_board_service(stack.service_settings(f"{unique_name}_b"), topic)
    async with notes.running(), board_service.running():
        note_id = notes_parts["app"].write("once")
        await eventually(lambda: _has(board_service, note_id), what="the note on the board")
        # Deliver the very same record again, as a broker or producer retry would.
        original = await _read_all(stack.bootstrap_servers, topic, expected=1)
        producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(topic, original[0].value, key=original[0].key)
        finally:
            await producer.stop()
        await eventually(lambda: _skipped(board_parts["consumer"], 1), what="the duplicate to be seen")
        assert (await board(board_service))[str(note_id)] == ("once", 1)


async def _has(service, note_id) -> bool:
    return str(note_id) in await board(service)


async def _skipped(consumer, count: int) -> bool:
    return consumer.skipped_total >= count


async def _read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = WAIT_S, until=None):
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if len(records) >= expected and (until is None or until(records)):
                break
            batch = await consumer.getmany(timeout_ms=500)
            for partition_records in batch.values():
                records.extend(partition_records)
    finally:
        await consumer.stop()
    assert len(records) >= expected, f"expected {expected} records on {topic}, found {len(records)}"
    return records


@pytest.mark.faults
async def test_broker_restart_losing_all_data_is_healed_by_republishing(stack, unique_name):
    topic = topic_for(unique_name)
    notes, notes_parts = build_notes_service(stack.service_settings(unique_name), topic)
    board_service, board_parts = build_board_service(stack.service_settings(f"{unique_name}_b"), topic)
    async with notes.running(), board_service.running():
        app = notes_parts["app"]
        before = [app.write(f"before {i}") for i in range(3)]
        await eventually(lambda: _count(board_service, 3), what="notes before the restart")
        stack.restart_broker_losing_data()
        after = [app.write(f"after {i}") for i in range(2)]
        await eventually(lambda: _count(board_service, 5), timeout_s=90, what="notes after the restart")
        # The relay republished the old events onto the empty broker...
        records = await _read_all(stack.bootstrap_servers, topic, expected=5,
                                  until=lambda rs: {json.loads(r.value)["position"] for r in rs} >= {1, 2, 3, 4, 5})
        assert {json.loads(r.value)["position"] for r in records} >= {1, 2, 3, 4, 5}
        # ...and the consumer applied none of them twice.
        state = await board(board_service)
        assert sorted(state) == sorted(str(i) for i in before + after)
        assert all(count == 1 for _, count in state.values())


async def _count(service, n: int) -> bool:
    return len(await board(service)) >= n


def note_event(position: int, payload: dict) -> IntegrationEvent:
    return IntegrationEvent(
        event_id=uuid.uuid4(), type="notes.note_written", schema_version=1, source="elsewhere", position=position,
        aggregate_id=f"note-{position}", aggregate_version=1, occurred_at=datetime.now(UTC), payload=payload,
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


async def board_that_applied_up_to(stack, unique_name: str, position: int):
    """The board's settings, topic and consumer name, its tracking at `position` on partition 0
    of a topic the relay of "elsewhere" publishes to (as before a broker lost its data)."""
    topic = topic_for(unique_name)
    settings = stack.service_settings(f"{unique_name}_b")
    consumer_name = f"{settings.service_name}_board"
    await ensure_topics(stack.bootstrap_servers, [topic])
    await ensure_database(settings.database_url, settings.service_name)
    connection = await asyncpg.connect(settings.service_database_url)
    try:
        await connection.execute(TRACKING_SCHEMA)
        await connection.execute("INSERT INTO consumer_tracking VALUES ($1, 'elsewhere', $2, 0, $3)",
                                 consumer_name, topic, position)
    finally:
        await connection.close()
    return settings, topic, consumer_name


async def tracked_position(service, consumer_name: str, topic: str) -> int:
    return await service.pool.fetchval(
        "SELECT position FROM consumer_tracking WHERE consumer = $1 AND topic = $2 AND partition = 0", consumer_name, topic
    )


@pytest.mark.faults
async def test_consumer_that_passed_over_events_reads_the_partition_again_instead_of_skipping_them(stack, unique_name):
    """What a broker that lost its data can cause: the relay's next events land at offsets
    the consumer had already read past, so it would meet position 5 before position 4."""
    # The consumer applied up to position 2 on partition 0 and committed offset 1.
    settings, topic, consumer_name = await board_that_applied_up_to(stack, unique_name, 2)
    # The new partition 0: position 4 (after 2) at offset 0, position 5 (after 4) at offset 1.
    await produce(stack.bootstrap_servers, topic, [(note_event(4, {"text": "four"}), 2),
                                                   (note_event(5, {"text": "five"}), 4)])
    committer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap_servers, group_id=consumer_name, enable_auto_commit=False)
    await committer.start()
    try:
        committer.assign([TopicPartition(topic, 0)])
        await committer.commit({TopicPartition(topic, 0): 1})
    finally:
        await committer.stop()

    board_service, board_parts = build_board_service(settings, topic)
    async with board_service.running():
        await eventually(lambda: _count(board_service, 2), what="positions 4 and 5 on the board")
        state = await board(board_service)
        assert state == {"note-4": ("four", 1), "note-5": ("five", 1)}
        assert await tracked_position(board_service, consumer_name, topic) == 5


@pytest.mark.faults
async def test_a_gap_whose_missing_events_are_republished_after_it_does_not_stop_the_partition(stack, unique_name):
    """After a broker restart the relay's first new event (position 5, after 4) can land at
    offset 0, before the relay notices the loss and republishes everything from position 1.
    A consumer that had applied only up to 2 meets the gap at offset 0: reading the partition
    again from the start meets it again there, so the missing events must be looked for
    after it, where the republish puts them."""
    settings, topic, consumer_name = await board_that_applied_up_to(stack, unique_name, 2)
    texts = {position: f"text {position}" for position in range(1, 6)}
    await produce(stack.bootstrap_servers, topic, [
        (note_event(5, {"text": texts[5]}), 4),  # the new event, published before the relay noticed
        *((note_event(position, {"text": texts[position]}), position - 1) for position in range(1, 6)),  # the republish
    ])

    board_service, _ = build_board_service(settings, topic)
    async with board_service.running():
        await eventually(lambda: _count(board_service, 3), timeout_s=30, what="positions 3, 4 and 5 on the board")
        assert await board(board_service) == {f"note-{p}": (texts[p], 1) for p in (3, 4, 5)}
        assert await tracked_position(board_service, consumer_name, topic) == 5


@pytest.mark.faults
async def test_poison_message_goes_to_dead_letter_topic_and_consumer_goes_on(stack, unique_name):
    topic = topic_for(unique_name)
    notes, notes_parts = build_notes_service(stack.service_settings(unique_name), topic)
    board_service, board_parts = build_board_service(stack.service_settings(f"{unique_name}_b"), topic)
    async with notes.running(), board_service.running():
        producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"{not json", key=b"poison")
            # Well-formed envelope, but the read model cannot apply it (no text).
            unappliable = IntegrationEvent(
                event_id=uuid.uuid4(), type="notes.note_written", schema_version=1, source="elsewhere", position=1,
                aggregate_id="broken", aggregate_version=1, occurred_at=datetime.now(UTC), payload={},
            )
            await producer.send_and_wait(topic, unappliable.model_dump_json().encode(), key=b"broken")
        finally:
            await producer.stop()
        note_id = notes_parts["app"].write("after the poison")
        await eventually(lambda: _has(board_service, note_id), what="the good note after the poison")
        dead = await _read_all(stack.bootstrap_servers, dead_letter_topic(topic), expected=2)
        by_key = {record.key: dict(record.headers) for record in dead}
        assert b"malformed integration event" in by_key[b"poison"]["dlq-error"]
        assert b"note event without text" in by_key[b"broken"]["dlq-error"]
        assert board_parts["consumer"].applied_total == 1
        assert "broken" not in await board(board_service)


async def test_one_trace_spans_the_command_the_relay_and_the_consumer(stack, unique_name):
    exporter = InMemorySpanExporter()
    install_tracing("tests", exporter=exporter)
    from opentelemetry import trace

    tracer = trace.get_tracer("tests")
    topic = topic_for(unique_name)
    notes, notes_parts = build_notes_service(stack.service_settings(unique_name), topic)
    board_service, _ = build_board_service(stack.service_settings(f"{unique_name}_b"), topic)
    async with notes.running(), board_service.running():
        with tracer.start_as_current_span("POST /notes") as request_span:
            note_id = notes_parts["app"].write("traced")
        trace_id = request_span.get_span_context().trace_id
        await eventually(lambda: _has(board_service, note_id), what="the traced note")

        async def consumer_span_in_trace():
            return [s for s in exporter.get_finished_spans()
                    if s.context.trace_id == trace_id and s.name == f"{topic} process"]

        await eventually(consumer_span_in_trace, what="a consumer span in the request's trace")
        names = {s.name for s in exporter.get_finished_spans() if s.context.trace_id == trace_id}
        assert f"{topic} publish" in names
