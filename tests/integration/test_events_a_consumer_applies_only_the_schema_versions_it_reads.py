"""A consumer says which event types it applies and the newest schema version of each it
understands. An event of a newer version is poison for it: dead-lettered with the reason,
to be replayed once it is upgraded, never applied as if it were the version it knows (a
changed field read with the old meaning mislabels money). An event of a type it does not
read passes by: tracked, not applied, not dead-lettered (a producer may add types)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from kabinet_chassis.consumers import ReadModelConsumer, replay_dead_letters
from kabinet_chassis.kafka import ensure_topics
from kabinet_chassis.service import Service
from kabinet_contracts.envelope import IntegrationEvent
from kabinet_contracts.registry import dead_letter_topic
from tests.integration.test_dead_letters_and_gaps import settled
from tests.integration.test_outbox_to_consumer import _read_all, board, produce, topic_for, tracked_position
from tests.integration.test_reaction_consumer import build_mentions_service
from tests.support.notes import BOARD_SCHEMA, apply_to_board

pytestmark = pytest.mark.integration


def note(position: int, event_type: str, schema_version: int, payload: dict) -> IntegrationEvent:
    return IntegrationEvent(
        event_id=uuid.uuid4(), type=event_type, schema_version=schema_version, source="elsewhere", position=position,
        aggregate_id=f"note-{position}", aggregate_version=1, occurred_at=datetime.now(UTC), payload=payload,
    )


def board_reading(settings, topic: str, reads: dict[str, int]) -> tuple[Service, dict]:
    service = Service(settings, title="noteboard")
    parts: dict = {}

    @service.on_start
    async def start(svc: Service) -> None:
        async with svc.pool.acquire() as connection:
            await connection.execute(BOARD_SCHEMA)
        consumer = ReadModelConsumer(f"{settings.service_name}_board", svc.pool, apply_to_board, svc.dead_letters,
                                     reads=reads)
        svc.subscribe(topic, consumer)
        parts["consumer"] = consumer

    return service, parts


async def test_a_newer_schema_version_is_dead_lettered_for_replay_and_an_unread_type_passes_by(stack, unique_name):
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    await produce(stack.bootstrap_servers, topic, [
        (note(1, "notes.note_written", 1, {"text": "one"}), 0),
        # v2 moved the text elsewhere and reuses `text` for a title: v1's reading would mislabel it.
        (note(2, "notes.note_written", 2, {"text": "a title", "body": "two"}), 1),
        (note(3, "notes.note_archived", 1, {}), 2),  # a type this board does not read
        (note(4, "notes.note_written", 1, {"text": "four"}), 3),
    ])
    settings = stack.service_settings(f"{unique_name}_b")
    board_service, parts = board_reading(settings, topic, {"notes.note_written": 1})
    async with board_service.running():
        consumer = parts["consumer"]

        async def went_past_all() -> bool:
            return await tracked_position(board_service, consumer.name, topic) == 4

        assert await settled(went_past_all), f"board {await board(board_service)}"
        assert await board(board_service) == {"note-1": ("one", 1), "note-4": ("four", 1)}
        dead = await _read_all(stack.bootstrap_servers, dead_letter_topic(topic), expected=1)
        assert [record.key for record in dead] == [b"note-2"]
        assert b"notes.note_written v2" in dict(dead[0].headers)["dlq-error"]

        # Upgraded: it reads v2 (its text is the body's).
        async def apply_v2(connection, events) -> None:
            await apply_to_board(connection, [
                event.model_copy(update={"payload": {"text": event.payload["body"]}}) if event.schema_version == 2
                else event for event in events
            ])

        consumer.apply, consumer.reads = apply_v2, {"notes.note_written": 2}
        replay = await replay_dead_letters(consumer, stack.bootstrap_servers, topic)
        assert (replay.applied, replay.failed) == (1, [])
        assert await board(board_service) == {"note-1": ("one", 1), "note-2": ("two", 1), "note-4": ("four", 1)}


async def test_a_reaction_dead_letters_a_newer_schema_version_and_lets_an_unread_type_pass_by(stack, unique_name):
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    await produce(stack.bootstrap_servers, topic, [
        (note(1, "notes.note_written", 2, {"text": "a title", "body": "one"}), 0),
        (note(2, "notes.note_archived", 1, {}), 1),
        (note(3, "notes.note_written", 1, {"text": "three"}), 2),
    ])
    mentions, parts = build_mentions_service(stack.service_settings(f"{unique_name}_m"), topic)

    @mentions.on_start
    async def reading_v1(_: Service) -> None:  # after the consumer is built, before the broker starts
        parts["consumer"].reads = {"notes.note_written": 1}

    async with mentions.running():
        consumer = parts["consumer"]

        async def went_past_all() -> bool:
            return consumer.applied_total + consumer.skipped_total + consumer.dead_letters.sent_total >= 3

        assert await settled(went_past_all), f"applied {consumer.applied_total}, skipped {consumer.skipped_total}"
        assert (consumer.applied_total, consumer.skipped_total, consumer.dead_letters.sent_total) == (1, 1, 1)
        dead = await _read_all(stack.bootstrap_servers, dead_letter_topic(topic), expected=1)
        assert [record.key for record in dead] == [b"note-1"]
