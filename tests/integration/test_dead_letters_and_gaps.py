"""Rules of consumers fed by the relay's chained records (ARCHITECTURE.md §4, ADR-0001):
each record names the position published before it on its partition, and a poison event
is dead-lettered once and the partition goes on after it."""

from __future__ import annotations

import asyncio

import pytest

from kabinet_chassis.kafka import ensure_topics
from kabinet_contracts.registry import dead_letter_topic
from tests.integration.test_outbox_to_consumer import (
    _read_all,
    board,
    note_event,
    produce,
    topic_for,
    tracked_position,
)
from tests.integration.test_reaction_consumer import build_mentions_service
from tests.support.notes import build_board_service

pytestmark = pytest.mark.integration

SETTLE_S = 20


async def settled(predicate, timeout_s: float = SETTLE_S) -> bool:
    """Whether `predicate` came true within the time; the caller asserts, with what it saw."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.1)
    return False


def chain_with_poison_at_position_2() -> list:
    # As the relay publishes them on partition 0: position p follows p - 1; position 2 has no text.
    return [
        (note_event(1, {"text": "one"}), 0),
        (note_event(2, {}), 1),
        (note_event(3, {"text": "three"}), 2),
        (note_event(4, {"text": "four"}), 3),
    ]


async def test_a_poison_event_is_dead_lettered_once_and_the_read_model_applies_the_rest_of_its_partition(
    stack, unique_name
):
    """The record after the poison names the poison's position as its previous one: that
    must not look like a gap (which would send the consumer back to the start, dead-letter
    the poison again, and then pass over every later record of the partition for good)."""
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    settings = stack.service_settings(f"{unique_name}_b")
    consumer_name = f"{settings.service_name}_board"
    await produce(stack.bootstrap_servers, topic, chain_with_poison_at_position_2())
    board_service, board_parts = build_board_service(settings, topic)
    async with board_service.running():
        consumer = board_parts["consumer"]

        async def all_three_applied() -> bool:
            return len(await board(board_service)) >= 3

        await settled(all_three_applied)
        state = await board(board_service)
        tracked = await tracked_position(board_service, consumer_name, topic)
        assert state == {"note-1": ("one", 1), "note-3": ("three", 1), "note-4": ("four", 1)}, (
            f"board {state}, tracked position {tracked}, skipped {consumer.skipped_total},"
            f" dead letters so far {consumer.dead_letters.sent_total}"
        )
        assert tracked == 4
        dead = await _read_all(stack.bootstrap_servers, dead_letter_topic(topic), expected=1)
        assert [record.key for record in dead] == [b"note-2"]
        assert consumer.dead_letters.sent_total == 1


async def test_a_redelivered_poison_event_is_skipped_not_dead_lettered_again(stack, unique_name):
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    await produce(stack.bootstrap_servers, topic, chain_with_poison_at_position_2())
    board_service, board_parts = build_board_service(stack.service_settings(f"{unique_name}_b"), topic)
    async with board_service.running():
        consumer = board_parts["consumer"]

        async def all_three_applied() -> bool:
            return len(await board(board_service)) >= 3

        assert await settled(all_three_applied), f"board {await board(board_service)}"
        # The same poison record again, as a producer retry (or the relay's republish) delivers it.
        await produce(stack.bootstrap_servers, topic, [(note_event(2, {}), 1)])

        async def seen_again() -> bool:
            return consumer.skipped_total >= 1

        assert await settled(seen_again), f"skipped {consumer.skipped_total}"
        assert consumer.dead_letters.sent_total == 1


async def test_a_poison_event_is_dead_lettered_once_and_a_reaction_applies_the_rest_of_its_partition(
    stack, unique_name
):
    """The same rule for event-sourced reactions (ReactionConsumer)."""
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    await produce(stack.bootstrap_servers, topic, chain_with_poison_at_position_2())
    mentions, parts = build_mentions_service(stack.service_settings(f"{unique_name}_m"), topic)
    async with mentions.running():
        consumer = parts["consumer"]

        async def applied_three() -> bool:
            return consumer.applied_total >= 3

        await settled(applied_three)
        assert consumer.applied_total == 3, (
            f"applied {consumer.applied_total}, skipped {consumer.skipped_total},"
            f" dead letters {consumer.dead_letters.sent_total}"
        )
        assert consumer.dead_letters.sent_total == 1
