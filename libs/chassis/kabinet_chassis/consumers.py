"""Idempotent consumers (ARCHITECTURE.md §4).

Tracking is keyed by (consumer, source, topic, partition) -> upstream position and is
written in the same transaction as the consumer's effects. Kafka offsets are only an
optimisation, never the dedupe key: a redelivered or republished event whose position
is not above the tracked one changes nothing.

Tracking by position is only sound if a consumer never passes over an event, and a
broker that lost its data can make it do so: the relay's next events land at offsets
the consumer had already read past, before the relay notices and republishes. So each
record names the position of the event published before it on its partition (header
`previous-position`); a consumer whose tracked position is below that has missed
events, applies nothing from the batch, and reads the partition again from the start.
If the gap is still there when that read meets the record again, the missing events are
not before it: they come after it, where the relay republishes them (with this record)
once it notices what the broker lost. So in a partition read again from its start, a
record that still shows a gap is passed over, neither applied nor tracked, instead of
sending the consumer back to the start forever.

A partition with nothing tracked yet (position 0) is no exception: its first record must
follow position 0 (the relay's first record on a partition does), or events are missing.

Batches take the fast path: one transaction for the whole batch. If that fails with an
error that is not transient, the batch is replayed one event at a time so that only the
poison event goes to the dead-letter topic and the others are applied. A dead-lettered
event is then tracked like an applied one (with no effect): the record after it names its
position as the previous one, and must not look like a gap; a redelivery of the poison is
skipped instead of dead-lettered again. A record whose envelope does not hold here (a field
of a newer contract) but names its source and position is poison the same way (Unreadable).
So a dead letter comes back only through
`replay_dead_letters`, after the fix: it applies each of the consumer's dead letters once,
recording the replay with its effects (its own table, or its own tracking name).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from eventsourcing.persistence import IntegrityError, Tracking
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from kabinet_chassis.databases import DATABASE_DOWN_ERRORS, apply_schema
from kabinet_chassis.eventstore import WorkerThreads
from kabinet_contracts.envelope import PREVIOUS_POSITION_HEADER, SOURCE_CHARS_MAX, SOURCE_PATTERN, IntegrationEvent
from kabinet_contracts.registry import dead_letter_topic

log = logging.getLogger(__name__)
tracer = trace.get_tracer("kabinet.consumers")

MAX_BATCH_RECORDS = 500
# How long the broker may hold a fetch open when a partition has nothing new: short,
# so that a read model lags its source by milliseconds, not half a second.
FETCH_MAX_WAIT_MS = 50
_BACKOFF_START_S = 0.1
_BACKOFF_MAX_S = 5.0

TRACKING_SCHEMA = """
CREATE TABLE IF NOT EXISTS consumer_tracking (
    consumer text NOT NULL,
    source text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    position bigint NOT NULL,
    PRIMARY KEY (consumer, source, topic, partition)
);
-- Dead letters replayed into the consumer after a fix (replay_dead_letters): each once.
CREATE TABLE IF NOT EXISTS consumer_dead_letters_replayed (
    consumer text NOT NULL,
    source text NOT NULL,
    position bigint NOT NULL,
    PRIMARY KEY (consumer, source, position)
)
"""


class PoisonMessage(Exception):
    """The event can never be applied (malformed, unknown type, broken invariant)."""


# The event types a consumer applies, each with the newest schema version it understands.
# None (the default): every event goes to its apply or react, which must decide itself.
Reads = Mapping[str, int]


def is_read(event: IntegrationEvent | Unreadable, reads: Reads | None) -> bool:
    """Whether the consumer applies the event: False for a type it does not read (it passes
    by, tracked with no effect: producers add types); PoisonMessage for a schema version
    newer than it understands (dead-lettered, to replay once it is upgraded), never applied
    as the version it knows; PoisonMessage for an Unreadable record too. A dict lookup per event."""
    if isinstance(event, Unreadable):
        raise PoisonMessage(event.reason)
    if reads is None:
        return True
    newest = reads.get(event.type)
    if newest is None:
        return False
    if event.schema_version > newest:
        raise PoisonMessage(f"{event.type} v{event.schema_version} is newer than this consumer reads (v{newest})")
    return True


class PartitionGap(Exception):
    """Events are missing before this record: the partition must be read again from the start."""

    def __init__(self, topic: str, partition: int, tracked_position: int, previous_position: int) -> None:
        super().__init__(
            f"{topic}[{partition}]: applied up to position {tracked_position}, but the next record follows"
            f" position {previous_position}"
        )
        self.topic = topic
        self.partition = partition


# Errors worth waiting out: the database or the network will come back, a lock or a
# statement timed out. Redelivered, never dead-lettered (a dead-lettered event is tracked:
# gone for this consumer).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    *DATABASE_DOWN_ERRORS,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.LockNotAvailableError,
    asyncpg.QueryCanceledError,
)
# SQLSTATE classes of a database that cannot work now but will, whatever the driver calls
# the error: 08 connection exception, 53 insufficient resources (disk full, out of memory,
# too many connections), 57 operator intervention (shutdown, a cancelled statement), 58
# system error (I/O), XX internal error (a corrupted page or index). Also 42, syntax error
# or access rule violation: the read model's table or a grant is missing (code deployed
# before its migration), or its SQL is wrong; every event would fail alike, so it is the
# consumer to mend, not an event to drop. Before these were classified, a full disk
# dead-lettered (and so tracked, and lost for this consumer) every event that arrived until
# it was freed. What is wrong with an event itself stays poison: data exceptions (22),
# constraint violations (23), and the errors that apply code raises.
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "42", "53", "57", "58", "XX"})
# Single states to wait out: a read-only transaction (a standby answering, as right after a
# failover), serialization failures and deadlocks, a lock or an object in use.
TRANSIENT_SQLSTATES = frozenset({"25006", "40001", "40P01", "55P03", "55006"})
_CAUSES_LOOKED_AT_MAX = 4  # eventsourcing wraps psycopg's error once ("raise ... from e")


def is_transient(error: BaseException) -> bool:
    """Whether to wait the error out (redeliver) rather than dead-letter the event: one of
    TRANSIENT_ERRORS, or a database error, or one it was raised from, whose SQLSTATE says
    the database cannot work now (asyncpg's and psycopg's errors both carry `sqlstate`).
    Only called on the error path."""
    cause: BaseException | None = error
    for _ in range(_CAUSES_LOOKED_AT_MAX):
        if cause is None:
            return False
        if isinstance(cause, TRANSIENT_ERRORS):
            return True
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and (sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES or sqlstate in TRANSIENT_SQLSTATES):
            return True
        cause = cause.__cause__
    return False


# A reaction that lost an optimistic-concurrency race (another command of its service saved
# one of its aggregates meanwhile) reacts again on fresh state, this many times in all; one
# that conflicts every time is poison.
REACTION_ATTEMPTS_MAX = 3


# A consumer is stuck, as its `check` says, past this many failed batches in a row (about
# 3 s of backoff: a blip does not count). It never gives up on a batch (money events must
# not be skipped), so only its check and the log show it waiting.
CONSUMER_FAILED_ROUNDS_MAX = 5
# While it keeps failing, the log says so at the first failures, then once per interval.
FAILURE_LOG_FIRST = 2
FAILURE_LOG_INTERVAL_S = 60.0
ERROR_TEXT_MAX_CHARS = 200


class ConsumerStuck(Exception):
    """The consumer fails every batch: a database that is down, a bug, a dead-letter topic it cannot write."""


@dataclass
class ConsumerHealth:
    failed_rounds: int = 0  # batches in a row that failed; 0 again once one goes through
    last_error: str | None = None  # of the last failed batch, cut to ERROR_TEXT_MAX_CHARS
    failing_since: float | None = None  # time.monotonic() of the first failure in a row
    logged_at: float | None = None  # of the last log line about this run of failures

    def failed(self, error: BaseException) -> bool:
        """Counts a failed batch; True when the log should say so now."""
        now = time.monotonic()
        self.failed_rounds += 1
        self.last_error = f"{type(error).__name__}: {error}"[:ERROR_TEXT_MAX_CHARS]
        if self.failing_since is None:
            self.failing_since = now
        if self.failed_rounds <= FAILURE_LOG_FIRST or self.logged_at is None or now - self.logged_at >= FAILURE_LOG_INTERVAL_S:
            self.logged_at = now
            return True
        return False

    def went_through(self) -> None:
        self.failed_rounds, self.last_error, self.failing_since, self.logged_at = 0, None, None, None

    def check(self, name: str) -> str:
        if self.failed_rounds > CONSUMER_FAILED_ROUNDS_MAX:
            failing_s = time.monotonic() - (self.failing_since or time.monotonic())
            raise ConsumerStuck(f"consumer {name} has failed {self.failed_rounds} batches in a row for {failing_s:.0f}s"
                                f" and waits (nothing is skipped); last error: {self.last_error}")
        return f"{self.failed_rounds} failed batches in a row" if self.failed_rounds else "consuming"


@dataclass(frozen=True)
class Unreadable:
    """A record whose envelope does not hold (a field this consumer's contracts do not know,
    a value out of range) but which names its place in its source's log. It is poison like
    an event that fails to apply (is_read raises PoisonMessage): dead-lettered once, and
    tracked at its position as if applied with no effect. Untracked, the record after it,
    naming its position as the previous one, looked like a gap, and every later record of
    the partition was passed over for good."""

    source: str
    position: int
    reason: str


def parse(record: ConsumerRecord) -> IntegrationEvent | Unreadable | str:
    """The record's envelope; or, if it does not hold, its place in its source's log where
    that can be read (Unreadable); or, if not even that, why the record is poison."""
    try:
        return IntegrationEvent.model_validate_json(record.value)
    except (ValidationError, ValueError, TypeError) as error:
        reason = f"malformed integration event: {error}"
    try:
        raw = json.loads(record.value)
        source, position = raw["source"], raw["position"]
    except (ValueError, TypeError, KeyError):
        return reason
    if (isinstance(source, str) and len(source) <= SOURCE_CHARS_MAX and re.fullmatch(SOURCE_PATTERN, source)
            and type(position) is int and position >= 1):
        return Unreadable(source, position, reason)
    return reason


def tracking_key(record: ConsumerRecord, event: IntegrationEvent | Unreadable) -> tuple[str, str, int]:
    return (event.source, record.topic, record.partition)


def previous_position(record: ConsumerRecord) -> int | None:
    """The relay's previous-position header; None for records from other producers."""
    for name, value in record.headers or ():
        if name == PREVIOUS_POSITION_HEADER:
            return int(value)
    return None


def follows_on(record: ConsumerRecord, tracked_position: int, read_again: set[tuple[str, int]]) -> bool:
    """True when the record may be applied after the tracked position. When it shows events
    between the two, raises PartitionGap, or returns False (pass it over) if its partition
    was already read again from the start (`read_again`) and the gap is still there."""
    previous = previous_position(record)
    # No shortcut for a partition with nothing tracked: its first record must follow 0 too,
    # or the events before it are missing (and would be skipped once it is tracked).
    if previous is None or previous <= tracked_position:
        return True
    if (record.topic, record.partition) in read_again:
        log.warning("%s[%d] offset %d follows position %d, but this consumer applied up to %d: passing over it"
                    " until the events between are republished", record.topic, record.partition, record.offset,
                    previous, tracked_position)
        return False
    raise PartitionGap(record.topic, record.partition, tracked_position, previous)


def trace_parent(record: ConsumerRecord) -> dict[str, str]:
    return {name: value.decode() for name, value in (record.headers or ()) if name in ("traceparent", "tracestate")}


DEAD_LETTER_CONSUMER_HEADER = "dlq-consumer"


DEAD_LETTERED = metrics.get_meter(__name__).create_counter(
    "kabinet.consumer.dead_lettered", unit="{record}",
    description="records a consumer could not apply, sent to <topic>.dlq, by consumer and topic: each waits for a fix"
                " and replay_dead_letters")


@dataclass
class DeadLetters:
    """Publishes poison records to `<topic>.dlq` with the reason in a header."""

    broker: KafkaBroker
    sent_total: int = 0

    async def send(self, record: ConsumerRecord, consumer: str, error: str) -> None:
        headers = {
            "dlq-error": error[:2000],
            DEAD_LETTER_CONSUMER_HEADER: consumer,
            "dlq-source-partition": str(record.partition),
            "dlq-source-offset": str(record.offset),
        }
        await self.broker.publish(
            record.value, topic=dead_letter_topic(record.topic), key=record.key, headers=headers
        )
        self.sent_total += 1
        DEAD_LETTERED.add(1, {"consumer": consumer, "topic": record.topic})
        log.error("dead-lettered %s[%s]@%s for %s: %s", record.topic, record.partition, record.offset, consumer, error)


# Applies new events (in order, none seen before) inside the consumer's transaction.
# It takes a batch so that a read model can write it with a few bulk statements.
ApplyToReadModel = Callable[[asyncpg.Connection, Sequence[IntegrationEvent]], Awaitable[None]]


@dataclass
class ReadModelConsumer:
    """Applies events to an asyncpg read model exactly once."""

    name: str
    pool: asyncpg.Pool
    apply: ApplyToReadModel
    dead_letters: DeadLetters
    reads: Reads | None = None
    applied_total: int = 0
    skipped_total: int = 0
    # (topic, partition) read again from the start because of a gap, not yet past it.
    read_again: set[tuple[str, int]] = field(default_factory=set)
    health: ConsumerHealth = field(default_factory=ConsumerHealth)

    async def check(self) -> str:
        """A watched health check: raises ConsumerStuck past CONSUMER_FAILED_ROUNDS_MAX failed batches in a row."""
        return self.health.check(self.name)

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        # Two parallel lists rather than an object per record: a batch's objects outlive
        # several young-generation collections, and each one kept adds to the full ones.
        good_records: list[ConsumerRecord] = []
        events: list[IntegrationEvent | Unreadable] = []
        for record in records:
            parsed = parse(record)
            if isinstance(parsed, str):
                await self.dead_letters.send(record, self.name, parsed)
            else:
                good_records.append(record)
                events.append(parsed)
        if not events:
            return
        try:
            await self._apply_in_one_transaction(good_records, events)
        except PartitionGap:
            raise
        except Exception as error:
            if is_transient(error):
                raise
            # One of them is poison: find it, apply the rest.
            log.warning("batch of %d for %s failed (%s); applying one by one", len(events), self.name, error)
            for record, event in zip(good_records, events, strict=True):
                try:
                    await self._apply_in_one_transaction([record], [event])
                except PartitionGap:
                    raise
                except Exception as single_error:
                    if is_transient(single_error):
                        raise
                    await self.dead_letters.send(record, self.name, f"{type(single_error).__name__}: {single_error}")
                    await self._track_dead_lettered(record, event)

    async def _apply_in_one_transaction(self, records: Sequence[ConsumerRecord],
                                        events: Sequence[IntegrationEvent | Unreadable]) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            # Sorted, so that two transactions lock the rows in one order (no deadlock).
            keys = sorted({tracking_key(record, event) for record, event in zip(records, events, strict=True)})
            # One round trip locks the tracking row of every (source, topic, partition) of the
            # batch and reads its position; a key never seen gets its row (position 0) first.
            # A SELECT ... FOR UPDATE locked nothing for such a key: two instances of the
            # consumer handling the same records during a rebalance both found no row and
            # both applied the batch. The no-op update is what takes the lock on a row that
            # exists, and a concurrent insert of the same key waits for the other to commit,
            # then returns the position it committed.
            rows = await connection.fetch(
                "INSERT INTO consumer_tracking (consumer, source, topic, partition, position)"
                " SELECT $1, k.source, k.topic, k.partition, 0"
                " FROM unnest($2::text[], $3::text[], $4::integer[]) AS k(source, topic, partition)"
                " ON CONFLICT (consumer, source, topic, partition) DO UPDATE SET position = consumer_tracking.position"
                " RETURNING source, topic, partition, position",
                self.name, *(list(column) for column in zip(*keys, strict=True)),
            )
            tracked = {(row["source"], row["topic"], row["partition"]): row["position"] for row in rows}
            advanced: dict[tuple[str, str, int], int] = {}
            fresh_records: list[ConsumerRecord] = []
            fresh: list[IntegrationEvent] = []
            for record, event in zip(records, events, strict=True):
                key = tracking_key(record, event)
                applied_up_to = advanced.get(key, tracked.get(key, 0))
                if event.position <= applied_up_to or not follows_on(record, applied_up_to, self.read_again):
                    continue
                advanced[key] = event.position
                if is_read(event, self.reads):
                    fresh_records.append(record)
                    fresh.append(event)
            if fresh:
                # Started only once no gap can abort the batch, so every span is ended.
                spans = [self._start_span(record, event) for record, event in zip(fresh_records, fresh, strict=True)]
                try:
                    await self.apply(connection, fresh)
                finally:
                    for span in spans:
                        if span is not None:
                            span.end()
            if advanced:  # events of types it does not read are tracked too: the chain goes on
                await connection.executemany(
                    "INSERT INTO consumer_tracking (consumer, source, topic, partition, position)"
                    " VALUES ($1, $2, $3, $4, $5)"
                    " ON CONFLICT (consumer, source, topic, partition) DO UPDATE SET position = EXCLUDED.position"
                    " WHERE consumer_tracking.position < EXCLUDED.position",
                    [(self.name, *key, position) for key, position in advanced.items()],
                )
        self.applied_total += len(fresh)
        self.skipped_total += len(events) - len(fresh)
        # A partition that followed on again has found what it missed.
        self.read_again.difference_update((topic, partition) for _, topic, partition in advanced)

    async def _track_dead_lettered(self, record: ConsumerRecord, event: IntegrationEvent) -> None:
        """Tracks an event that is now on the dead-letter topic, as if applied with no effect.

        Untracked, it would break the chain: the next record names it as its previous
        position, so the consumer would take that for a gap, read the partition again,
        dead-letter it again and then pass over every later record on the partition.
        """
        source, topic, partition = tracking_key(record, event)
        # The same conditional upsert as for applied events: tracking never moves back.
        await self.pool.execute(
            "INSERT INTO consumer_tracking (consumer, source, topic, partition, position)"
            " VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (consumer, source, topic, partition) DO UPDATE SET position = EXCLUDED.position"
            " WHERE consumer_tracking.position < EXCLUDED.position",
            self.name, source, topic, partition, event.position,
        )
        # It was applied as far as the chain goes: its partition follows on again.
        self.read_again.discard((topic, partition))

    async def replay_dead_letter(self, event: IntegrationEvent) -> bool:
        """Applies a dead-lettered event after a fix, ignoring the tracking that passed over it;
        False when it was replayed before (then it changes nothing)."""
        async with self.pool.acquire() as connection, connection.transaction():
            first_time = await connection.fetchval(
                "INSERT INTO consumer_dead_letters_replayed (consumer, source, position) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING RETURNING true",
                self.name, event.source, event.position,
            )
            if not first_time:
                return False
            if not is_read(event, self.reads):
                return True  # a type it does not read: nothing to apply, and nothing left to replay
            await self.apply(connection, [event])
        self.applied_total += 1
        return True

    def _start_span(self, record: ConsumerRecord, event: IntegrationEvent):
        """A CONSUMER span in the producer's trace, covering the transaction that applies the event."""
        carrier = trace_parent(record)
        if not carrier:
            return None
        span = tracer.start_span(f"{record.topic} process", context=propagate.extract(carrier), kind=SpanKind.CONSUMER)
        span.set_attribute("messaging.system", "kafka")
        span.set_attribute("messaging.consumer.group.name", self.name)
        span.set_attribute("messaging.message.id", str(event.event_id))
        return span


async def ensure_tracking_table(pool: asyncpg.Pool) -> None:
    await apply_schema(pool, "consumer_tracking", TRACKING_SCHEMA)


# An event-sourced reaction: given an upstream event, the aggregates it changed.
React = Callable[[IntegrationEvent], Sequence[Any]]


@dataclass
class ReactionConsumer:
    """Applies events to an eventsourcing application exactly once.

    The application's recorder must be a process recorder (events + tracking in one
    transaction). eventsourcing's `Tracking` is keyed by one name; we use
    `consumer|source|topic|partition` so the key is the same as the read models'.
    """

    name: str
    app: Any  # eventsourcing Application with a ProcessRecorder
    react: React
    dead_letters: DeadLetters
    threads: WorkerThreads
    reads: Reads | None = None
    applied_total: int = 0
    skipped_total: int = 0
    # (topic, partition) read again from the start because of a gap, not yet past it.
    read_again: set[tuple[str, int]] = field(default_factory=set)
    health: ConsumerHealth = field(default_factory=ConsumerHealth)

    async def check(self) -> str:
        """A watched health check: raises ConsumerStuck past CONSUMER_FAILED_ROUNDS_MAX failed batches in a row."""
        return self.health.check(self.name)

    def tracking_name(self, key: tuple[str, str, int]) -> str:
        source, topic, partition = key
        return f"{self.name}|{source}|{topic}|{partition}"

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        for record in records:
            parsed = parse(record)
            if isinstance(parsed, str):
                await self.dead_letters.send(record, self.name, parsed)
                continue
            try:
                applied = await self.threads.run(self._apply_one, record, parsed)
            except PartitionGap:
                raise
            except Exception as error:
                if is_transient(error):
                    raise
                await self.dead_letters.send(record, self.name, f"{type(error).__name__}: {error}")
                # Tracked like an applied event (see the module's docstring): the chain goes on.
                await self.threads.run(self._track_dead_lettered, record, parsed)
                self.read_again.discard((record.topic, record.partition))
            else:
                if applied:  # a partition that followed on again has found what it missed
                    self.read_again.discard((record.topic, record.partition))

    def _apply_one(self, record: ConsumerRecord, event: IntegrationEvent) -> bool:
        name = self.tracking_name(tracking_key(record, event))
        applied_up_to = self.app.recorder.max_tracking_id(name) or 0
        if event.position <= applied_up_to or not follows_on(record, applied_up_to, self.read_again):
            self.skipped_total += 1
            return False
        read = is_read(event, self.reads)
        for attempt in range(1, REACTION_ATTEMPTS_MAX + 1):
            try:
                self._react_and_track(event, name, read)
            except IntegrityError:
                if attempt == REACTION_ATTEMPTS_MAX:
                    raise
                if event.position <= (self.app.recorder.max_tracking_id(name) or 0):
                    self.skipped_total += 1  # the race was with another copy of this consumer: applied there
                    return False
                continue
            if read:
                self.applied_total += 1
            else:
                self.skipped_total += 1
            return True  # tracked: its partition follows on
        raise AssertionError("unreachable")

    def _react_and_track(self, event: IntegrationEvent, tracking_name: str, read: bool) -> None:
        """The reaction's events and the event's tracking under `tracking_name`, in one
        transaction (IntegrityError: a race, look again). A type it does not read: tracked, no effect."""
        aggregates = self.react(event) if read else ()
        events = [domain_event for aggregate in aggregates for domain_event in aggregate.collect_events()]
        self.app.events.put(events, tracking=Tracking(application_name=tracking_name, notification_id=event.position))

    def _track_dead_lettered(self, record: ConsumerRecord, event: IntegrationEvent) -> None:
        """Tracks a dead-lettered event with no events of its own (ReadModelConsumer's rule)."""
        name = self.tracking_name(tracking_key(record, event))
        if event.position <= (self.app.recorder.max_tracking_id(name) or 0):
            return  # already tracked at or past it; eventsourcing refuses to move tracking back
        self.app.recorder.insert_tracking(Tracking(application_name=name, notification_id=event.position))

    async def replay_dead_letter(self, event: IntegrationEvent) -> bool:
        """ReadModelConsumer's rule: applied once after a fix; False when replayed before."""
        return await self.threads.run(self._replay_dead_letter, event)

    def _replay_dead_letter(self, event: IntegrationEvent) -> bool:
        # Its own tracking name per dead letter (no source is named "dead-letter", so it never
        # meets a partition's name): the partition's tracking is already past it.
        name = f"{self.name}|dead-letter|{event.source}|{event.position}"
        read = is_read(event, self.reads)
        for attempt in range(1, REACTION_ATTEMPTS_MAX + 1):
            if self.app.recorder.max_tracking_id(name):
                return False
            try:
                self._react_and_track(event, name, read)
            except IntegrityError:
                if attempt == REACTION_ATTEMPTS_MAX:
                    raise
                continue  # a race with a command of this service, or with another replay: look again
            self.applied_total += read
            return True
        raise AssertionError("unreachable")


REPLAY_RECORDS_MAX = 100_000  # dead-letter records read by one replay, this consumer's or not
REPLAY_FETCH_MS = 200
REPLAY_FAILURES_LISTED_MAX = 100  # in the report; all are counted


@dataclass
class DeadLetterReplay:
    """What a replay of a consumer's dead letters did."""

    applied: int = 0
    already_replayed: int = 0
    # (position, error) of those that failed again (position 0: the envelope cannot be read),
    # the first REPLAY_FAILURES_LISTED_MAX; they stay on the dead-letter topic for the next replay.
    failed: list[tuple[int, str]] = field(default_factory=list)
    failed_total: int = 0

    def add_failure(self, position: int, error: str) -> None:
        self.failed_total += 1
        if len(self.failed) < REPLAY_FAILURES_LISTED_MAX:
            self.failed.append((position, error[:ERROR_TEXT_MAX_CHARS]))


async def replay_dead_letters(
    consumer: ReadModelConsumer | ReactionConsumer,
    bootstrap_servers: str,
    topic: str,
    *,
    records_max: int = REPLAY_RECORDS_MAX,
    timeout_s: float = 300.0,
) -> DeadLetterReplay:
    """Applies the consumer's dead letters of `topic` (those on `<topic>.dlq` it sent there),
    once each, after the fix that lets it apply them. Safe to run again: what was replayed is
    recorded with its effects. They arrive out of order (after the events that followed them);
    the fix must allow for that. A transient error stops the replay (run it again later).
    Reads the dead-letter topic from its beginning to its end as the replay starts."""
    report = DeadLetterReplay()
    dead_letters = dead_letter_topic(topic)
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                              auto_offset_reset="earliest")
    await reader.start()
    try:
        partitions = sorted(reader.partitions_for_topic(dead_letters) or ()) if dead_letters in await reader.topics() else []
        if not partitions:
            return report
        assigned = [TopicPartition(dead_letters, partition) for partition in partitions]
        reader.assign(assigned)
        await reader.seek_to_beginning(*assigned)
        ends = await reader.end_offsets(assigned)
        unread = {tp for tp in assigned if await reader.position(tp) < ends[tp]}
        deadline = asyncio.get_running_loop().time() + timeout_s
        records_read = 0
        while unread:
            if records_read >= records_max or asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"replay of {dead_letters} for {consumer.name} stopped after {records_read} records"
                                   f" ({report}); run it again")
            batch = await reader.getmany(*unread, timeout_ms=REPLAY_FETCH_MS)
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break
                    records_read += 1
                    if dict(record.headers or ()).get(DEAD_LETTER_CONSUMER_HEADER) == consumer.name.encode():
                        await _replay_one(consumer, record, report)
                if await reader.position(tp) >= ends[tp]:
                    unread.discard(tp)
    finally:
        await reader.stop()
    log.info("replayed the dead letters of %s for %s: %s", topic, consumer.name, report)
    return report


async def _replay_one(consumer: ReadModelConsumer | ReactionConsumer, record: ConsumerRecord,
                      report: DeadLetterReplay) -> None:
    parsed = parse(record)
    if isinstance(parsed, str):
        report.add_failure(0, parsed)
        return
    try:
        applied = await consumer.replay_dead_letter(parsed)
    except Exception as error:
        if is_transient(error):
            raise
        report.add_failure(parsed.position, f"{type(error).__name__}: {error}")
        return
    if applied:
        report.applied += 1
    else:
        report.already_replayed += 1


class LostDataWatchdog:
    """Notices that the broker lost the records this subscriber had read, and rewinds.

    A broker that restarts empty (the embedded one keeps nothing) leaves consumers
    positioned past the end of the new, shorter partitions, waiting for offsets that
    will not come for a long time; the relay meanwhile republishes from the start.
    Every few seconds we read back the last record we processed on each partition;
    when it is gone or holds another event, we seek that partition to the beginning.
    Tracking makes the replay harmless.
    """

    def __init__(self, bootstrap_servers: str, topic: str, check_interval_s: float = 2.0) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.check_interval_s = check_interval_s
        self.subscriber: Any = None
        self.last_seen: dict[int, tuple[int, bytes | None]] = {}  # partition -> (offset, value)
        self.rewinds_total = 0

    def saw(self, records: Sequence[ConsumerRecord]) -> None:
        for record in records:
            self.last_seen[record.partition] = (record.offset, record.value)

    async def run(self) -> None:
        from kabinet_chassis.kafka import records_at

        while True:
            await asyncio.sleep(self.check_interval_s)
            aiokafka_consumer = getattr(self.subscriber, "consumer", None)
            if aiokafka_consumer is None or not self.last_seen:
                continue
            marks = dict(self.last_seen)
            try:
                found = await records_at(self.bootstrap_servers, self.topic, {p: o for p, (o, _) in marks.items()})
            except Exception as error:  # the broker may be restarting: look again later
                log.info("watchdog for %s could not read back: %r", self.topic, error)
                continue
            for partition, (offset, value) in marks.items():
                record = found.get(partition)
                if record is None or record.value != value:
                    tp = TopicPartition(self.topic, partition)
                    if tp in aiokafka_consumer.assignment():
                        log.warning("broker lost %s[%d] up to offset %d: rewinding to the beginning", self.topic, partition, offset)
                        await aiokafka_consumer.seek_to_beginning(tp)
                        self.rewinds_total += 1
                    if self.last_seen.get(partition) == (offset, value):
                        del self.last_seen[partition]


async def _no_decoding(message: KafkaMessage) -> None:
    return None


async def _parse_records_only(records: tuple[ConsumerRecord, ...], original_parser) -> KafkaMessage:
    """FastStream's batch parser without its headers dict for every record, which we never
    read (handlers take `raw_message`): FastStream builds the message from the first
    record only, and the message then carries the whole batch, which ack and nack use."""
    message = await original_parser(records[:1])
    message.raw_message = records
    return message


def rewind(aiokafka_consumer: Any, records: Sequence[ConsumerRecord]) -> None:
    """Seeks each partition of the batch back to its first record there, so the batch is read
    again. A partition no longer assigned (a rebalance while the batch was handled) is left
    alone: its next owner starts at the committed offset, which never passed the batch.
    (FastStream's nack stopped at the first such partition with IllegalStateError and left
    the batch's other partitions past it.)"""
    first_offsets: dict[TopicPartition, int] = {}
    for record in records:  # a partition's records come in offset order
        first_offsets.setdefault(TopicPartition(record.topic, record.partition), record.offset)
    assigned = aiokafka_consumer.assignment()
    for topic_partition, offset in first_offsets.items():
        if topic_partition in assigned:
            aiokafka_consumer.seek(topic_partition, offset)


def subscribe(
    broker: KafkaBroker,
    topic: str,
    consumer: ReadModelConsumer | ReactionConsumer,
    *,
    bootstrap_servers: str,
    session_timeout_ms: int,
    max_records: int = MAX_BATCH_RECORDS,
) -> LostDataWatchdog:
    """Registers a FastStream batch subscriber with manual acknowledgement.

    A batch that fails, for whatever reason, is read again from its first record after a
    growing pause, so nothing is skipped; poison has been dead-lettered by then.
    Returns the watchdog, whose `run` the service keeps in the background.
    """
    backoff = {"s": _BACKOFF_START_S}
    watchdog = LostDataWatchdog(bootstrap_servers, topic)

    subscriber = broker.subscriber(
        topic,
        group_id=consumer.name,
        batch=True,
        max_records=max_records,
        ack_policy=AckPolicy.MANUAL,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        session_timeout_ms=session_timeout_ms,
        # A third of it, as Kafka advises: two heartbeats may be lost before the session is.
        heartbeat_interval_ms=session_timeout_ms // 3,
        # We parse and validate envelopes ourselves (poison goes to the DLQ); FastStream's
        # own JSON decoding of every body would only be thrown away.
        parser=_parse_records_only,
        decoder=_no_decoding,
    )

    @subscriber
    async def handle_batch(message: KafkaMessage) -> None:
        records = message.raw_message if isinstance(message.raw_message, tuple) else (message.raw_message,)
        try:
            await consumer.handle(records)
        except PartitionGap as gap:
            # Every partition goes back to its first record of the batch (what was applied
            # is tracked and will be skipped), the one with the gap to its beginning.
            log.warning("%s: %s; reading the partition again from the start", consumer.name, gap)
            rewind(subscriber.consumer, records)
            await subscriber.consumer.seek_to_beginning(TopicPartition(gap.topic, gap.partition))
            # If that read meets the gap again, what is missing comes later: pass over it then.
            consumer.read_again.add((gap.topic, gap.partition))
            await asyncio.sleep(backoff["s"])  # a gap the whole partition cannot fill must not spin
            backoff["s"] = min(backoff["s"] * 2, _BACKOFF_MAX_S)
            return
        except Exception as error:
            # Whatever failed, the batch is read again after a pause. Passed over (as FastStream
            # does with a handler's error under manual acknowledgement), the events after the
            # failure were gone for this process, and for good on a partition where no later
            # record shows the gap: a poison event whose dead letter could not be sent took its
            # whole batch with it. A bug that fails every time stalls the consumer, visibly,
            # rather than lose money events.
            rewind(subscriber.consumer, records)
            health = consumer.health
            if health.failed(error):  # not at every retry: a database down for hours must not flood the log
                level = logging.WARNING if is_transient(error) else logging.ERROR
                log.log(level, "%s: batch failed (%d in a row, for %.0fs): %r; reading it again in %.1fs",
                        consumer.name, health.failed_rounds, time.monotonic() - (health.failing_since or 0.0), error,
                        backoff["s"], exc_info=error if level == logging.ERROR and health.failed_rounds == 1 else None)
            await asyncio.sleep(backoff["s"])
            backoff["s"] = min(backoff["s"] * 2, _BACKOFF_MAX_S)
            return
        except BaseException:
            # Where the next read starts is now unknown: a gap must send it back to the start.
            consumer.read_again.clear()
            raise
        backoff["s"] = _BACKOFF_START_S
        if consumer.health.failed_rounds:
            log.info("%s: going on after %d failed batches in a row", consumer.name, consumer.health.failed_rounds)
            consumer.health.went_through()
        watchdog.saw(records)
        try:
            await message.ack()
        except KafkaError as error:  # a rebalance or a broker restart; tracking already holds the truth
            log.info("%s: offset commit failed (%r); harmless, tracking dedupes", consumer.name, error)

    watchdog.subscriber = subscriber
    return watchdog
