"""A dead-lettered event is not lost: once the consumer is fixed, its dead letters are
replayed into it, each applied once however often the replay runs (ARCHITECTURE.md §4).
The consumer tracked the poison event when it dead-lettered it (so that its partition goes
on), so a replay cannot go through the ordinary path: that would skip it as seen."""

from __future__ import annotations

import contextlib

import pytest

from kabinet_chassis.consumers import replay_dead_letters
from kabinet_chassis.kafka import ensure_topics
from tests.integration.test_dead_letters_and_gaps import chain_with_poison_at_position_2, settled
from tests.integration.test_outbox_to_consumer import board, produce, topic_for
from tests.integration.test_reaction_consumer import Mention, build_mentions_service
from tests.support.notes import build_board_service

pytestmark = pytest.mark.integration


async def apply_to_board_fixed(connection, events) -> None:
    """The read model after the fix: a note without text is an empty note, not an error."""
    for note_event in events:
        await connection.execute(
            "INSERT INTO note_board (note_id, text, applied_count) VALUES ($1, $2, 1)"
            " ON CONFLICT (note_id) DO UPDATE SET text = EXCLUDED.text, applied_count = note_board.applied_count + 1",
            note_event.aggregate_id,
            note_event.payload.get("text", ""),
        )


@contextlib.asynccontextmanager
async def a_board_that_dead_lettered_position_2(stack, unique_name):
    """A running board read model that applied the notes around position 2 and dead-lettered
    it (a note without text): its service, its consumer and the topic."""
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    await produce(stack.bootstrap_servers, topic, chain_with_poison_at_position_2())
    board_service, parts = build_board_service(stack.service_settings(f"{unique_name}_b"), topic)
    async with board_service.running():
        consumer = parts["consumer"]

        async def dead_lettered() -> bool:
            return consumer.dead_letters.sent_total == 1 and len(await board(board_service)) >= 3

        assert await settled(dead_lettered), f"board {await board(board_service)}"
        yield board_service, consumer, topic


async def test_a_read_model_applies_its_dead_letter_once_when_replayed_after_a_fix(stack, unique_name):
    async with a_board_that_dead_lettered_position_2(stack, unique_name) as (board_service, consumer, topic):
        consumer.apply = apply_to_board_fixed  # the fix is deployed
        replay = await replay_dead_letters(consumer, stack.bootstrap_servers, topic)
        assert (replay.applied, replay.already_replayed, replay.failed) == (1, 0, [])
        assert (await board(board_service))["note-2"] == ("", 1)

        again = await replay_dead_letters(consumer, stack.bootstrap_servers, topic)  # an operator runs it twice
        assert (again.applied, again.already_replayed, again.failed) == (0, 1, [])
        assert await board(board_service) == {
            "note-1": ("one", 1),
            "note-2": ("", 1),
            "note-3": ("three", 1),
            "note-4": ("four", 1),
        }


async def test_a_dead_letter_that_still_fails_stays_for_the_next_replay(stack, unique_name):
    async with a_board_that_dead_lettered_position_2(stack, unique_name) as (board_service, consumer, topic):
        not_fixed = await replay_dead_letters(consumer, stack.bootstrap_servers, topic)
        assert (not_fixed.applied, not_fixed.already_replayed) == (0, 0)
        assert [position for position, _ in not_fixed.failed] == [2]
        assert "note event without text" in not_fixed.failed[0][1]

        consumer.apply = apply_to_board_fixed
        fixed = await replay_dead_letters(consumer, stack.bootstrap_servers, topic)
        assert (fixed.applied, fixed.failed) == (1, [])
        assert (await board(board_service))["note-2"] == ("", 1)


async def test_a_reaction_applies_its_dead_letter_once_when_replayed_after_a_fix(stack, unique_name):
    topic = topic_for(unique_name)
    await ensure_topics(stack.bootstrap_servers, [topic])
    await produce(stack.bootstrap_servers, topic, chain_with_poison_at_position_2())
    mentions, parts = build_mentions_service(stack.service_settings(f"{unique_name}_m"), topic)
    async with mentions.running():
        consumer = parts["consumer"]

        async def the_rest_applied() -> bool:
            return consumer.applied_total >= 3 and consumer.dead_letters.sent_total == 1

        assert await settled(the_rest_applied), f"applied {consumer.applied_total}"
        # The fix: a note without text is mentioned with empty text.
        consumer.react = lambda upstream: [Mention(note_id=upstream.aggregate_id, text=upstream.payload.get("text", ""))]
        replay = await replay_dead_letters(consumer, stack.bootstrap_servers, topic)
        assert (replay.applied, replay.already_replayed, replay.failed) == (1, 0, [])
        again = await replay_dead_letters(consumer, stack.bootstrap_servers, topic)
        assert (again.applied, again.already_replayed, again.failed) == (0, 1, [])
        app = parts["app"]
        noticed = [item for item in app.recorder.select_notifications(start=1, limit=100) if item.topic.endswith("Mention.Noticed")]
        assert len(noticed) == 4  # one per note, the replayed one once
