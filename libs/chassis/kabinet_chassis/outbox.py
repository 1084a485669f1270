"""The outbox relay (ARCHITECTURE.md §4).

eventsourcing's notification log is the outbox: events and notification rows commit
in one transaction. The relay, one per service and leader by advisory lock, reads the
log after its tracked position, maps each domain event to a public integration event,
publishes it keyed by aggregate id, then records its position. A crash between the
two republishes; consumers are idempotent, so that is safe.

It also remembers, for every partition, the offset and log position of the last event
it published there. Every few seconds it reads those records back; when one is gone or
holds another event, the broker restarted and lost its data (as the embedded one does)
and the relay republishes from the start of the log. (We read records back rather than
compare high watermarks: the embedded broker reports those unreliably.)

The relay retries every error for ever, so its loop never dies and /health/live never
names it. Instead it keeps how many rounds in a row failed, the last error and when it
last made progress (recorded a page, or found nothing to publish); `check`, watched in
the service's /health/ready, is down once the relay is stuck (ARCHITECTURE.md §8).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from eventsourcing.persistence import Notification
from eventsourcing.postgres import PostgresApplicationRecorder
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind

from kabinet_chassis.databases import DATABASE_COMMAND_TIMEOUT_S, DATABASE_CONNECT_TIMEOUT_S, wait_for_lead
from kabinet_chassis.eventstore import TracingMapper, events_table, notifications_after
from kabinet_chassis.kafka import (
    DEFAULT_PARTITIONS,
    BrokerDidNotAnswer,
    ensure_topics,
    new_producer,
    partition_for_key,
    records_at,
)
from kabinet_contracts.envelope import PREVIOUS_POSITION_HEADER, IntegrationEvent

log = logging.getLogger(__name__)
tracer = trace.get_tracer("kabinet.outbox")

# A leading relay is stuck, and /health/ready shows it, once more rounds than this failed
# in a row (about 3 s of backoff: a broker or database blip does not count) ...
RELAY_FAILED_ROUNDS_MAX = 5
# ... or once it went this long without progress while events wait (a hang, no error).
RELAY_STALL_MAX_S = 60.0
BACKOFF_FIRST_S = 0.1
# A relay failing every round (a database down for hours) logs the traceback of its first
# failures, then one line per interval: a traceback per round buried the service's log.
FAILURE_LOG_FIRST = 2
FAILURE_LOG_INTERVAL_S = 60.0
# The most a stopping relay waits for its producer to hand over what it holds: with the broker
# gone it would wait out a request timeout, and the ledger's last sealing pass after it. Nothing
# is lost: the position moves only past what the broker acknowledged; the rest goes at the next start.
PRODUCER_STOP_WAIT_S = 2.0
ERROR_TEXT_MAX_CHARS = 200

_meter = metrics.get_meter(__name__)
RELAY_POSITION = _meter.create_gauge(
    "kabinet.outbox.relay.position", unit="{event}",
    description="the notification id of the last event the leading relay published, by source; the events"
                " committed after it wait in the outbox")
RELAY_PUBLISHED = _meter.create_counter(
    "kabinet.outbox.relay.published", unit="{record}",
    description="records the relay published and the broker acknowledged, by source (republished ones too)")

# Maps one stored domain event to its public form; None keeps an event private.
ToIntegration = Callable[[Any, int], IntegrationEvent | None]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox_relay_position (
    source text PRIMARY KEY,
    position bigint NOT NULL,
    last_published jsonb NOT NULL DEFAULT '{}'::jsonb
)
"""


@dataclass(frozen=True)
class RelayConfig:
    source: str
    topic: str
    bootstrap_servers: str
    enable_idempotence: bool = False
    partitions: int = DEFAULT_PARTITIONS
    replication_factor: int = 1  # of the topic, if the relay creates it (ServiceSettings.kafka_replication_factor)
    page_size: int = 5000
    idle_poll_s: float = 0.02
    broker_check_interval_s: float = 2.0
    backoff_max_s: float = 5.0
    failed_rounds_max: int = RELAY_FAILED_ROUNDS_MAX
    stall_max_s: float = RELAY_STALL_MAX_S
    # Bounds every statement on the relay's own connections, and their closing, as the
    # service's pool bounds its queries (ARCHITECTURE.md §7): a connection that answers
    # nothing (a network black hole) fails the round, and the next one connects afresh.
    database_command_timeout_s: float = DATABASE_COMMAND_TIMEOUT_S


class RelayStuck(Exception):
    """The relay leads but publishes nothing: a mapping bug, a poison event, a hung broker."""


class OutboxRelay:
    def __init__(
        self,
        config: RelayConfig,
        *,
        recorder: PostgresApplicationRecorder,  # only where its table is: the relay reads it itself
        mapper: TracingMapper,
        to_integration: ToIntegration,
        database_url: str,
        on_page_published: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.mapper = mapper
        self.to_integration = to_integration
        self.database_url = database_url
        # The notification log, read on the relay's own connection while the event loop
        # maps the previous page (eventstore.notifications_after).
        self._events_table = events_table(recorder)
        # Called after a page is on the broker and before its position is recorded:
        # the exact window a crash must survive (fault-injection tests use it).
        self.on_page_published = on_page_published
        self.position = 0
        # partition -> (offset, position) of the last event published there
        self.last_published: dict[int, tuple[int, int]] = {}
        # partition -> position of the last event sent there, acknowledged or not; each
        # record names it in its previous-position header (consumers.py checks the chain)
        self._last_sent: dict[int, int] = {}
        self.is_leader = False
        # Set while the relay leads with its producer started and its topic in place.
        self.relaying = asyncio.Event()
        self.published_total = 0
        # Health (see `check`): set while another process holds the relay's lock.
        self.is_standby = False
        self.failed_rounds = 0  # rounds in a row that ended in an error; 0 again on progress
        self.last_error: str | None = None  # of the last failed round, cut to ERROR_TEXT_MAX_CHARS
        self.last_progress_at = time.monotonic()  # a page recorded, nothing to publish, or the lead taken
        self._failure_logged_at = 0.0  # time.monotonic() of the last log line about failed rounds

    async def run(self) -> None:
        """Run until cancelled: wait for leadership, then relay; back off on errors."""
        while True:
            try:
                await self._run_as_leader()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.failed_rounds += 1
                self.last_error = f"{type(error).__name__}: {error}"[:ERROR_TEXT_MAX_CHARS]
                backoff_s = min(BACKOFF_FIRST_S * 2 ** min(self.failed_rounds - 1, 10), self.config.backoff_max_s)
                now = time.monotonic()
                if self.failed_rounds <= FAILURE_LOG_FIRST or now - self._failure_logged_at >= FAILURE_LOG_INTERVAL_S:
                    self._failure_logged_at = now
                    log.error("outbox relay for %s failed (%d rounds in a row): %s; retrying in %.1fs",
                              self.config.source, self.failed_rounds, self.last_error, backoff_s,
                              exc_info=error if self.failed_rounds <= FAILURE_LOG_FIRST else None)
                await asyncio.sleep(backoff_s)

    async def check(self) -> str:
        """The watched health check: raises RelayStuck, naming the last error and how long the
        relay has made no progress, once it failed more than `failed_rounds_max` rounds in
        a row or made no progress for `stall_max_s` (it counts finding nothing to publish
        as progress, so that means events wait). A standby relay is healthy."""
        if self.is_standby:
            return "standby: another process holds the relay's lock"
        stuck_s = time.monotonic() - self.last_progress_at
        if self.failed_rounds > self.config.failed_rounds_max or stuck_s > self.config.stall_max_s:
            raise RelayStuck(
                f"no progress for {stuck_s:.0f}s at position {self.position}, {self.failed_rounds} failed rounds"
                f" in a row; last error: {self.last_error or 'none (hung?)'}"
            )
        if self.is_leader:
            return f"leading at position {self.position}"
        return f"starting ({self.failed_rounds} failed rounds in a row)"

    def _made_progress(self) -> None:
        self.failed_rounds = 0
        self.last_error = None
        self.last_progress_at = time.monotonic()

    async def _run_as_leader(self) -> None:
        lock_connection = await self._connect()
        try:
            await lock_connection.execute(_SCHEMA)
            await self._wait_for_lead(lock_connection)
            self.is_leader = True
            await self._load_position(lock_connection)
            read_connection = await self._connect()
            producer = new_producer(self.config.bootstrap_servers, self.config.enable_idempotence)
            try:
                await producer.start()
                await self._relay_loop(lock_connection, read_connection, producer)
            finally:
                try:
                    async with asyncio.timeout(PRODUCER_STOP_WAIT_S):
                        await producer.stop()
                except TimeoutError:
                    log.warning("the relay's producer did not stop within %g s (the broker does not answer); left"
                                " behind, its unacknowledged events go again at the next start", PRODUCER_STOP_WAIT_S)
                await self._close(read_connection)
        finally:
            self.is_leader = False
            self.relaying.clear()
            await self._close(lock_connection)

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.database_url, timeout=DATABASE_CONNECT_TIMEOUT_S,
                                     command_timeout=self.config.database_command_timeout_s)

    async def _close(self, connection: asyncpg.Connection) -> None:
        """Closes politely, or drops the connection when the server does not answer in time
        (asyncpg aborts it itself then): the round's own error is the one to report."""
        with contextlib.suppress(Exception):
            await connection.close(timeout=self.config.database_command_timeout_s)

    async def _wait_for_lead(self, connection: asyncpg.Connection) -> None:
        """Takes the relay's lock; while another process holds it, this relay is a standby.
        (The first try is wait_for_lead's own query: a lock taken at once, as after a
        failed round of our own, is no standby.)"""
        lock = f"outbox_relay:{self.config.source}"
        if await connection.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", lock):
            return
        self.is_standby = True
        try:
            await wait_for_lead(connection, lock)
        finally:
            self.is_standby = False
        self._made_progress()  # taking over from another process starts the count and the clock afresh

    async def _load_position(self, connection: asyncpg.Connection) -> None:
        await connection.execute(
            "INSERT INTO outbox_relay_position (source, position) VALUES ($1, 0) ON CONFLICT DO NOTHING",
            self.config.source,
        )
        row = await connection.fetchrow(
            "SELECT position, last_published FROM outbox_relay_position WHERE source = $1", self.config.source
        )
        self.position = row["position"]
        RELAY_POSITION.set(self.position, {"source": self.config.source})
        self.last_published = {int(k): tuple(v) for k, v in json.loads(row["last_published"]).items()}
        self._last_sent = {partition: position for partition, (_, position) in self.last_published.items()}

    async def _relay_loop(self, connection: asyncpg.Connection, read_connection: asyncpg.Connection, producer) -> None:
        """Pipelined: while page n is mapped and sent, page n+1 is read from the database
        and the broker acknowledges page n-1.

        A page's position is recorded only once all of its events are acknowledged.
        """
        await ensure_topics(self.config.bootstrap_servers, [self.config.topic], self.config.partitions,
                                self.config.replication_factor)
        await self._republish_if_broker_lost_data(connection)
        last_check = asyncio.get_running_loop().time()
        read_position = self.position
        in_flight: tuple[int, list] | None = None  # (last position of the page, its deliveries)
        next_page: asyncio.Future | None = None  # the read of the page after read_position
        self.relaying.set()
        try:
            while True:
                notifications = await (next_page or self._read_page_after(read_connection, read_position))
                next_page = None
                sent: tuple[int, list] | None = None
                if notifications:
                    read_position = notifications[-1].id
                    next_page = self._read_page_after(read_connection, read_position)
                    sent = (read_position, await self._send_page(producer, notifications))
                if in_flight is not None:
                    if await self._complete(connection, *in_flight):
                        self._made_progress()
                    else:
                        # The broker lost data: drop what is in flight, republish from the start.
                        sent, read_position = None, 0
                        next_page = await _discarded(next_page)
                elif not notifications:
                    self._made_progress()  # nothing to publish
                in_flight = sent
                if in_flight is None:
                    now = asyncio.get_running_loop().time()
                    if now - last_check >= self.config.broker_check_interval_s:
                        await self._republish_if_broker_lost_data(connection)
                        read_position = self.position
                        last_check = now
                    await asyncio.sleep(self.config.idle_poll_s)
        finally:
            await _discarded(next_page)

    def _read_page_after(self, read_connection: asyncpg.Connection, position: int) -> asyncio.Future:
        """Starts reading the page after `position`; the event loop maps and sends meanwhile."""
        return asyncio.ensure_future(self._read_page(read_connection, position))

    async def _read_page(self, read_connection: asyncpg.Connection, after_position: int) -> list[Notification]:
        return await notifications_after(read_connection, self._events_table, after_position, self.config.page_size)

    async def _send_page(self, producer, notifications: Sequence[Notification]) -> list[tuple[Any, list[int]]]:
        """Build one record batch per partition and hand them to the producer.

        Batches rather than `send()` per event: the per-message future and coroutine of
        `send()` cost more than everything else the relay does for an event.
        Returns (delivery future, positions in the batch) pairs.
        """
        partitions = sorted(await producer.partitions_for(self.config.topic))
        open_batches: dict[int, tuple[Any, list[int]]] = {}
        deliveries: list[tuple[Any, list[int]]] = []
        for notification in notifications:
            domain_event, carrier = self.mapper.to_domain_event_with_trace(notification)
            integration_event = self.to_integration(domain_event, notification.id)
            if integration_event is None:
                continue
            key = integration_event.aggregate_id.encode()
            value = integration_event.json_bytes()
            # The partition aiokafka's send() would choose: a key keeps its partition.
            partition = partition_for_key(key, partitions)
            headers = self._headers(integration_event, carrier, self._last_sent.get(partition, 0))
            self._last_sent[partition] = notification.id
            batch, positions = open_batches.get(partition) or (producer.create_batch(), [])
            if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:  # full: send it
                deliveries.append((await producer.send_batch(batch, self.config.topic, partition=partition), positions))
                batch, positions = producer.create_batch(), []
                # An empty batch takes its first record whatever its size (aiokafka's record
                # builder). One past the broker's limit is refused there, not retried
                # (MessageSizeTooLargeError): the round fails on every retry and `check` says stuck.
                batch.append(timestamp=None, key=key, value=value, headers=headers)
            positions.append(notification.id)
            open_batches[partition] = (batch, positions)
        for partition, (batch, positions) in open_batches.items():
            deliveries.append((await producer.send_batch(batch, self.config.topic, partition=partition), positions))
        return deliveries

    async def _complete(self, connection: asyncpg.Connection, last_position: int, deliveries: list) -> bool:
        """Record the page once acknowledged; False when the acks show the broker lost data."""
        acknowledged = await asyncio.gather(*(delivery for delivery, _ in deliveries))
        reset_partitions = set()
        for (_, positions), metadata in zip(deliveries, acknowledged, strict=True):
            previous = self.last_published.get(metadata.partition)
            if previous is not None and metadata.offset <= previous[0]:
                reset_partitions.add(metadata.partition)  # offsets only grow, unless the log was lost
            last_offset = metadata.offset + len(positions) - 1
            if previous is None or last_offset > previous[0] or metadata.partition in reset_partitions:
                self.last_published[metadata.partition] = (last_offset, positions[-1])
            self.published_total += len(positions)
            RELAY_PUBLISHED.add(len(positions), {"source": self.config.source})
        if reset_partitions:
            log.warning("broker lost data of %s (partitions %s started again from lower offsets): republishing from the start",
                        self.config.topic, sorted(reset_partitions))
            self.last_published, self._last_sent = {}, {}
            await self._record_position(connection, 0)
            return False
        if self.on_page_published is not None:
            await self.on_page_published(last_position)
        await self._record_position(connection, last_position)
        return True

    def _headers(self, event: IntegrationEvent, carrier: dict[str, str], previous_position: int) -> list[tuple[str, bytes]]:
        headers = [
            ("type", event.type.encode()),
            ("schema_version", str(event.schema_version).encode()),
            (PREVIOUS_POSITION_HEADER, str(previous_position).encode()),
        ]
        if not carrier:
            return headers
        # Continue the trace of the command that stored the event.
        token = otel_context.attach(propagate.extract(carrier))
        try:
            with tracer.start_as_current_span(f"{self.config.topic} publish", kind=SpanKind.PRODUCER) as span:
                span.set_attribute("messaging.system", "kafka")
                span.set_attribute("messaging.destination.name", self.config.topic)
                span.set_attribute("messaging.message.id", str(event.event_id))
                outgoing: dict[str, str] = {}
                propagate.inject(outgoing)
        finally:
            otel_context.detach(token)
        return headers + [(name, value.encode()) for name, value in outgoing.items()]

    async def _record_position(self, connection: asyncpg.Connection, position: int) -> None:
        await connection.execute(
            "UPDATE outbox_relay_position SET position = $2, last_published = $3::jsonb WHERE source = $1",
            self.config.source, position, json.dumps(self.last_published),
        )
        self.position = position
        RELAY_POSITION.set(position, {"source": self.config.source})

    async def _republish_if_broker_lost_data(self, connection: asyncpg.Connection) -> None:
        if not self.last_published:
            return
        offsets = {partition: offset for partition, (offset, _) in self.last_published.items()}
        try:
            found = await records_at(self.config.bootstrap_servers, self.config.topic, offsets)
        except BrokerDidNotAnswer as slow:
            # Nothing is known lost: publish on (the embedded broker hands a partition's last
            # records back only once more arrive after them) and look again at the next check.
            log.warning("could not read back what was published last (%s): publishing on, looking again later", slow)
            return
        lost = [
            partition for partition, (_, position) in self.last_published.items()
            if partition not in found or _position_of(found[partition]) != position
        ]
        if lost:
            log.warning(
                "broker lost data of %s (partitions %s no longer hold what was published): republishing from the start",
                self.config.topic, lost,
            )
            await ensure_topics(self.config.bootstrap_servers, [self.config.topic], self.config.partitions,
                                self.config.replication_factor)
            self.last_published, self._last_sent = {}, {}
            await self._record_position(connection, 0)


async def _discarded(read: asyncio.Future | None) -> None:
    """Lets a page read that is no longer wanted finish (its thread cannot be stopped), and drops it."""
    if read is not None:
        await asyncio.gather(read, return_exceptions=True)


def _position_of(record) -> int | None:
    try:
        return json.loads(record.value)["position"]
    except (ValueError, KeyError, TypeError):
        return None
