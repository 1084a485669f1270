"""Rules of event-sourced reactions: one that lost an optimistic-concurrency race reacts
again on fresh state; only one that conflicts every time is poison (in memory: the
consumer's logic, with eventsourcing's in-memory process recorder)."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import NAMESPACE_URL, uuid5

import psycopg
import pytest
from aiokafka import ConsumerRecord
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import InternalError, ProcessRecorder

from kabinet_chassis.consumers import REACTION_ATTEMPTS_MAX, ReactionConsumer
from kabinet_contracts.envelope import PREVIOUS_POSITION_HEADER, IntegrationEvent, event_id_for


class Counter(Aggregate):
    @staticmethod
    def create_id(name: str):
        return uuid5(NAMESPACE_URL, name)

    @event("Created")
    def __init__(self, name: str) -> None:
        self.count = 0

    @event("Counted")
    def count_one(self) -> None:
        self.count += 1


class Counters(Application):
    def construct_recorder(self) -> ProcessRecorder:
        return self.factory.process_recorder()


class DeadLettersSeen:
    def __init__(self) -> None:
        self.errors: list[str] = []

    async def send(self, record, consumer, error) -> None:
        self.errors.append(error)


class InlineThreads:
    async def run(self, function, *args):
        return function(*args)


def upstream_record(position: int = 1) -> ConsumerRecord:
    upstream = IntegrationEvent(event_id=event_id_for("notes", position), type="notes.note_written", schema_version=1,
                                source="notes", position=position, aggregate_id="n1", aggregate_version=position,
                                occurred_at=datetime.now(UTC), payload={"text": "hi"})
    value = upstream.json_bytes()
    return ConsumerRecord("notes.events.v1", 0, position - 1, 0, 0, b"k", value, None, 1, len(value),
                          [(PREVIOUS_POSITION_HEADER, str(position - 1).encode())])


def counters_with(saves_meanwhile: int) -> tuple[Counters, Counter, list[int]]:
    """An app whose reaction sees another command save the counter meanwhile, `saves_meanwhile` times."""
    app = Counters()
    counter = Counter("c")
    app.save(counter)
    reactions = [0]

    def react(_: IntegrationEvent) -> list[Counter]:
        reactions[0] += 1
        mine = app.repository.get(counter.id)
        if reactions[0] <= saves_meanwhile:  # an HTTP command of the same service saves it first
            other = app.repository.get(counter.id)
            other.count_one()
            app.save(other)
        mine.count_one()
        return [mine]

    app.react = react
    return app, counter, reactions


async def test_a_reaction_that_lost_a_race_reacts_again_and_applies_once():
    app, counter, reactions = counters_with(saves_meanwhile=1)
    dead_letters = DeadLettersSeen()
    consumer = ReactionConsumer("counters", app, app.react, dead_letters, InlineThreads())
    await consumer.handle([upstream_record()])
    assert dead_letters.errors == [] and reactions[0] == 2
    assert app.repository.get(counter.id).count == 2  # the other command's count, and the reaction's
    await consumer.handle([upstream_record()])  # a redelivery changes nothing
    assert app.repository.get(counter.id).count == 2 and consumer.applied_total == 1


async def test_a_reaction_that_conflicts_every_time_is_dead_lettered_once_and_the_partition_goes_on():
    app, counter, reactions = counters_with(saves_meanwhile=REACTION_ATTEMPTS_MAX)
    dead_letters = DeadLettersSeen()
    consumer = ReactionConsumer("counters", app, app.react, dead_letters, InlineThreads())
    await consumer.handle([upstream_record(1)])
    assert reactions[0] == REACTION_ATTEMPTS_MAX and len(dead_letters.errors) == 1
    assert dead_letters.errors[0].startswith("IntegrityError")
    await consumer.handle([upstream_record(2)])  # follows the dead-lettered one: no gap
    assert consumer.applied_total == 1 and dead_letters.errors[1:] == []


async def test_a_reaction_whose_event_store_is_a_standby_is_redelivered_not_dead_lettered():
    """Right after a failover the database may answer as a read-only standby: eventsourcing
    raises its InternalError from psycopg's ReadOnlySqlTransaction. That is an outage to wait
    out; a dead-lettered event would be tracked, and gone for this reaction."""
    app, counter, _ = counters_with(saves_meanwhile=0)

    def react_on_a_standby(_: IntegrationEvent) -> list[Counter]:
        try:
            raise psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction")
        except psycopg.Error as error:
            raise InternalError(str(error)) from error

    dead_letters = DeadLettersSeen()
    consumer = ReactionConsumer("counters", app, react_on_a_standby, dead_letters, InlineThreads())
    with pytest.raises(InternalError):  # the subscriber backs off and redelivers
        await consumer.handle([upstream_record(1)])
    assert dead_letters.errors == []
    consumer.react = app.react  # the primary is back
    await consumer.handle([upstream_record(1)])
    assert consumer.applied_total == 1 and app.repository.get(counter.id).count == 1
