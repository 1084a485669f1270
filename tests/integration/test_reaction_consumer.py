"""Rules of the foundation for event-sourced reactions: each upstream event changes the
reacting service's aggregates exactly once, and poison goes to the dead-letter topic."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import ProcessRecorder

from kabinet_chassis.consumers import ReactionConsumer
from kabinet_chassis.eventstore import event_store_env
from kabinet_chassis.service import Service
from kabinet_chassis.settings import ServiceSettings
from kabinet_contracts.envelope import IntegrationEvent
from kabinet_contracts.registry import dead_letter_topic
from tests.integration.test_outbox_to_consumer import _read_all, eventually, topic_for
from tests.support.notes import build_notes_service

pytestmark = pytest.mark.integration


class Mention(Aggregate):
    @event("Noticed")
    def __init__(self, note_id: str, text: str) -> None:
        self.note_id = note_id
        self.text = text


class Mentions(Application):
    """Keeps its tracking beside its events: a process recorder."""

    def construct_recorder(self) -> ProcessRecorder:
        return self.factory.process_recorder()


def notice(upstream: IntegrationEvent) -> list[Mention]:
    if "text" not in upstream.payload:
        raise ValueError("note event without text")
    return [Mention(note_id=upstream.aggregate_id, text=upstream.payload["text"])]


def build_mentions_service(settings: ServiceSettings, topic: str) -> tuple[Service, dict]:
    service = Service(settings, title="mentions")
    parts: dict = {}

    @service.on_start
    async def start(svc: Service) -> None:
        app = Mentions(env=event_store_env(settings))
        consumer = ReactionConsumer(f"{settings.service_name}_mentions", app, notice, svc.dead_letters, svc.threads)
        svc.subscribe(topic, consumer)
        parts.update(app=app, consumer=consumer)

    @service.on_stop
    async def stop(svc: Service) -> None:
        parts["app"].close()

    return service, parts


async def test_each_upstream_event_changes_the_reacting_service_once(stack, unique_name):
    topic = topic_for(unique_name)
    notes, notes_parts = build_notes_service(stack.service_settings(unique_name), topic)
    mentions, mentions_parts = build_mentions_service(stack.service_settings(f"{unique_name}_m"), topic)
    async with notes.running(), mentions.running():
        consumer = mentions_parts["consumer"]
        for text in ("first", "second"):
            notes_parts["app"].write(text)

        async def applied(count: int) -> bool:
            return consumer.applied_total >= count

        await eventually(lambda: applied(2), what="both notes noticed")
        # The same records again, as a producer retry would deliver them, and a poison record.
        records = await _read_all(stack.bootstrap_servers, topic, expected=2)
        producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap_servers)
        await producer.start()
        try:
            for record in records:
                await producer.send_and_wait(topic, record.value, key=record.key, partition=record.partition,
                                             headers=list(record.headers))
            await producer.send_and_wait(topic, b"{not json", key=b"poison")
        finally:
            await producer.stop()

        async def settled() -> bool:
            return consumer.skipped_total >= 2 and consumer.dead_letters.sent_total >= 1

        await eventually(settled, what="the duplicates skipped and the poison dead-lettered")
        assert consumer.applied_total == 2
        app = mentions_parts["app"]
        assert app.recorder.max_notification_id() == 2, "one Mention event per note, none for the duplicates"
        dead = await _read_all(stack.bootstrap_servers, dead_letter_topic(topic), expected=1)
        assert b"malformed integration event" in dict(dead[0].headers)["dlq-error"]
