"""Rules of the outbox relay when the broker refuses part of what it was sent: publishing is
at least once, nothing is skipped, and a subscriber still sees each aggregate's events in order."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from aiokafka.errors import KafkaError

from kabinet_chassis import outbox
from kabinet_chassis.kafka import new_producer
from tests.integration.test_outbox_to_consumer import _read_all, board, eventually, topic_for
from tests.support.notes import Note, build_board_service, build_notes_service

pytestmark = pytest.mark.integration

EDITS = 5
PAGE_SIZE = 2  # small pages: the refused one sits between two that the broker took


def refusing_once(batch_number: int):
    """A new_producer whose broker refuses the `batch_number`th record batch once, as after its retries ran out,
    while the batches queued behind it are taken."""
    sent = {"batches": 0}

    def make(bootstrap_servers: str, enable_idempotence: bool):
        producer = new_producer(bootstrap_servers, enable_idempotence)
        send_batch = producer.send_batch

        async def send_batch_or_refuse(batch, topic, *, partition):
            sent["batches"] += 1
            if sent["batches"] != batch_number:
                return await send_batch(batch, topic, partition=partition)
            refused = asyncio.get_running_loop().create_future()
            refused.set_exception(KafkaError("the broker refused the batch"))
            return refused

        producer.send_batch = send_batch_or_refuse
        return producer

    return make, sent


async def test_a_page_the_broker_refuses_is_published_again_and_a_subscriber_sees_every_edit_once_in_order(
        stack, unique_name, monkeypatch):
    make_producer, sent = refusing_once(batch_number=2)
    monkeypatch.setattr(outbox, "new_producer", make_producer)
    topic = topic_for(unique_name)
    notes, notes_parts = build_notes_service(stack.service_settings(unique_name), topic)
    board_service, _ = build_board_service(stack.service_settings(f"{unique_name}_b"), topic)
    async with notes.running(), board_service.running():
        relay = notes_parts["relay"]
        relay.config = dataclasses.replace(relay.config, page_size=PAGE_SIZE)
        note = Note(text="v0")
        for version in range(1, EDITS + 1):
            note.edit(f"v{version}")
        notes_parts["app"].save(note)  # one commit: pages of 2 out of 6 events of one aggregate

        async def relayed_all() -> bool:
            return relay.position == EDITS + 1

        await eventually(relayed_all, what="the relay to record every position")
        assert sent["batches"] > (EDITS + 1) // PAGE_SIZE, "the refused page was never sent again"
        records = await _read_all(stack.bootstrap_servers, topic, expected=EDITS + 1)
        assert {json.loads(r.value)["position"] for r in records} == set(range(1, EDITS + 2))

        async def applied_all():
            return (await board(board_service)).get(str(note.id)) == (f"v{EDITS}", EDITS + 1)

        # Every event applied once, the last edit last: the text is the last edit's.
        await eventually(applied_all, what="every edit on the board once, the last one last")
