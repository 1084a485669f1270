"""Rules of the event plumbing at its margins (ARCHITECTURE.md §4, ADR-0001): a consumer that
found what a gap had hidden goes back to the start at the next gap again; a replay applies
only the consumer's own dead letters; the relay publishes every public event of a page, however
many and whatever private events sit among them, and chains its records across a restart; a
service's own read model applies
each event once, never past a hole, and notices while quiet that the database lost its last pages."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord

from kabinet_chassis import idempotency, outbox, projection
from kabinet_chassis.consumers import (
    CONSUMER_FAILED_ROUNDS_MAX,
    ConsumerHealth,
    ConsumerStuck,
    PartitionGap,
    ReactionConsumer,
    ReadModelConsumer,
    replay_dead_letters,
)
from kabinet_chassis.databases import create_pool, ensure_database
from kabinet_chassis.eventstore import event_store_env
from kabinet_chassis.projection import LocalProjection, ProjectionStuck
from kabinet_chassis.service import Service
from kabinet_contracts.envelope import PREVIOUS_POSITION_HEADER, IntegrationEvent
from tests.integration.test_events_dead_letters_are_replayed_after_a_fix import (
    a_board_that_dead_lettered_position_2,
    apply_to_board_fixed,
)
from tests.integration.test_local_projection import SEEN_SCHEMA, apply_seen, recorded_pairs
from tests.integration.test_outbox_to_consumer import _read_all, board, eventually, topic_for, tracked_position
from tests.support import notes
from tests.support.notes import BOARD_SCHEMA, Note, Notes, apply_to_board, build_notes_service
from tests.unit.test_reaction_conflicts import Counter, Counters, DeadLettersSeen, InlineThreads

pytestmark = pytest.mark.integration

TOPIC = "elsewhere.events.v1"


def chained_record(position: int, previous: int, payload: dict | None = None) -> ConsumerRecord:
    """The record the relay of "elsewhere" publishes for `position` on partition 0, after `previous`."""
    event = IntegrationEvent(
        event_id=uuid.uuid4(),
        type="notes.note_written",
        schema_version=1,
        source="elsewhere",
        position=position,
        aggregate_id=f"note-{position}",
        aggregate_version=1,
        occurred_at=datetime.now(UTC),
        payload={"text": f"text {position}"} if payload is None else payload,
    )
    value = event.json_bytes()
    return ConsumerRecord(
        TOPIC,
        0,
        position - 1,
        0,
        0,
        event.aggregate_id.encode(),
        value,
        None,
        1,
        len(value),
        [(PREVIOUS_POSITION_HEADER, str(previous).encode())],
    )


def a_poison_record(position: int, previous: int) -> ConsumerRecord:
    return chained_record(position, previous, payload={})  # a note without text: the board cannot apply it


def board_service_without_a_broker(stack, unique_name: str) -> tuple[Service, dict]:
    """A board whose consumer is handed records directly (no subscription, no broker)."""
    service = Service(stack.service_settings(f"{unique_name}_b"), title="noteboard")
    parts: dict = {}

    @service.on_start
    async def start(svc: Service) -> None:
        async with svc.pool.acquire() as connection:
            await connection.execute(BOARD_SCHEMA)
        parts["consumer"] = ReadModelConsumer(f"{unique_name}_board", svc.pool, apply_to_board, DeadLettersSeen())

    return service, parts


# --- Consumers: a partition read again goes back to the start at its next gap ------------------


@pytest.mark.parametrize("what_followed_on", ["an applied event", "a dead-lettered event"])
async def test_a_partition_that_followed_on_again_goes_back_to_the_start_at_its_next_gap_not_past_it(stack, unique_name, what_followed_on):
    """A partition read again from its start because of a gap passes over a record that still
    shows one (the missing events come after it). Once a record follows on again, what was
    missing is found: a later gap is new, and must send the consumer back to the start again,
    not be passed over (its records were gone for this read model for good)."""
    board_service, parts = board_service_without_a_broker(stack, unique_name)
    async with board_service.running():
        consumer = parts["consumer"]
        consumer.read_again.add((TOPIC, 0))  # as the subscriber leaves it after a gap
        follows_on = chained_record(1, 0) if what_followed_on == "an applied event" else a_poison_record(1, 0)
        await consumer.handle([follows_on])
        assert await tracked_position(board_service, consumer.name, TOPIC) == 1
        with pytest.raises(PartitionGap):
            await consumer.handle([chained_record(3, 2)])  # position 2 is missing
        assert "note-3" not in await board(board_service)
        assert await tracked_position(board_service, consumer.name, TOPIC) == 1


@pytest.mark.parametrize("what_followed_on", ["an applied event", "a dead-lettered event"])
async def test_a_reaction_whose_partition_followed_on_again_goes_back_to_the_start_at_its_next_gap(what_followed_on):
    """The same rule for event-sourced reactions (ReactionConsumer)."""
    app = Counters()
    counter = Counter("c")
    app.save(counter)

    def count(upstream: IntegrationEvent) -> list[Counter]:
        if "text" not in upstream.payload:
            raise ValueError("note event without text")
        mine = app.repository.get(counter.id)
        mine.count_one()
        return [mine]

    dead_letters = DeadLettersSeen()
    consumer = ReactionConsumer("counters", app, count, dead_letters, InlineThreads())
    consumer.read_again.add((TOPIC, 0))
    follows_on = chained_record(1, 0) if what_followed_on == "an applied event" else a_poison_record(1, 0)
    await consumer.handle([follows_on])
    with pytest.raises(PartitionGap):
        await consumer.handle([chained_record(3, 2)])
    assert app.repository.get(counter.id).count == (1 if what_followed_on == "an applied event" else 0)


# --- Consumers: a replay applies the consumer's own dead letters only --------------------------


async def apply_while_the_database_is_down(connection, events) -> None:
    raise ConnectionResetError("the database went away")


async def test_a_replay_applies_only_the_consumers_own_dead_letters_and_stops_at_an_outage(stack, unique_name):
    """Two read models read one topic; only the board failed on position 2. A replay for the other
    one, which applied position 2 when it came, must not apply it a second time. A replay that
    meets a database that is down stops there, rather than report the dead letter as failing
    for good and go on."""
    async with a_board_that_dead_lettered_position_2(stack, unique_name) as (board_service, consumer, topic):
        # Another read model of the same events (its own name), which applies a note without text.
        other = ReadModelConsumer(f"{consumer.name}_other", board_service.pool, apply_to_board_fixed, consumer.dead_letters)
        replay = await replay_dead_letters(other, stack.bootstrap_servers, topic)
        assert (replay.applied, replay.already_replayed, replay.failed_total) == (0, 0, 0)
        assert "note-2" not in await board(board_service)
        # The board's replay while its database is down stops (to be run again), marking nothing replayed ...
        consumer.apply = apply_while_the_database_is_down
        with pytest.raises(ConnectionResetError):
            await replay_dead_letters(consumer, stack.bootstrap_servers, topic)
        # ... and after its fix, it still finds its dead letter.
        consumer.apply = apply_to_board_fixed
        own = await replay_dead_letters(consumer, stack.bootstrap_servers, topic)
        assert (own.applied, own.failed) == (1, [])
        assert (await board(board_service))["note-2"] == ("", 1)


async def test_a_dead_letter_of_a_type_the_read_model_no_longer_reads_is_replayed_with_no_effect(stack, unique_name):
    """A consumer upgraded to stop reading a type (its dead letters of that type still wait):
    the replay marks them done and applies nothing, as the consumer would pass the type by."""
    board_service, parts = board_service_without_a_broker(stack, unique_name)
    async with board_service.running():
        consumer = parts["consumer"]
        consumer.reads = {"notes.note_archived": 1}
        dead_letter = IntegrationEvent.model_validate_json(chained_record(2, 1).value)
        assert await consumer.replay_dead_letter(dead_letter) is True
        assert await consumer.replay_dead_letter(dead_letter) is False
        assert await board(board_service) == {}


async def test_a_dead_letter_of_a_type_the_reaction_no_longer_reads_is_replayed_with_no_effect():
    app = Counters()
    counter = Counter("c")
    app.save(counter)

    def count(_: IntegrationEvent) -> list[Counter]:
        mine = app.repository.get(counter.id)
        mine.count_one()
        return [mine]

    consumer = ReactionConsumer("counters", app, count, DeadLettersSeen(), InlineThreads(), reads={"notes.note_archived": 1})
    dead_letter = IntegrationEvent.model_validate_json(chained_record(2, 1).value)
    assert await consumer.replay_dead_letter(dead_letter) is True
    assert await consumer.replay_dead_letter(dead_letter) is False
    assert app.repository.get(counter.id).count == 0 and consumer.applied_total == 0


# --- The relay: every public event of a page, chained across a restart ------------------------


def private_when_text_starts_with_private(source: str, public_mapping=notes.note_to_integration):
    public = public_mapping(source)

    def to_integration(domain_event, position: int) -> IntegrationEvent | None:
        return None if domain_event.text.startswith("private") else public(domain_event, position)

    return to_integration


async def published_positions(stack, topic: str, expected: int) -> list[int]:
    records = await _read_all(stack.bootstrap_servers, topic, expected=expected)
    return sorted(json.loads(record.value)["position"] for record in records)


async def test_a_private_event_in_a_page_keeps_it_private_and_the_public_events_after_it_are_published(stack, unique_name, monkeypatch):
    monkeypatch.setattr(notes, "note_to_integration", private_when_text_starts_with_private)
    topic = topic_for(unique_name)
    notes_service, notes_parts = build_notes_service(stack.service_settings(unique_name), topic)
    async with notes_service.running():
        relay = notes_parts["relay"]
        note = Note(text="public 1")
        note.edit("private 2")
        note.edit("public 3")
        note.edit("public 4")
        notes_parts["app"].save(note)  # one commit: one page

        async def relayed_all() -> bool:
            return relay.position == 4

        await eventually(relayed_all, what="the relay to record the page")
        records = await _read_all(stack.bootstrap_servers, topic, expected=3, timeout_s=5)
        assert sorted(json.loads(record.value)["position"] for record in records) == [1, 3, 4]
        assert not [record for record in records if b"private" in record.value]


def producer_with_small_batches(bootstrap_servers: str, enable_idempotence: bool) -> AIOKafkaProducer:
    """The relay's producer, but a record batch holds a few of the test's records, not thousands."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers, enable_idempotence=enable_idempotence, acks="all", linger_ms=2, max_batch_size=2048
    )


EDITS = 9


async def test_a_page_of_one_aggregate_larger_than_a_record_batch_is_published_whole(stack, unique_name, monkeypatch):
    """A page's events for one partition fill several record batches: the record that did not fit
    in a full batch opens the next one, none is dropped."""
    monkeypatch.setattr(outbox, "new_producer", producer_with_small_batches)
    topic = topic_for(unique_name)
    notes_service, notes_parts = build_notes_service(stack.service_settings(unique_name), topic)
    async with notes_service.running():
        relay = notes_parts["relay"]
        note = Note(text="v0 " + "x" * 100)
        for version in range(1, EDITS + 1):
            note.edit(f"v{version} " + "x" * 100)
        notes_parts["app"].save(note)  # one commit: one page, one partition

        async def relayed_all() -> bool:
            return relay.position == EDITS + 1

        await eventually(relayed_all, what="the relay to record the page")
        assert await published_positions(stack, topic, EDITS + 1) == list(range(1, EDITS + 2))


async def test_the_relay_keeps_the_offset_of_the_last_record_it_published_where_the_broker_holds_it(stack, unique_name):
    """What the relay reads back to learn whether the broker lost its data: the offset of its
    last record on each partition. Taken from a batch's first record instead, a broker holding
    everything would show another event there, and the relay would republish the whole history."""
    topic = topic_for(unique_name)
    notes_service, notes_parts = build_notes_service(stack.service_settings(unique_name), topic)
    async with notes_service.running():
        relay = notes_parts["relay"]
        note = Note(text="v0")
        for version in range(1, 4):
            note.edit(f"v{version}")
        notes_parts["app"].save(note)  # one commit: one page, one record batch on one partition

        async def relayed_all() -> bool:
            return relay.position == 4

        await eventually(relayed_all, what="the relay to record the page")
        records = await _read_all(stack.bootstrap_servers, topic, expected=4, timeout_s=5)
        [(partition, (offset, position))] = relay.last_published.items()
        at_offset = [r for r in records if (r.partition, r.offset) == (partition, offset)]
        assert position == 4 and [json.loads(r.value)["position"] for r in at_offset] == [4], relay.last_published


async def test_a_relay_started_again_chains_its_next_record_to_the_last_one_it_published_on_that_partition(stack, unique_name):
    """Each record names the position published before it on its partition, so that a consumer
    can tell when it missed events. A relay that restarted (a deploy, a failover) knows it from
    its recorded state: its first record must not claim to follow position 0, which any consumer
    takes for "nothing missing"."""
    topic = topic_for(unique_name)
    settings = stack.service_settings(unique_name)
    first_run, first_parts = build_notes_service(settings, topic)
    async with first_run.running():
        note_id = first_parts["app"].write("v1")

        async def relayed_the_note() -> bool:
            return first_parts["relay"].position == 1

        await eventually(relayed_the_note, what="the first relay to record the note")
    second_run, second_parts = build_notes_service(settings, topic)
    async with second_run.running():
        second_parts["app"].edit(note_id, "v2")  # the same aggregate: the same partition

        async def relayed_the_edit() -> bool:
            return second_parts["relay"].position == 2

        await eventually(relayed_the_edit, what="the second relay to record the edit")
        records = await _read_all(stack.bootstrap_servers, topic, expected=2)
        previous = {json.loads(r.value)["position"]: dict(r.headers)[PREVIOUS_POSITION_HEADER] for r in records}
        assert previous == {1: b"0", 2: b"1"}


# --- A service's own read model -----------------------------------------------------------------


async def seen_projection(service: Service, app: Notes, name: str = "seen") -> LocalProjection:
    async with service.pool.acquire() as connection:
        await connection.execute(SEEN_SCHEMA)
    built = LocalProjection(
        name, pool=service.pool, recorder=app.recorder, mapper=app.mapper, apply_page=apply_seen, threads=service.threads
    )
    await built.start()
    return built


async def seen_texts(service: Service) -> list[str]:
    return [row["text"] for row in await service.pool.fetch("SELECT text FROM seen ORDER BY position")]


async def test_a_handed_over_page_with_a_hole_inside_is_not_applied_as_is_the_log_fills_the_hole(stack, unique_name):
    """A writer's page must run without a gap to be applied as handed over: one with an event
    missing inside would show a history (and a running balance) without it."""
    service = Service(stack.service_settings(unique_name), title="seen")
    async with service.running():
        app = Notes(env=event_store_env(service.settings))
        seen = await seen_projection(service, app)
        first, middle, last = recorded_pairs(app, "one"), recorded_pairs(app, "two"), recorded_pairs(app, "three")
        seen.notify([*first, *last])  # starts right after the position, but skips "two"
        while await seen.catch_up_once():
            pass
        assert await seen_texts(service) == ["one", "two", "three"]
        assert seen.position == last[-1][0] and middle[-1][0] < last[-1][0]
        app.close()


async def test_two_copies_of_a_read_model_apply_each_event_once_whichever_applied_it_first(stack, unique_name):
    """Two processes of one service keep one read model (one name, one table): the one behind
    finds the other's position stored and applies only what comes after it."""
    service = Service(stack.service_settings(unique_name), title="seen")
    async with service.running():
        app = Notes(env=event_store_env(service.settings))
        ahead, behind = await seen_projection(service, app), await seen_projection(service, app)
        first = recorded_pairs(app, "one")
        ahead.notify(first)
        behind.notify(first)
        assert await ahead.catch_up_once()
        second = recorded_pairs(app, "two")
        behind.notify(second)
        while await behind.catch_up_once():  # its first page is the one the other applied
            pass
        assert await seen_texts(service) == ["one", "two"]
        assert behind.position == second[-1][0]
        app.close()


async def test_a_quiet_read_model_notices_that_the_database_lost_its_last_pages_and_applies_them_again(stack, unique_name, monkeypatch):
    """Pages are committed without waiting for the flush, so a server crash can take the last ones
    back. When nothing new is written after it, the projection must still find out (its stored
    position went back) and apply them again, not leave them missing until the next event."""
    monkeypatch.setattr(projection, "STORED_POSITION_CHECK_S", 0.0)
    service = Service(stack.service_settings(unique_name), title="seen")
    async with service.running():
        app = Notes(env=event_store_env(service.settings))
        seen = await seen_projection(service, app)
        first, second = recorded_pairs(app, "kept"), recorded_pairs(app, "lost in the crash")
        seen.notify([*first, *second])
        assert await seen.catch_up_once()
        async with service.pool.acquire() as connection:  # what crash recovery leaves
            await connection.execute("DELETE FROM seen WHERE position = $1", second[-1][0])
            await connection.execute("UPDATE projection_position SET position = $1 WHERE projection = 'seen'", first[-1][0])
        for _ in range(5):  # bounded: one pass notices the loss, the next applies the page again
            if not await seen.catch_up_once():
                break
        assert await seen_texts(service) == ["kept", "lost in the crash"]
        assert seen.position == second[-1][0]
        app.close()


# --- Idempotency keys -----------------------------------------------------------------------------


async def test_expired_idempotency_keys_beyond_one_purge_batch_are_all_purged_in_one_round(stack, unique_name, monkeypatch):
    """Keys are purged in bounded batches; a backlog larger than one batch (a purge that could not
    run for a while) is worked off batch after batch, not one batch per hour."""
    monkeypatch.setattr(idempotency, "PURGE_BATCH_MAX", 3)
    settings = stack.service_settings(unique_name)  # no service: its own purge loop would race this one
    await ensure_database(settings.database_url, settings.service_name)
    pool = await create_pool(settings.service_database_url, max_size=2)
    try:
        await idempotency.ensure_schema(pool)
        await pool.execute(
            "INSERT INTO idempotency_keys (scope, key, request_fingerprint, status_code, response, created_at)"
            " SELECT 'test', 'old-' || n, 'f', 200, '{}', now() - make_interval(secs => $1)"
            " FROM generate_series(1, 7) AS n",
            float(idempotency.KEY_RETENTION_S + 86_400),
        )
        await pool.execute(
            "INSERT INTO idempotency_keys (scope, key, request_fingerprint, status_code, response)"
            " VALUES ('test', 'recent', 'f', 200, '{}')"
        )
        assert await idempotency.purge_expired(pool) == 7
        assert [row["key"] for row in await pool.fetch("SELECT key FROM idempotency_keys")] == ["recent"]
    finally:
        await pool.close()


# --- Health: a blip is not stuck, one failure more is --------------------------------------------


def test_a_consumer_is_stuck_only_past_its_failed_batches_max():
    health = ConsumerHealth()
    for _ in range(CONSUMER_FAILED_ROUNDS_MAX):
        health.failed(ConnectionError("the database restarts"))
    assert health.check("board") == f"{CONSUMER_FAILED_ROUNDS_MAX} failed batches in a row"
    health.failed(ConnectionError("the database restarts"))
    with pytest.raises(ConsumerStuck, match="ConnectionError: the database restarts"):
        health.check("board")
    health.went_through()
    assert health.check("board") == "consuming"


async def test_a_relay_and_a_read_model_are_stuck_only_past_their_failed_rounds_max(stack, unique_name):
    service = Service(stack.service_settings(unique_name), title="seen")
    async with service.running():
        app = Notes(env=event_store_env(service.settings))
        seen = await seen_projection(service, app)
        relay = outbox.OutboxRelay(
            outbox.RelayConfig(source=unique_name, topic=topic_for(unique_name), bootstrap_servers=stack.bootstrap_servers),
            recorder=app.recorder,
            mapper=app.mapper,
            to_integration=notes.note_to_integration(unique_name),
            database_url=service.settings.service_database_url,
        )
        relay.failed_rounds, seen.failed_rounds = relay.config.failed_rounds_max, seen.failed_rounds_max
        assert await relay.check() == f"starting ({relay.failed_rounds} failed rounds in a row)"
        assert await seen.check() == f"at position {seen.position}"
        relay.failed_rounds, seen.failed_rounds = relay.failed_rounds + 1, seen.failed_rounds + 1
        with pytest.raises(outbox.RelayStuck):
            await relay.check()
        with pytest.raises(ProjectionStuck):
            await seen.check()
        app.close()
