"""Rules of consumers fed by the relay's chained records (ARCHITECTURE.md §4, ADR-0001):
each record names the position published before it on its partition, a poison event is
dead-lettered once and the partition goes on after it, and a record showing missing
events before it is never tracked, not even by a consumer that has tracked nothing yet."""

from __future__ import annotations

import asyncio

import pytest

from kabinet_chassis.kafka import ensure_topics
from kabinet_contracts.registry import dead_letter_topic
from tests.integration.test_outbox_to_consumer import (
    _read_all,
    board,
    board_that_applied_up_to,
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


class WithAnEnvelopeFieldUnknownHere:
    """An event as a producer on a newer envelope writes it: a field this consumer's
    contracts do not know, so its envelope does not hold here, though it names its position."""

    def __init__(self, event) -> None:
        self.event, self.aggregate_id = event, event.aggregate_id

    def json_bytes(self) -> bytes:
        return self.event.json_bytes()[:-1] + b',"new_envelope_field":1}'


# Position 2's poison: an event that fails to apply (a note with no text), or one whose envelope does not hold.
POISONS = {
    "fails_to_apply": lambda: note_event(2, {}),
    "envelope_does_not_hold": lambda: WithAnEnvelopeFieldUnknownHere(note_event(2, {"text": "two"})),
}


def chain_with_poison_at_position_2(poison: str = "fails_to_apply") -> list:
    # As the relay publishes them on partition 0: position p follows p - 1.
    return [
        (note_event(1, {"text": "one"}), 0),
        (POISONS[poison](), 1),
        (note_event(3, {"text": "three"}), 2),
        (note_event(4, {"text": "four"}), 3),
    ]


@pytest.mark.parametrize("poison", POISONS)
async def test_a_poison_event_is_dead_lettered_once_and_the_read_model_applies_the_rest_of_its_partition(
    stack, unique_name, poison, measured
):
    """The record after the poison names the poison's position as its previous one: that
    must not look like a gap (which would send the consumer back to the start, dead-letter
    the poison again, and then pass over every later record of the partition for good)."""
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    settings = stack.service_settings(f"{unique_name}_b")
    consumer_name = f"{settings.service_name}_board"
    await produce(stack.bootstrap_servers, topic, chain_with_poison_at_position_2(poison))
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
        # What operators alert on: a dead letter waits for a fix and a replay.
        assert measured().value("kabinet.consumer.dead_lettered", consumer=consumer_name, topic=topic) == 1


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


@pytest.mark.parametrize("poison", POISONS)
async def test_a_poison_event_is_dead_lettered_once_and_a_reaction_applies_the_rest_of_its_partition(
    stack, unique_name, poison
):
    """The same rule for event-sourced reactions (ReactionConsumer)."""
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    await produce(stack.bootstrap_servers, topic, chain_with_poison_at_position_2(poison))
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


async def test_a_consumer_that_tracked_nothing_yet_reads_a_complete_partition_from_its_first_record(stack, unique_name):
    """The relay's first record on a partition follows position 0: a fresh consumer of a
    complete topic sees no gap."""
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    settings = stack.service_settings(f"{unique_name}_b")
    await produce(stack.bootstrap_servers, topic, [(note_event(3, {"text": "three"}), 0),
                                                   (note_event(7, {"text": "seven"}), 3)])
    board_service, board_parts = build_board_service(settings, topic)
    async with board_service.running():

        async def both_applied() -> bool:
            return len(await board(board_service)) >= 2

        assert await settled(both_applied), f"board {await board(board_service)}"
        assert await board(board_service) == {"note-3": ("three", 1), "note-7": ("seven", 1)}
        assert board_parts["consumer"].skipped_total == 0


async def test_a_consumer_that_tracked_nothing_yet_does_not_lose_the_events_republished_after_a_gap(stack, unique_name):
    """ADR-0001's case (after the broker lost its data, the relay's first new event sits at
    offset 0, before its republish of positions 1 to 5) for a consumer that had applied
    nothing on that partition yet (it was lagging, or just deployed): tracking position 5
    first would make it skip 1 to 4 when they come."""
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    settings = stack.service_settings(f"{unique_name}_b")
    consumer_name = f"{settings.service_name}_board"
    texts = {position: f"text {position}" for position in range(1, 6)}
    await produce(stack.bootstrap_servers, topic, [
        (note_event(5, {"text": texts[5]}), 4),  # published before the relay noticed the loss
        *((note_event(position, {"text": texts[position]}), position - 1) for position in range(1, 6)),  # the republish
    ])
    board_service, _ = build_board_service(settings, topic)
    async with board_service.running():

        async def all_five_applied() -> bool:
            return len(await board(board_service)) >= 5

        await settled(all_five_applied)
        state = await board(board_service)
        tracked = await tracked_position(board_service, consumer_name, topic)
        assert state == {f"note-{p}": (texts[p], 1) for p in range(1, 6)}, f"board {state}, tracked {tracked}"
        assert tracked == 5


async def test_a_consumer_that_tracked_some_events_applies_those_republished_after_a_gap(stack, unique_name):
    """The same records for a consumer that had applied position 1: it ends with 2 to 5."""
    settings, topic, consumer_name = await board_that_applied_up_to(stack, unique_name, 1)
    texts = {position: f"text {position}" for position in range(1, 6)}
    await produce(stack.bootstrap_servers, topic, [
        (note_event(5, {"text": texts[5]}), 4),
        *((note_event(position, {"text": texts[position]}), position - 1) for position in range(1, 6)),
    ])
    board_service, _ = build_board_service(settings, topic)
    async with board_service.running():

        async def four_applied() -> bool:
            return len(await board(board_service)) >= 4

        assert await settled(four_applied, timeout_s=30), f"board {await board(board_service)}"
        assert await board(board_service) == {f"note-{p}": (texts[p], 1) for p in range(2, 6)}
        assert await tracked_position(board_service, consumer_name, topic) == 5
