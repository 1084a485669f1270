"""One aggregate's events reach a subscriber once each and in order when the leading relay
dies between publishing a page and recording it, and the standby relay takes over: it
publishes again from the recorded position, and the subscriber's tracking absorbs what the
dead leader had already published."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json

import pytest

from tests.integration.test_outbox_to_consumer import WAIT_S, _read_all, board, eventually, topic_for
from tests.support.notes import Note, build_board_service, build_notes_service

pytestmark = pytest.mark.integration

EDITS = 9
PAGE_SIZE = 2


async def test_a_standby_relay_taking_over_mid_stream_keeps_each_aggregates_events_once_and_in_order(
        stack, unique_name):
    topic = topic_for(unique_name)
    settings = stack.service_settings(unique_name)
    published_pages: list[int] = []
    leader_hangs = asyncio.Event()

    async def die_after_the_second_page(position: int) -> None:
        published_pages.append(position)
        if len(published_pages) == 2:  # on the broker, not recorded: the leader hangs here until stopped
            leader_hangs.set()
            await asyncio.Event().wait()

    leader, leader_parts = build_notes_service(settings, topic, on_page_published=die_after_the_second_page)
    standby, standby_parts = build_notes_service(settings, topic)
    board_settings = stack.service_settings(f"{unique_name}_b")
    board_service, _ = build_board_service(board_settings, topic)
    async with contextlib.AsyncExitStack() as leading, board_service.running():
        await leading.enter_async_context(leader.running())
        leader_relay = leader_parts["relay"]
        await asyncio.wait_for(leader_relay.relaying.wait(), WAIT_S)
        async with standby.running():
            standby_relay = standby_parts["relay"]
            leader_relay.config = dataclasses.replace(leader_relay.config, page_size=PAGE_SIZE)
            standby_relay.config = dataclasses.replace(standby_relay.config, page_size=PAGE_SIZE)

            async def standing_by() -> bool:
                return standby_relay.is_standby

            await eventually(standing_by, what="the second relay to stand by")
            note = Note(text="v0")
            for version in range(1, EDITS + 1):
                note.edit(f"v{version}")
            leader_parts["app"].save(note)  # one commit: pages of 2 of one aggregate's 10 events

            await asyncio.wait_for(leader_hangs.wait(), WAIT_S)
            await leading.aclose()  # the leader dies: its lock goes with its connection

            async def taken_over_and_relayed_all() -> bool:
                return standby_relay.is_leader and standby_relay.position == EDITS + 1

            await eventually(taken_over_and_relayed_all, what="the standby to take over and record every position")

            async def applied_all() -> bool:
                return (await board(board_service)).get(str(note.id)) == (f"v{EDITS}", EDITS + 1)

            # Each event applied once (the count), the last edit last (the text).
            await eventually(applied_all, what=f"every edit on the board once, v{EDITS} last")
            consumer_name = f"{board_settings.service_name}_board"
            tracked = await board_service.pool.fetch(
                "SELECT position FROM consumer_tracking WHERE consumer = $1 AND topic = $2", consumer_name, topic)
            assert [row["position"] for row in tracked] == [EDITS + 1]  # the note's partition
            records = await _read_all(stack.bootstrap_servers, topic, expected=EDITS + 1)
            # At least once on the broker: what the dead leader published is there again after it.
            positions = [json.loads(record.value)["position"] for record in records]
            assert set(positions) == set(range(1, EDITS + 2)) and len(positions) > EDITS + 1
